"""The long-lived parts of a node, as Twisted services."""

import gc
import os
import sys
import tempfile
from io import BytesIO

from twisted.application.service import MultiService, Service
from twisted.internet.defer import gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from minstore.api import BoundedChannel, BoundedRequest


def freeze_start_up_objects():
    """
    Move what start-up made (modules, Twisted, the language model, the
    services) out of the cyclic GC's sight (CPython's ``gc.freeze``; PyPy
    has none): its full collections then walk only what serving makes,
    not the ~200,000 objects that live as long as the process.
    """
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        gc.collect()
        freeze()


class NodeRoot(MultiService):
    """
    The node's service tree, started and stopped in order (a plain
    MultiService stops its children all at once).

    Start: the thread pool, the storage (blocking, before anything is
    served: recovery and migration happen here), the processes, the
    cluster (replication resumes from the storage's checkpoints), then the
    port.  Stop: the port is closed, the writes taken are drained, the
    processes stopped, replication stopped (its checkpoints saved through
    the thread pool), the storage closed, the thread pool stopped, and the
    peers' connections closed.

    Any exception while starting is logged and ends the process with
    status 1 (see L{fail_start}): a node that cannot serve does not linger
    with its port open.
    """

    log = Logger()

    def __init__(self, pool, node, cluster, port, extras=(), http_pool=None, describe=""):
        MultiService.__init__(self)
        self.pool = pool
        self.node = node
        self.cluster = cluster
        self.port = port
        self.extras = list(extras)
        self.http_pool = http_pool
        self.describe = describe
        for service in [cluster, port] + self.extras:
            if service is not None:
                service.setServiceParent(self)

    def startService(self):
        Service.startService(self)
        try:
            self.pool.start()
            self.node.open()
            for process in self.node.processes:
                if hasattr(process, "start"):
                    process.start()
            self.log.info(
                "minstore node {node_id} started: {describe}; {records} records, sequence at {seq}",
                node_id=self.node.node_id,
                describe=self.describe,
                records=self.node.storage.count(),
                seq=self.node.storage.last_seq(),
            )
            if self.cluster is not None:
                self.cluster.startService()
            for service in self.extras:
                service.startService()
            freeze_start_up_objects()
            self.port.startService()
        except BaseException as e:
            fail_start(e)

    def stopService(self):
        Service.stopService(self)
        d = maybeDeferred(self.port.stopService) if self.port.running else succeed(None)

        def drain(_):
            self.log.info("stopping: port closed; finishing {n} writes in flight", n=self.node.pending())
            return self.node.stop()

        def stop_processes(_):
            stops = [maybeDeferred(p.stop) for p in self.node.processes if hasattr(p, "stop")]
            return gatherResults(stops, consumeErrors=True).addErrback(
                lambda f: self.log.failure("a process did not stop cleanly", f)
            )

        def stop_cluster(_):
            extras = [maybeDeferred(s.stopService) for s in self.extras if s.running]
            cluster = maybeDeferred(self.cluster.stopService) if self.cluster is not None and self.cluster.running else succeed(None)
            return gatherResults([cluster] + extras, consumeErrors=True).addErrback(
                lambda f: self.log.failure("stopping replication failed", f)
            )

        def close_storage(_):
            try:
                self.node.storage.close()
            except Exception:
                self.log.failure("closing the storage failed")
                return
            self.log.info("storage closed; every acknowledged write is on disk")

        def stop_pool(_):
            self.pool.stop()
            self.log.info("thread pool stopped")
            _exit_zero_after_clean_stop()
            if self.http_pool is not None:
                return self.http_pool.closeCachedConnections()

        for step in (drain, stop_processes, stop_cluster, close_storage, stop_pool):
            d.addCallback(step)
        return d


def start_failure(e):
    """
    The one line that says why the start failed: the error's own words for
    a storage or system error, else its type too (the traceback is logged).
    """
    from minstore.errors import StorageFailed

    if isinstance(e, (StorageFailed, OSError)):
        return str(e)
    Logger("minstore").failure("start failed", Failure(e))
    return "%s: %s" % (type(e).__name__, e)


def fail_start(e):
    """A start that failed: one line on stderr and in the log, exit status 1."""
    message = start_failure(e)
    Logger("minstore").critical("minstore cannot start: {message}", message=message)
    sys.stderr.write("minstore: cannot start: %s\n" % (message,))
    sys.stderr.flush()
    os._exit(1)


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

    def getContentFile(self, length):
        # Asked by twisted.web for every request's body, even a GET's; with
        # no such method it looks for one (an AttributeError a request) and
        # buffers a body of unknown length in a temporary file, on the
        # reactor.  BoundedRequest keeps no more than max_body in memory.
        if self.max_body is not None or (length is not None and length < 100000):
            return BytesIO()
        return tempfile.TemporaryFile()


class QuietSite(NodeSite):
    """A Site that writes no access log: per-request logging costs throughput."""

    def log(self, request):
        pass
