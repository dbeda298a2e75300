"""
``python -m minstore.install``: what it writes under ``--root``, that a
second run changes nothing, the user and systemctl steps on a real machine
(through a fake system), removal, and the shipped unit's sandbox.
"""

import io
import os
import shutil
import stat
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from minstore.install import HostSystem, Installer, main, render_unit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = "etc/systemd/system/minstore.service"


class FakeSystem(HostSystem):
    """A machine with systemd where users and ownership live in memory."""

    def __init__(self, uid=990, gid=991):
        self.users = {}
        self.owners = {}
        self.calls = []
        self.ids = (uid, gid)

    def lookup(self, user):
        return self.users.get(user)

    def create_user(self, user):
        self.calls.append(("useradd", user))
        self.users[user] = self.ids

    def delete_user(self, user):
        self.calls.append(("userdel", user))
        del self.users[user]

    def owner(self, path):
        if path in self.owners:
            return self.owners[path]
        st = os.stat(path)
        return st.st_uid, st.st_gid

    def chown(self, path, uid, gid):
        self.calls.append(("chown", path, uid, gid))
        self.owners[path] = (uid, gid)

    def systemd_running(self):
        return True

    def systemctl(self, *args):
        self.calls.append(("systemctl",) + args)


class InstallTestCase(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.src = os.path.abspath(self.mktemp())
        os.makedirs(self.src)
        self.twistd = os.path.join(self.src, "twistd")
        self.file("twistd", "#!/bin/sh\n", mode=0o755)

    def file(self, name, text, mode=0o644):
        path = os.path.join(self.src, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def at(self, relative):
        return os.path.join(self.root, relative)

    def read(self, relative):
        with open(self.at(relative)) as f:
            return f.read()

    def mode(self, relative):
        return stat.S_IMODE(os.stat(self.at(relative)).st_mode)

    def run_main(self, *args, system=None):
        out = io.StringIO()
        code = main(["--root", self.root, "--twistd", self.twistd] + list(args), out=out, system=system)
        self.assertEqual(code, 0)
        return out.getvalue()

    def snapshot(self):
        """Every path under the root with its mode, size, mtime and text."""
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                text = open(path, "rb").read() if os.path.isfile(path) else None
                found[os.path.relpath(path, self.root)] = (st.st_mode, st.st_mtime_ns, text)
        return found

    def test_root_layout(self):
        """--root DIR: config root-owned and not world-readable, the data
        directory, the unit running the given twistd, the user described
        for systemd-sysusers with no login shell."""
        servers = self.file("servers.list", "http://127.0.0.1:8002\n")
        out = self.run_main("--servers", servers, "--port", "8005")
        self.assertIn("wrote /etc/systemd/system/minstore.service", out)
        self.assertEqual(self.read("etc/minstore/servers.list"), "http://127.0.0.1:8002\n")
        self.assertEqual(self.mode("etc/minstore"), 0o750)
        self.assertEqual(self.mode("var/lib/minstore"), 0o750)
        unit = self.read(UNIT)
        self.assertIn(
            "ExecStart=%s --nodaemon --pidfile= --logfile=- minstore --port 8005 "
            "--servers /etc/minstore/servers.list --data /var/lib/minstore/data\n" % (self.twistd,),
            unit)
        self.assertNotIn("--tokens /etc", unit)
        self.assertIn("User=minstore\n", unit)
        # A PyPy node's young generation is bounded, whatever cache the CPU reports.
        self.assertIn("Environment=PYPY_GC_NURSERY=32MB\n", unit)
        self.assertIn("ProtectSystem=strict\n", unit)
        self.assertIn("ReadWritePaths=/var/lib/minstore\n", unit)
        self.assertEqual(
            self.read("etc/sysusers.d/minstore.conf"),
            'u minstore - "minstore node" /var/lib/minstore /usr/sbin/nologin\n')
        tmpfiles = self.read("etc/tmpfiles.d/minstore.conf")
        self.assertIn("d /var/lib/minstore 0750 minstore minstore -\n", tmpfiles)
        self.assertIn("d /etc/minstore 0750 root minstore -\n", tmpfiles)

    def test_default_servers_list(self):
        """Without --servers, an empty servers.list (comments only); one
        edited by hand is kept on the next run."""
        self.run_main()
        self.assertEqual(self.read("etc/minstore/servers.list").strip().startswith("#"), True)
        with open(self.at("etc/minstore/servers.list"), "w") as f:
            f.write("http://10.0.0.2:8001\n")
        self.assertEqual(self.run_main(), "nothing to change\n")
        self.assertEqual(self.read("etc/minstore/servers.list"), "http://10.0.0.2:8001\n")

    def test_twice_changes_nothing(self):
        servers = self.file("servers.list", "http://127.0.0.1:8002\n")
        tokens = self.file("tokens", "ops " + "0" * 64 + " admin\n")
        self.run_main("--servers", servers, "--tokens", tokens)
        before = self.snapshot()
        self.assertEqual(self.run_main("--servers", servers, "--tokens", tokens), "nothing to change\n")
        self.assertEqual(self.snapshot(), before)

    def test_port_kept(self):
        """A port given once stays in the unit when a later run (an
        upgrade) does not give it."""
        self.run_main("--port", "8005")
        self.assertEqual(self.run_main(), "nothing to change\n")
        self.assertIn(" --port 8005 ", self.read(UNIT))

    def test_secrets(self):
        """Tokens and the cluster key are copied 0640 and named in the unit;
        a later run without them keeps them in the unit."""
        tokens = self.file("tokens", "ops " + "0" * 64 + " admin\n", mode=0o600)
        key = self.file("cluster.key", "k" * 64 + "\n", mode=0o600)
        self.run_main("--tokens", tokens, "--cluster-key", key)
        self.assertEqual(self.mode("etc/minstore/tokens"), 0o640)
        self.assertEqual(self.mode("etc/minstore/cluster.key"), 0o640)
        self.assertEqual(self.read("etc/minstore/cluster.key"), "k" * 64 + "\n")
        for unit in (self.read(UNIT), (self.run_main(), self.read(UNIT))[1]):
            self.assertIn("--tokens /etc/minstore/tokens --cluster-key /etc/minstore/cluster.key\n", unit)

    def test_host(self):
        """On a machine with systemd: a system user is made once, the data
        directory is the user's, /etc/minstore root's with the user's group,
        the unit is loaded and started; a second run only asks systemd to
        keep it enabled and running (a no-op for systemd)."""
        system = FakeSystem()
        tokens = self.file("tokens", "ops " + "0" * 64 + " admin\n")
        out = self.run_main("--tokens", tokens, system=system)
        self.assertIn("made user minstore (no login shell)", out)
        self.assertEqual(system.calls.count(("useradd", "minstore")), 1)
        self.assertEqual(system.owner(self.at("var/lib/minstore")), (990, 991))
        self.assertEqual(system.owner(self.at("etc/minstore")), (0, 991))
        self.assertEqual(system.owner(self.at("etc/minstore/tokens")), (0, 991))
        self.assertEqual(
            [c for c in system.calls if c[0] == "systemctl"],
            [("systemctl", "daemon-reload"), ("systemctl", "enable", "--now", "minstore.service")])
        del system.calls[:]
        self.assertEqual(self.run_main(system=system), "nothing to change\n")
        self.assertEqual(system.calls, [("systemctl", "enable", "--now", "minstore.service")])

    def test_useradd_command(self):
        """The real user is a system user with nologin as its shell."""
        calls = []
        self.patch(subprocess, "check_call", calls.append)
        HostSystem().create_user("minstore")
        self.assertEqual(calls, [[
            "useradd", "--system", "--user-group", "--shell", "/usr/sbin/nologin",
            "--home-dir", "/var/lib/minstore", "--no-create-home", "--comment", "minstore node", "minstore",
        ]])

    def test_root_never_calls_systemctl(self):
        def refuse(*args, **kwargs):
            raise AssertionError("ran %r" % (args,))

        self.patch(subprocess, "check_call", refuse)
        self.run_main()
        self.run_main("--remove", "--purge")

    def test_remove(self):
        """--remove takes the unit away and keeps config and data; --purge
        removes those and the user too."""
        system = FakeSystem()
        self.run_main(system=system)
        os.makedirs(self.at("var/lib/minstore/data"))
        del system.calls[:]
        out = self.run_main("--remove", system=system)
        self.assertIn("removed /etc/systemd/system/minstore.service", out)
        self.assertFalse(os.path.exists(self.at(UNIT)))
        self.assertTrue(os.path.isdir(self.at("var/lib/minstore/data")))
        self.assertTrue(os.path.isfile(self.at("etc/minstore/servers.list")))
        self.assertEqual(system.calls[:2], [
            ("systemctl", "disable", "--now", "minstore.service"), ("systemctl", "daemon-reload")])
        self.run_main("--remove", "--purge", system=system)
        self.assertFalse(os.path.exists(self.at("var/lib/minstore")))
        self.assertFalse(os.path.exists(self.at("etc/minstore")))
        self.assertIn(("userdel", "minstore"), system.calls)

    def test_bad_arguments(self):
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as e:
            main(["--root", self.root, "--servers", os.path.join(self.src, "missing")], out=io.StringIO())
        self.assertEqual(e.exception.code, 2)
        self.assertIn("no such file", stderr.getvalue())
        self.assertFalse(os.path.exists(self.root))

    def test_shipped_unit(self):
        """systemd/minstore.service is the installer's unit for /opt/minstore
        with tokens and a cluster key."""
        with open(os.path.join(REPO_ROOT, "systemd", "minstore.service")) as f:
            shipped = f.read()
        self.assertEqual(shipped, render_unit("/opt/minstore/bin/twistd", tokens=True, cluster_key=True))


class SystemdAnalyzeTestCase(SynchronousTestCase):
    """The installed unit passes systemd-analyze (Debian's systemd package;
    .ci/run installs it)."""

    def setUp(self):
        if shutil.which("systemd-analyze") is None:
            if os.environ.get("CI"):
                self.fail("systemd-analyze is missing: .ci/run installs Debian's systemd package")
            raise SkipTest("systemd-analyze is not installed")
        self.root = os.path.abspath(self.mktemp())
        key = os.path.abspath(self.mktemp())
        with open(key, "w") as f:
            f.write("k" * 64 + "\n")
        twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
        if not os.access(twistd, os.X_OK):
            raise SkipTest("no twistd beside %s" % (sys.executable,))
        main(["--root", self.root, "--twistd", twistd, "--tokens", key, "--cluster-key", key], out=io.StringIO())
        self.unit = os.path.join(self.root, UNIT)

    def analyze(self, *args):
        return subprocess.run(
            ["systemd-analyze"] + list(args) + [self.unit],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)

    def test_verify(self):
        result = self.analyze("verify")
        self.assertEqual((result.returncode, result.stdout), (0, ""))

    def test_exposure(self):
        """Exposure at most 3.5 (systemd-analyze's threshold is in tenths)."""
        result = self.analyze("security", "--offline=true", "--threshold=35", "--no-pager")
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertIn("Overall exposure level for minstore.service", result.stdout)


