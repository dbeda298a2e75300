"""The cluster side of a node as a service: replication and SIGHUP."""

import signal

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from minstore.cluster.servers import ServersFileError, read_servers


class ClusterService(Service):
    """
    Starts replication from the storage's feed and checkpoints, re-reads
    servers.list on SIGHUP, and stops replication (saving its checkpoints).
    """

    log = Logger()

    def __init__(self, replication, servers, reactor):
        self.replication = replication
        self.servers = servers
        self.reactor = reactor
        self._previous_handler = None

    def startService(self):
        Service.startService(self)
        self.replication.start(self.servers)
        if self.servers.peers:
            self.log.info(
                "spreading to {n} peers{bridge}: {peers}",
                n=len(self.servers.peers),
                bridge=" as a bridge (bridge=1)" if self.servers.bridge else "",
                peers=", ".join(self.servers.peers),
            )
        if self.servers.path and hasattr(signal, "SIGHUP"):
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.reload)

    def reload(self):
        """Re-read servers.list; a bad file is logged and the old list kept."""
        path = self.servers.path
        try:
            servers = read_servers(path)
        except ServersFileError as e:
            self.log.error("SIGHUP: keeping the current peers: {error}", error=str(e))
            return None
        change = self.replication.reconfigure(servers)
        self.servers = servers
        self.log.info(
            "SIGHUP: re-read {path}: added [{added}], removed [{removed}], bridge {bridge}{changed}",
            path=path,
            added=", ".join(change["added"]),
            removed=", ".join(change["removed"]),
            bridge="on" if servers.bridge else "off",
            changed=" (changed)" if change["bridge_changed"] else "",
        )
        return change

    def stopService(self):
        Service.stopService(self)
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return maybeDeferred(self.replication.stop)
