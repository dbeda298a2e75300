"""
Real minstore nodes for integration tests: each node is a ``twistd -n
minstore`` child process on a loopback port, driven over real HTTP.

Use it from a trial ``TestCase`` (not a ``SynchronousTestCase``: the tests
wait on the reactor)::

    from twisted.trial.unittest import TestCase
    from tests.harness import NodeTestMixin, deferred_test

    class MyTests(NodeTestMixin, TestCase):
        @deferred_test
        async def test_roundtrip(self):
            node = await self.start_node()
            code, headers, body = await self.call(
                "POST", node.url + "/books/1", json={"value": "x"})
            self.assertEqual(code, 200)
            await node.stop()                   # SIGTERM, waits for the exit
            self.assertEqual(node.exit_code, 0)
            await node.restart()                # same port, same data dir

Several nodes that list each other (replication, lookups, cache fronts):
a node needs its peers' ports in its ``servers.list`` before it starts, so
the ports are chosen first (L{free_port}), every node's ``servers.list`` is
written, and only then are the nodes started::

    # Full mesh of three: every node lists the two others.
    a, b, c = await self.start_cluster(3)

    # Explicit graph: node 0 is a bridge ('*' first) listing 1; 1 lists 2;
    # 2 lists nobody.  Per-node extra options with node_args.
    a, b, c = await self.start_cluster(
        3, peers={0: [1], 1: [2], 2: []}, bridges=[0],
        node_args={0: ["--storage", "memory"]})

    # Or by hand, with the same building blocks:
    p1, p2 = free_port(), free_port()
    n1 = self.make_node(port=p1, servers=[node_url(p2)])
    n2 = self.make_node(port=p2, servers="# peers\\n" + node_url(p1) + "\\n")
    await gatherResults([ensureDeferred(n.start()) for n in (n1, n2)])

Every node made through L{NodeTestMixin} is stopped at the end of its test
(SIGTERM, then SIGKILL when it does not exit in time), and the mixin's HTTP
pool is closed, so trial sees a clean reactor.  A node's output goes to
``node.output()`` and to ``<its temp dir>/node.log`` (kept under
``_trial_temp``) for debugging.

The command line, environment and health check of a node come from
L{minstore.launcher}, which the benchmarks in ``bench/`` use too.
"""

import functools
import json as _json
import os
import sys

import treq
from twisted.internet import reactor as _global_reactor
from twisted.internet import task
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from minstore.launcher import (  # noqa: F401  (free_port, node_url, NodeStartError: for the tests)
    HEALTH_PATH,
    START_TIMEOUT,
    STOP_TIMEOUT,
    NodeStartError,
    free_port,
    node_argv,
    node_environ,
    node_url,
    write_servers,
)

#: The checkout under test: its ``minstore`` package and ``twisted/plugins``
#: come first on the children's PYTHONPATH.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_NO_JSON = object()


def deferred_test(f):
    """
    Make an ``async def`` test (or helper) return a Deferred, for trial
    versions that do not run coroutines themselves.
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return ensureDeferred(f(*args, **kwargs))

    return wrapper


class NodeProcessTimeout(Exception):
    """A node did not exit in the time it was given."""


def sleep(seconds, reactor=None):
    """A Deferred that fires after ``seconds`` on the reactor."""
    return task.deferLater(reactor or _global_reactor, seconds, lambda: None)


class _NodeProtocol(ProcessProtocol):
    """Collects one child's output and fires waiters when it has ended."""

    def __init__(self, sink, log_file):
        self._sink = sink
        self._log = log_file
        self.reason = None
        self._waiters = []

    def _received(self, data):
        self._sink.append(data)
        if self._log is not None:
            self._log.write(data)
            self._log.flush()

    def outReceived(self, data):
        self._received(data)

    def errReceived(self, data):
        self._received(data)

    def processEnded(self, reason):
        self.reason = reason
        if self._log is not None:
            self._log.close()
            self._log = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def ended(self):
        """A new Deferred firing (with None) once the process has ended."""
        d = Deferred()
        if self.reason is not None:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d


class NodeProcess:
    """
    One ``twistd -n minstore`` child on ``127.0.0.1:port``.

    @param base_dir: a directory of its own (created when missing): the data
        directory is ``base_dir/data`` unless ``data_dir`` is given, the
        servers file ``base_dir/servers.list``, the output log
        ``base_dir/node.log``.
    @param port: the port to listen on (default: a L{free_port}).
    @param servers: ``None`` for a standalone node; else the servers.list
        content as a string, or a list of peers (URLs, ports or
        L{NodeProcess}es), written to ``base_dir/servers.list`` and passed
        as ``--servers``.
    @param bridge: with a list of ``servers``, put ``*`` first (a bridge).
    @param args: further command-line options, e.g. ``["--storage", "memory"]``.
    @param port_arg: the exact ``--port`` value to pass (default
        ``tcp:PORT:interface=127.0.0.1``); for tests of bad options.
    """

    def __init__(
        self,
        base_dir,
        port=None,
        servers=None,
        bridge=False,
        args=(),
        data_dir=None,
        port_arg=None,
        name="node",
        reactor=None,
    ):
        self.reactor = reactor or _global_reactor
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.data_dir = os.path.abspath(data_dir or os.path.join(self.base_dir, "data"))
        self.name = name
        self.port_arg = port_arg
        self.args = list(args)
        self.servers_path = None
        if servers is not None:
            self.set_servers(servers, bridge)
        self.log_path = os.path.join(self.base_dir, "node.log")
        self._output = []
        self._proto = None
        self._pool = None
        self._http = None
        #: One entry per run: the exit reason of each process that ended.
        self.history = []

    # -- configuration --------------------------------------------------

    @property
    def url(self):
        """``http://127.0.0.1:PORT``, the node's base URL."""
        return node_url(self.port)

    def set_servers(self, servers, bridge=False):
        """(Re)write this node's servers.list; send L{hup} to make a running node re-read it."""
        if not isinstance(servers, str):
            servers = [peer.url if isinstance(peer, NodeProcess) else peer for peer in servers]
        self.servers_path = write_servers(os.path.join(self.base_dir, "servers.list"), servers, bridge)

    def argv(self):
        """The child's full argument vector (L{minstore.launcher.node_argv})."""
        return node_argv(self.port, self.data_dir, self.servers_path, self.args, port_arg=self.port_arg)

    def environ(self):
        return node_environ(checkout=REPO_ROOT)

    # -- process state --------------------------------------------------

    @property
    def running(self):
        return self._proto is not None and self._proto.reason is None

    @property
    def reason(self):
        """The Failure the last process ended with (None while running)."""
        return None if self._proto is None else self._proto.reason

    @property
    def exit_code(self):
        """The last process's exit status; None while running or when killed by a signal."""
        reason = self.reason
        return None if reason is None else reason.value.exitCode

    @property
    def exit_signal(self):
        """The signal number that ended the last process, or None."""
        reason = self.reason
        return None if reason is None else reason.value.signal

    @property
    def pid(self):
        return None if self._proto is None else self._proto.transport.pid

    def output(self):
        """Everything every run of this node wrote on stdout and stderr, as text."""
        return b"".join(self._output).decode("utf-8", "replace")

    def output_lines(self):
        return [line for line in self.output().splitlines() if line.strip()]

    # -- lifecycle ------------------------------------------------------

    def spawn(self):
        """Start the process without waiting for it to serve."""
        if self.running:
            raise RuntimeError("%s is already running" % (self.name,))
        log = open(self.log_path, "ab")
        log.write(("\n=== %s\n" % " ".join(self.argv())).encode("utf-8"))
        self._proto = _NodeProtocol(self._output, log)
        proto = self._proto
        proto.ended().addCallback(lambda _: self.history.append(proto.reason))
        self.reactor.spawnProcess(
            self._proto, sys.executable, self.argv(), env=self.environ(), path=self.base_dir
        )
        self._proto.transport.closeStdin()

    async def start(self, timeout=START_TIMEOUT):
        """Spawn and wait until ``GET /_node/health`` answers 200."""
        self.spawn()
        await self.wait_healthy(timeout)
        return self

    async def restart(self, timeout=START_TIMEOUT):
        """Start again, same port and data directory, after L{stop} or L{kill9}."""
        return await self.start(timeout)

    async def wait_healthy(self, timeout=START_TIMEOUT):
        deadline = self.reactor.seconds() + timeout
        last = None
        try:
            while True:
                if not self.running:
                    raise NodeStartError(
                        "%s exited while starting (exit %s, signal %s):\n%s"
                        % (self.name, self.exit_code, self.exit_signal, self.output())
                    )
                try:
                    response = await self._client().get(self.url + HEALTH_PATH, timeout=1.0)
                    await response.content()
                    if response.code == 200:
                        return
                    last = "HTTP %d" % (response.code,)
                except Exception as e:  # refused, reset, timed out: not up yet
                    last = repr(e)
                if self.reactor.seconds() >= deadline:
                    await self.kill9()
                    raise NodeStartError(
                        "%s did not answer %s within %.0fs (last: %s):\n%s"
                        % (self.name, HEALTH_PATH, timeout, last, self.output())
                    )
                await sleep(0.1, self.reactor)
        finally:
            await self._close_pool()

    async def wait_exit(self, timeout=STOP_TIMEOUT):
        """
        Wait up to ``timeout`` seconds for the process to end on its own;
        its exit code (None when a signal ended it).  Raises
        L{NodeProcessTimeout} (leaving it running) when it does not.
        """
        if self._proto is None:
            raise RuntimeError("%s was never started" % (self.name,))
        d = self._proto.ended()
        d.addTimeout(timeout, self.reactor)
        try:
            await d
        except defer.TimeoutError:
            raise NodeProcessTimeout(
                "%s still running after %.1fs:\n%s" % (self.name, timeout, self.output())
            )
        return self.exit_code

    def signal(self, name):
        """Send a signal ("TERM", "KILL", "HUP", "INT") if the process is running."""
        if not self.running:
            return False
        try:
            self._proto.transport.signalProcess(name)
        except ProcessExitedAlready:
            return False
        return True

    def hup(self):
        """SIGHUP: the node re-reads its servers.list."""
        return self.signal("HUP")

    async def stop(self, timeout=STOP_TIMEOUT):
        """
        SIGTERM and wait for the exit; SIGKILL (and L{NodeProcessTimeout})
        when it has not exited within ``timeout``.  Returns the exit code:
        None when the process ended by a signal (twistd re-raises the
        SIGTERM it handled, see L{exit_signal}).
        """
        if not self.running:
            return self.exit_code
        self.signal("TERM")
        try:
            return await self.wait_exit(timeout)
        except NodeProcessTimeout:
            await self.kill9()
            raise

    async def kill9(self, timeout=10.0):
        """SIGKILL and wait for the process to have ended."""
        if not self.running:
            return self.exit_code
        self.signal("KILL")
        return await self.wait_exit(timeout)

    # -- HTTP used by the harness itself --------------------------------

    def _client(self):
        if self._http is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=False)
            self._http = treq.client.HTTPClient(Agent(self.reactor, pool=self._pool))
        return self._http

    async def _close_pool(self):
        pool, self._pool, self._http = self._pool, None, None
        if pool is not None:
            await pool.closeCachedConnections()
            await sleep(0, self.reactor)

    def __repr__(self):
        return "<NodeProcess %s %s %s>" % (
            self.name,
            self.url,
            "running" if self.running else "exit=%s" % (self.exit_code,),
        )


class NodeTestMixin:
    """
    For a ``twisted.trial.unittest.TestCase``: real nodes in fresh temp
    dirs, stopped at the end of the test, and small treq helpers over a
    non-persistent connection pool closed at the end of the test.
    """

    reactor = _global_reactor

    # -- nodes ----------------------------------------------------------

    def make_node(self, **kwargs):
        """
        A L{NodeProcess} in a fresh temp dir, not started yet, stopped at
        cleanup.  Keyword arguments are those of L{NodeProcess}.
        """
        kwargs.setdefault("reactor", self.reactor)
        if "base_dir" not in kwargs:
            kwargs["base_dir"] = self.mktemp()
        node = NodeProcess(**kwargs)
        self.addCleanup(self._stop_at_cleanup, node)
        return node

    async def start_node(self, **kwargs):
        """L{make_node} and start it: a node answering its health check."""
        node = self.make_node(**kwargs)
        await node.start()
        return node

    async def _stop_at_cleanup(self, node):
        if not node.running:
            return
        try:
            await node.stop(timeout=5.0)
        except NodeProcessTimeout:
            pass  # killed by stop()

    def make_cluster(self, n, peers=None, bridges=(), args=(), node_args=None):
        """
        ``n`` L{NodeProcess}es, not started, whose servers.list files name
        each other: ports are chosen first, then every file is written.

        @param peers: who lists whom.  None: a full mesh (each node lists
            every other).  A dict ``{i: [j, ...]}`` or a callable
            ``f(i, n) -> [j, ...]`` of node indexes.  A node with an empty
            list gets an empty servers.list (no peers).
        @param bridges: indexes of nodes whose servers.list starts with ``*``.
        @param args: options given to every node.
        @param node_args: ``{i: [options]}`` given to node ``i`` only.
        """
        ports = [free_port() for _ in range(n)]
        while len(set(ports)) < n:
            ports = [free_port() for _ in range(n)]
        node_args = node_args or {}
        nodes = []
        for i in range(n):
            if peers is None:
                listed = [j for j in range(n) if j != i]
            elif callable(peers):
                listed = list(peers(i, n))
            else:
                listed = list(peers.get(i, ()))
            node = self.make_node(
                port=ports[i],
                servers=[node_url(ports[j]) for j in listed],
                bridge=i in bridges,
                args=list(args) + list(node_args.get(i, ())),
                name="node%d" % (i,),
            )
            node.index = i
            nodes.append(node)
        return nodes

    async def start_cluster(self, n, **kwargs):
        """L{make_cluster} and start every node at once; the started nodes in order."""
        nodes = self.make_cluster(n, **kwargs)
        await self.start_nodes(nodes)
        return nodes

    async def start_nodes(self, nodes):
        """Start several nodes concurrently and wait for all to be healthy."""
        await gatherResults([ensureDeferred(node.start()) for node in nodes], consumeErrors=True)
        return nodes

    async def run_node_to_exit(self, timeout=10.0, **kwargs):
        """
        Spawn a node expected to refuse to start, and wait (at most
        ``timeout`` seconds) for it to exit on its own: the L{NodeProcess},
        ended, with its ``exit_code`` and ``output()``.
        """
        node = self.make_node(**kwargs)
        node.spawn()
        await node.wait_exit(timeout)
        return node

    # -- HTTP -----------------------------------------------------------

    def http_client(self):
        """A treq HTTPClient over a non-persistent pool closed at cleanup."""
        client = getattr(self, "_harness_http", None)
        if client is None:
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            client = treq.client.HTTPClient(Agent(self.reactor, pool=pool))
            self._harness_http = client

            async def close():
                self._harness_http = None
                await pool.closeCachedConnections()
                await sleep(0, self.reactor)
                await sleep(0, self.reactor)

            self.addCleanup(close)
        return client

    async def call(self, method, url, json=_NO_JSON, data=None, headers=None, timeout=10.0):
        """
        One request; ``(code, headers, body bytes)``.

        ``json``: any JSON value sent as ``application/json`` (``None`` sends
        ``null``; leave it out to send no JSON).  ``data``: a dict (sent as a
        form, ``application/x-www-form-urlencoded``) or bytes.  ``headers``:
        a dict of header name to value (str or bytes).  The returned headers
        are a dict of lower-case header name to its last value (str), with
        the Twisted ``Headers`` object as ``.raw``.
        """
        kwargs = {}
        hdrs = {}
        if headers:
            for k, v in headers.items():
                k = k.encode("latin-1") if isinstance(k, str) else k
                v = v.encode("latin-1") if isinstance(v, str) else v
                hdrs[k] = [v]
        if json is not _NO_JSON:
            kwargs["data"] = _json.dumps(json).encode("utf-8")
            hdrs.setdefault(b"Content-Type", [b"application/json"])
        elif data is not None:
            kwargs["data"] = data
        if hdrs:
            kwargs["headers"] = hdrs
        d = ensureDeferred(self._call(method, url, kwargs, timeout))
        d.addTimeout(timeout + 1.0, self.reactor)
        return await d

    async def _call(self, method, url, kwargs, timeout):
        response = await self.http_client().request(method, url, timeout=timeout, **kwargs)
        body = await response.content()
        return response.code, ResponseHeaders(response.headers), body

    async def call_json(self, method, url, **kwargs):
        """L{call}, with the body parsed as JSON (None when empty)."""
        code, headers, body = await self.call(method, url, **kwargs)
        return code, headers, (_json.loads(body) if body else None)


class ResponseHeaders(dict):
    """Lower-case header name -> last value (str); ``.raw`` is the Headers."""

    def __init__(self, raw):
        dict.__init__(
            self,
            (
                (name.decode("latin-1").lower(), values[-1].decode("latin-1"))
                for name, values in raw.getAllRawHeaders()
            ),
        )
        self.raw = raw

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())
