"""The long-lived parts of a node, as Twisted services."""

from twisted.application.service import Service
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.web.server import Site

from minstore.api import BoundedChannel, BoundedRequest


class ThreadPoolService(Service):
    """
    Starts a thread pool with the node and stops it after ``before_stop``
    (the node's drain) has fired, so no storage call is cut short.
    """

    log = Logger()

    def __init__(self, pool, before_stop=None):
        self.pool = pool
        self.before_stop = before_stop

    def startService(self):
        Service.startService(self)
        self.pool.start()

    def stopService(self):
        Service.stopService(self)
        d = maybeDeferred(self.before_stop) if self.before_stop else maybeDeferred(lambda: None)

        def stop(_):
            self.pool.stop()
            self.log.info("thread pool stopped")

        return d.addBoth(stop)


class NodeService(Service):
    """Opens the node's storage before the node serves; drains it at stop."""

    log = Logger()

    def __init__(self, node, describe=""):
        self.node = node
        self.describe = describe

    def startService(self):
        Service.startService(self)
        self.node.open()
        for process in self.node.processes:
            # A process may have a life of its own (lang's child process).
            if hasattr(process, "start"):
                process.start()
        self.log.info(
            "minstore node {node_id} started: {describe}; {records} records",
            node_id=self.node.node_id,
            describe=self.describe,
            records=self.node.storage.count(),
        )

    def stopService(self):
        Service.stopService(self)
        self.log.info("stopping: finishing {n} writes in flight", n=self.node.pending())
        d = self.node.stop()

        def stop_processes(_):
            stops = [maybeDeferred(p.stop) for p in self.node.processes if hasattr(p, "stop")]
            return gatherResults(stops, consumeErrors=True).addErrback(
                lambda f: self.log.failure("a process did not stop cleanly", f)
            )

        d.addCallback(stop_processes)

        def closed(_):
            self.node.storage.close()
            self.log.info("storage closed; every acknowledged write is on disk")
            _exit_zero_after_clean_stop()

        return d.addCallback(closed)


def _exit_zero_after_clean_stop():
    """
    twistd re-raises the SIGTERM or SIGINT that stopped its reactor once the
    reactor has run down, so even a clean stop ends "killed by signal 15"
    (status 143).  A node whose storage closed cleanly exits 0 instead.
    """
    from twisted.internet import reactor

    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


class NodeSite(Site):
    """
    A node's HTTP site: bounded request lines, headers (JSON 414 and 431)
    and bodies (413), no HTML tracebacks.
    """

    displayTracebacks = False
    #: Largest body buffered; the node's --max-record-size.
    max_body = None

    def __init__(self, resource, **kwargs):
        kwargs.setdefault("requestFactory", BoundedRequest)
        # The API parses forms itself; twisted.web's own parsing of every POST
        # body's Content-Type (through the email package) costs ~0.4 ms a request.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        Site.__init__(self, resource, **kwargs)
        self.protocol = BoundedChannel


class QuietSite(NodeSite):
    """A Site that writes no access log: per-request logging costs throughput."""

    def log(self, request):
        pass
