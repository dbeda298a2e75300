"""
``python -m minstore.install``: install this node as a systemd service.

Run as root with the interpreter of the virtualenv minstore is installed in
(``/opt/minstore/bin/python -m minstore.install``); the unit starts that
virtualenv's ``twistd``.  What it makes:

* a system user (``minstore``) with no login shell and no home of its own
  but the data directory;
* ``/etc/minstore`` owned by root, readable by the user's group:
  ``servers.list`` (the file given with ``--servers``, else an empty one),
  and ``tokens`` and ``cluster.key`` when given (mode 0640, root:minstore);
* ``/var/lib/minstore`` owned by the user (mode 0750);
* ``/etc/systemd/system/minstore.service`` (L{render_unit}), and the
  ``sysusers.d`` and ``tmpfiles.d`` lines that describe the user and the
  directories, for a packager;
* then ``systemctl daemon-reload`` and ``systemctl enable --now minstore``
  when systemd runs.

Running it again changes nothing: files are written only when their text
differs, a config file already in ``/etc/minstore`` is kept unless a new
one is given, and a tokens file or cluster key already there stays in the
unit.  ``--root DIR`` writes everything under DIR and creates no user and
calls no systemctl (for packagers and tests).  ``--remove`` undoes the
install but keeps the configuration, the data and the user; ``--remove
--purge`` removes them too.
"""

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence, TextIO, Tuple

UNIT_NAME = "minstore.service"
ETC = "/etc/minstore"
DATA_HOME = "/var/lib/minstore"
UNIT_DIR = "/etc/systemd/system"
SYSUSERS = "/etc/sysusers.d/minstore.conf"
TMPFILES = "/etc/tmpfiles.d/minstore.conf"
NOLOGIN = "/usr/sbin/nologin"

#: The unit's text.  ``systemd/minstore.service`` in the source tree is this
#: rendered for /opt/minstore with tokens and a cluster key
#: (tests/test_install.py holds the two equal).
UNIT_TEMPLATE = """\
# A minstore node under systemd, written by `python -m minstore.install`
# (README, Operations).  Reload the peers and tokens after editing
# {etc}/servers.list or {etc}/tokens: systemctl reload minstore
[Unit]
Description=minstore node
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
WorkingDirectory={home}
# systemd makes {home} and gives it to {user} at each start.
StateDirectory={state}
StateDirectoryMode=0750
# Tokens and the cluster key (README, Security): made with
#   python -m minstore.auth new NAME SCOPES   and   python -m minstore.auth cluster-key
# root-owned, readable by the {user} group only (0640).  Without --tokens the
# node answers loopback clients only.
ExecStart={exec_start}
# SIGHUP re-reads servers.list and the tokens file.
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM lets in-flight writes finish and the storage close.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec=30
Restart=on-failure
RestartSec=2
LimitNOFILE=65536
# PyPy sizes its young generation after the cache size the CPU reports; a VM
# reporting a 480 MB L3 gave a node 400 MB of RSS instead of 185-205 MB, and
# 32 MB was as fast (README, PyPy).  CPython ignores the variable.
Environment=PYPY_GC_NURSERY=32MB

# Sandbox (systemd-analyze security minstore).  The node needs only its
# data directory, its config (read-only) and IP sockets.
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={home}
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
DevicePolicy=closed
ProtectHome=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
PrivateUsers=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
# Not set: MemoryDenyWriteExecute (PyPy's JIT writes the code it runs) and
# IPAddressDeny (a node talks to the peers of its servers.list, any address).

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    twistd: str, port: str = "8001", user: str = "minstore", tokens: bool = False, cluster_key: bool = False
) -> str:
    """The unit file's text for a node run by ``twistd`` (an absolute path)."""
    args = [
        twistd, "--nodaemon", "--pidfile=", "--logfile=-", "minstore",
        "--port", str(port),
        "--servers", ETC + "/servers.list",
        "--data", DATA_HOME + "/data",
    ]
    if tokens:
        args += ["--tokens", ETC + "/tokens"]
    if cluster_key:
        args += ["--cluster-key", ETC + "/cluster.key"]
    return UNIT_TEMPLATE.format(
        etc=ETC, user=user, home=DATA_HOME, state=os.path.basename(DATA_HOME),
        exec_start=" ".join(args),
    )


def sysusers_line(user: str) -> str:
    return 'u %s - "minstore node" %s %s\n' % (user, DATA_HOME, NOLOGIN)


def tmpfiles_lines(user: str) -> str:
    return (
        "d %s 0750 %s %s -\n" % (DATA_HOME, user, user)
        + "d %s 0750 root %s -\n" % (ETC, user)
        + "z %s/tokens 0640 root %s -\n" % (ETC, user)
        + "z %s/cluster.key 0640 root %s -\n" % (ETC, user)
    )


class HostSystem:
    """The real machine: users, ownership and systemctl."""

    def lookup(self, user: str) -> Optional[Tuple[int, int]]:
        """(uid, gid) of ``user``, or None when there is no such user."""
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid

    def create_user(self, user: str) -> None:
        subprocess.check_call([
            "useradd", "--system", "--user-group", "--shell", NOLOGIN,
            "--home-dir", DATA_HOME, "--no-create-home",
            "--comment", "minstore node", user,
        ])

    def delete_user(self, user: str) -> None:
        subprocess.check_call(["userdel", user])

    def owner(self, path: str) -> Tuple[int, int]:
        st = os.stat(path)
        return st.st_uid, st.st_gid

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(path, uid, gid)

    def systemd_running(self) -> bool:
        return os.path.isdir("/run/systemd/system")

    def systemctl(self, *args: str) -> None:
        subprocess.check_call(("systemctl",) + args)


class PackagingSystem(HostSystem):
    """``--root DIR``: no user made, no systemctl; ownership set only for a
    user that exists here (the sysusers.d and tmpfiles.d lines carry it)."""

    def create_user(self, user: str) -> None:
        pass

    def delete_user(self, user: str) -> None:
        pass

    def chown(self, path: str, uid: int, gid: int) -> None:
        if os.geteuid() == 0:
            os.chown(path, uid, gid)

    def systemd_running(self) -> bool:
        return False


class Installer:
    """Install or remove a node under ``root`` (``/`` on the real machine),
    saying each change on ``out``."""

    def __init__(self, root: str, system: HostSystem, user: str = "minstore", out: Optional[TextIO] = None) -> None:
        self.root = root
        self.system = system
        self.user = user
        self.out = out if out is not None else sys.stdout
        self.changes: List[str] = []

    def path(self, absolute: str) -> str:
        return os.path.join(self.root, absolute.lstrip("/"))

    def _say(self, what: str) -> None:
        self.changes.append(what)
        self.out.write(what + "\n")

    def _mkdir(self, absolute: str, mode: int) -> None:
        path = self.path(absolute)
        if not os.path.isdir(path):
            os.makedirs(path, mode)
            self._say("made " + absolute)
        self._chmod(absolute, mode)

    def _chmod(self, absolute: str, mode: int) -> None:
        path = self.path(absolute)
        if os.stat(path).st_mode & 0o7777 != mode:
            os.chmod(path, mode)
            self._say("mode %04o %s" % (mode, absolute))

    def _chown(self, absolute: str, uid: int, gid: int) -> None:
        path = self.path(absolute)
        if self.system.owner(path) != (uid, gid):
            self.system.chown(path, uid, gid)
            if self.system.owner(path) == (uid, gid):
                self._say("owner %d:%d %s" % (uid, gid, absolute))

    def _write(self, absolute: str, data: bytes, mode: int) -> bool:
        """Write ``data`` (bytes) unless the file holds it already; True when written."""
        path = self.path(absolute)
        try:
            with open(path, "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = False
        if not same:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".new"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            self._say("wrote " + absolute)
        self._chmod(absolute, mode)
        return not same

    def installed_port(self) -> Optional[str]:
        """The ``--port`` of the unit installed already, or None."""
        try:
            with open(self.path(UNIT_DIR + "/" + UNIT_NAME)) as f:
                found = re.search(r"^ExecStart=.* --port (\S+)", f.read(), re.M)
        except FileNotFoundError:
            return None
        return found.group(1) if found else None

    def install(
        self,
        twistd: str,
        port: Optional[str] = None,
        servers: Optional[str] = None,
        tokens: Optional[str] = None,
        cluster_key: Optional[str] = None,
    ) -> List[str]:
        """Install (or bring up to date) the node; the list of changes made.
        Without ``port``, the installed unit's port, else 8001."""
        if port is None:
            port = self.installed_port() or "8001"
        ids = self.system.lookup(self.user)
        if ids is None:
            self.system.create_user(self.user)
            ids = self.system.lookup(self.user)
            if ids is not None:
                self._say("made user %s (no login shell)" % (self.user,))
        root_ids = (0, ids[1]) if ids is not None else None

        self._write(SYSUSERS, sysusers_line(self.user).encode(), 0o644)
        self._write(TMPFILES, tmpfiles_lines(self.user).encode(), 0o644)

        self._mkdir(ETC, 0o750)
        if root_ids is not None:
            self._chown(ETC, *root_ids)
        if servers is not None:
            with open(servers, "rb") as f:
                self._write(ETC + "/servers.list", f.read(), 0o644)
        elif not os.path.exists(self.path(ETC + "/servers.list")):
            self._write(ETC + "/servers.list", b"# One peer URL a line (README, Spreading).\n", 0o644)
        for given, name in ((tokens, "tokens"), (cluster_key, "cluster.key")):
            if given is not None:
                with open(given, "rb") as f:
                    self._write(ETC + "/" + name, f.read(), 0o640)
            if os.path.exists(self.path(ETC + "/" + name)):
                self._chmod(ETC + "/" + name, 0o640)
                if root_ids is not None:
                    self._chown(ETC + "/" + name, *root_ids)

        self._mkdir(DATA_HOME, 0o750)
        if ids is not None:
            self._chown(DATA_HOME, *ids)

        unit = render_unit(
            twistd, port=port, user=self.user,
            tokens=os.path.exists(self.path(ETC + "/tokens")),
            cluster_key=os.path.exists(self.path(ETC + "/cluster.key")),
        )
        changed = self._write(UNIT_DIR + "/" + UNIT_NAME, unit.encode(), 0o644)
        if self.system.systemd_running():
            if changed:
                self.system.systemctl("daemon-reload")
            self.system.systemctl("enable", "--now", UNIT_NAME)
        return self.changes

    def remove(self, purge: bool = False) -> List[str]:
        """Stop and remove the service; with ``purge`` its config, data and user."""
        unit = self.path(UNIT_DIR + "/" + UNIT_NAME)
        if self.system.systemd_running() and os.path.exists(unit):
            self.system.systemctl("disable", "--now", UNIT_NAME)
        for absolute in (UNIT_DIR + "/" + UNIT_NAME, SYSUSERS, TMPFILES):
            if os.path.exists(self.path(absolute)):
                os.remove(self.path(absolute))
                self._say("removed " + absolute)
        if self.system.systemd_running():
            self.system.systemctl("daemon-reload")
        if purge:
            for absolute in (ETC, DATA_HOME):
                if os.path.exists(self.path(absolute)):
                    shutil.rmtree(self.path(absolute))
                    self._say("removed " + absolute)
            if self.system.lookup(self.user) is not None and not isinstance(self.system, PackagingSystem):
                self.system.delete_user(self.user)
                self._say("removed user " + self.user)
        return self.changes


def _twistd() -> str:
    """The twistd beside this interpreter (the virtualenv's)."""
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")


def main(
    argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None, system: Optional[HostSystem] = None
) -> int:
    out = out if out is not None else sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m minstore.install",
        description="Install this minstore as a systemd service (run as root).")
    parser.add_argument("--root", metavar="DIR", help="write everything under DIR; no user, no systemctl")
    parser.add_argument("--user", default="minstore", help="the service's system user (default minstore)")
    parser.add_argument("--port", help="the node's --port (default: the installed unit's, else 8001)")
    parser.add_argument("--servers", metavar="FILE", help="copied to /etc/minstore/servers.list")
    parser.add_argument("--tokens", metavar="FILE", help="copied to /etc/minstore/tokens")
    parser.add_argument("--cluster-key", metavar="FILE", help="copied to /etc/minstore/cluster.key")
    parser.add_argument("--twistd", default=_twistd(), help="the twistd the unit runs (default: %(default)s)")
    parser.add_argument("--remove", action="store_true", help="stop and remove the service")
    parser.add_argument("--purge", action="store_true", help="with --remove: its config, data and user too")
    args = parser.parse_args(argv)

    for given in (args.servers, args.tokens, args.cluster_key):
        if given is not None and not os.path.isfile(given):
            parser.exit(2, "minstore.install: error: no such file: %s\n" % (given,))
    if args.purge and not args.remove:
        parser.exit(2, "minstore.install: error: --purge goes with --remove\n")
    if system is None:
        if args.root is None and os.geteuid() != 0:
            parser.exit(2, "minstore.install: error: run as root (or with --root DIR)\n")
        system = PackagingSystem() if args.root is not None else HostSystem()
    installer = Installer(os.path.abspath(args.root or "/"), system, user=args.user, out=out)
    try:
        if args.remove:
            changes = installer.remove(purge=args.purge)
        else:
            if not os.access(args.twistd, os.X_OK):
                parser.exit(2, "minstore.install: error: %s is not an executable twistd\n" % (args.twistd,))
            changes = installer.install(
                os.path.abspath(args.twistd), port=args.port, servers=args.servers,
                tokens=args.tokens, cluster_key=args.cluster_key)
    except (OSError, subprocess.CalledProcessError) as e:
        parser.exit(1, "minstore.install: error: %s\n" % (e,))
    if not changes:
        out.write("nothing to change\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
