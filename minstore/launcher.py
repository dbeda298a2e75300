"""
How to start a real node as a child process: the one place that knows the
command line, the environment and the readiness check, shared by the
integration tests (L{tests.harness}, on the reactor) and by the benchmarks
in C{bench/} (blocking, with L{Child}).

Standard library only, and nothing else of minstore is imported, so that a
benchmark run by a bare ``python3`` (its nodes under another ``--python``)
can use it::

    from minstore.launcher import free_port, node_child

    port = free_port()
    node = node_child("a", port, "/tmp/a/data", "/tmp/a/node.log", args=["--storage", "memory"])
    node.start()
    node.wait_ready()          # GET /_node/health answered 200
    ...
    node.stop()                # SIGTERM to its session, SIGKILL after a grace

A node is ``python -c "from twisted.scripts.twistd import run; run()" -n
--pidfile= minstore --port tcp:PORT:interface=127.0.0.1 --data DIR``: no
pidfile (several nodes share a directory), in the foreground, logging to
its standard output unless given a log file, listening on loopback only;
its environment puts the checkout (the directory holding this ``minstore``
package) first on ``PYTHONPATH`` so that the child runs this code and its
``twisted/plugins`` whichever minstore its interpreter has installed.
"""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

#: The directory holding the ``minstore`` package this module belongs to:
#: a checkout (or site-packages, when installed), first on the children's
#: ``PYTHONPATH``.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What every node answers with 200 once it serves (after its storage opened).
HEALTH_PATH = "/_node/health"

#: How long a node may take to answer L{HEALTH_PATH} after spawning (about
#: 1 s on an idle machine; generous for loaded CI runners).
START_TIMEOUT = 30.0

#: How long a SIGTERMed node may take to exit before it is SIGKILLed.
STOP_TIMEOUT = 15.0

#: twistd, run by the interpreter given (no ``twistd`` script needed on PATH).
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]

#: A peer in a servers list: a base URL, or a port on 127.0.0.1.
Peer = Union[str, int]


class NodeStartError(Exception):
    """A node exited, or never answered its health check, while starting."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(n: int) -> List[int]:
    """``n`` distinct free ports (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_url(port: int) -> str:
    """The base URL of a node listening on 127.0.0.1:port."""
    return "http://127.0.0.1:%d" % (port,)


def servers_text(servers: Iterable[Peer], bridge: bool = False) -> str:
    """servers.list content naming ``servers`` (URLs or ports), ``*`` first for a bridge."""
    lines = ["*"] if bridge else []
    lines += [node_url(peer) if isinstance(peer, int) else peer for peer in servers]
    return "\n".join(lines) + "\n"


def write_servers(path: str, servers: Union[str, Iterable[Peer]], bridge: bool = False) -> str:
    """Write a servers.list (a string as it is, or L{servers_text}); its path."""
    text = servers if isinstance(servers, str) else servers_text(servers, bridge)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def node_argv(
    port: Optional[int],
    data_dir: str,
    servers: Optional[str] = None,
    args: Sequence[str] = (),
    python: Optional[str] = None,
    twistd_args: Sequence[str] = (),
    logfile: Optional[str] = None,
    port_arg: Optional[str] = None,
) -> List[str]:
    """
    The argument vector of one node.

    @param port: listen on ``tcp:PORT:interface=127.0.0.1`` (unless ``port_arg``).
    @param data_dir: its ``--data`` directory.
    @param servers: the path of its servers.list (``--servers``), if any.
    @param args: further minstore options, e.g. ``["--storage", "memory"]``.
    @param python: the interpreter (default: this one).
    @param twistd_args: twistd's own options, e.g. ``["--profiler", "cprofile"]``.
    @param logfile: twistd's ``--logfile`` (default: standard output).
    @param port_arg: the exact ``--port`` value (for tests of bad options).
    """
    argv = [python or sys.executable] + TWISTD + ["-n", "--pidfile="]
    if logfile is not None:
        argv += ["--logfile", logfile]
    argv += list(twistd_args)
    if port_arg is None:
        if port is None:
            raise ValueError("a node needs a port (or a port_arg)")
        port_arg = "tcp:%d:interface=127.0.0.1" % (port,)
    argv += ["minstore", "--port", port_arg, "--data", data_dir]
    if servers is not None:
        argv += ["--servers", servers]
    return argv + list(args)


def node_environ(base: Optional[Mapping[str, str]] = None, checkout: str = CHECKOUT) -> Dict[str, str]:
    """
    The environment of a node: ``base`` (default: this process's) with
    ``checkout`` first on ``PYTHONPATH``, unbuffered output and no
    ``PYTHONSTARTUP``.
    """
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = checkout + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    """The status of ``GET path`` on 127.0.0.1:port (raises OSError when refused)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Child:
    """
    A server child process in its own session (so that stopping it stops
    what it started), its output in a log file; blocking.  Nodes come from
    L{node_child}; benchmarks also run other servers (etcd, a bare Klein
    app) through it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_path: str,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        health_path: str = HEALTH_PATH,
        preexec_fn: Optional[Callable[[], object]] = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.health_path = health_path
        self.preexec_fn = preexec_fn
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    @property
    def url(self) -> str:
        return node_url(self.port)

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def start(self) -> "Child":
        """Spawn (without waiting for it to serve)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else dict(self.env),
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=self.preexec_fn,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def wait_ready(
        self, path: Optional[str] = None, timeout: float = START_TIMEOUT, interval: float = 0.1
    ) -> float:
        """
        Wait until ``GET path`` (default: its health path) answers 200; the
        seconds waited.  Between tries it waits on the child's exit, so that
        a child that dies is reported at once.  L{NodeStartError} when it
        exits or does not answer within ``timeout`` (it is then left running).
        """
        if self.proc is None:
            raise RuntimeError("%s was never started" % (self.name,))
        path = path or self.health_path
        start = time.monotonic()
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise NodeStartError(
                    "%s exited (status %s) before answering:\n%s"
                    % (self.name, self.proc.returncode, self.log_tail())
                )
            try:
                status = http_status(self.port, path)
                if status == 200:
                    return time.monotonic() - start
                last = "HTTP %d" % (status,)
            except (OSError, http.client.HTTPException) as e:  # refused, reset: not up yet
                last = repr(e)
            if time.monotonic() - start > timeout:
                raise NodeStartError(
                    "%s did not answer %s within %.0fs (last: %s):\n%s"
                    % (self.name, path, timeout, last, self.log_tail())
                )
            try:
                self.proc.wait(interval)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, grace: float = STOP_TIMEOUT) -> bool:
        """SIGTERM its session, SIGKILL after ``grace`` seconds; True when it was running."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return True

    def __repr__(self) -> str:
        return "<Child %s %s %s>" % (self.name, self.url, "running" if self.alive() else "stopped")


def node_child(
    name: str,
    port: int,
    data_dir: str,
    log_path: str,
    servers: Optional[str] = None,
    args: Sequence[str] = (),
    python: Optional[str] = None,
    twistd_args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    checkout: str = CHECKOUT,
    preexec_fn: Optional[Callable[[], object]] = None,
) -> Child:
    """
    A L{Child} running one node (L{node_argv}, L{node_environ} over ``env``),
    not started yet, in ``cwd`` (default: the checkout, as ``PYTHONPATH=.
    twistd -n minstore`` from a checkout).
    """
    return Child(
        name,
        node_argv(port, data_dir, servers, args, python, twistd_args),
        port,
        log_path,
        node_environ(env, checkout),
        cwd if cwd is not None else checkout,
        HEALTH_PATH,
        preexec_fn,
    )
