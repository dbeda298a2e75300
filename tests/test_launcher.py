"""
minstore.launcher: the command line and environment of a node, and the
blocking Child's report of a child that dies while starting.  (Every
integration test starts its nodes through it, via tests/harness.py.)
"""

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from minstore.launcher import CHECKOUT, Child, NodeStartError, node_argv, node_environ, servers_text


class ArgvTests(SynchronousTestCase):
    def test_node(self):
        argv = node_argv(8123, "/d", "/s.list", ["--storage", "memory"])
        self.assertEqual(argv[0], sys.executable)
        i = argv.index("minstore")
        self.assertIn("-n", argv[:i])
        self.assertIn("--pidfile=", argv[:i])
        self.assertEqual(
            argv[i:],
            ["minstore", "--port", "tcp:8123:interface=127.0.0.1", "--data", "/d", "--servers", "/s.list",
             "--storage", "memory"],
        )

    def test_twistd_options_before_the_plugin(self):
        argv = node_argv(1, "/d", python="/pypy", twistd_args=["--profiler", "cprofile"], logfile="/l")
        self.assertEqual(argv[0], "/pypy")
        i = argv.index("minstore")
        self.assertEqual(argv[i - 4:i], ["--logfile", "/l", "--profiler", "cprofile"])
        self.assertNotIn("--servers", argv)

    def test_port_arg(self):
        argv = node_argv(None, "/d", port_arg="tcp:0")
        self.assertEqual(argv[argv.index("--port") + 1], "tcp:0")
        self.assertRaises(ValueError, node_argv, None, "/d")

    def test_environ(self):
        env = node_environ({"PYTHONPATH": "/elsewhere", "PYTHONSTARTUP": "/x.py", "HOME": "/h"})
        self.assertEqual(env["PYTHONPATH"], CHECKOUT + os.pathsep + "/elsewhere")
        self.assertNotIn("PYTHONSTARTUP", env)
        self.assertEqual(env["HOME"], "/h")
        self.assertEqual(node_environ({}, "/co")["PYTHONPATH"], "/co")
        self.assertTrue(os.path.isdir(os.path.join(CHECKOUT, "minstore")))

    def test_servers_text(self):
        self.assertEqual(servers_text([8001, "https://b:8443"]), "http://127.0.0.1:8001\nhttps://b:8443\n")
        self.assertEqual(servers_text([8001], bridge=True), "*\nhttp://127.0.0.1:8001\n")


class ChildTests(SynchronousTestCase):
    def test_exit_while_starting(self):
        """A child that exits before it answers is reported with its status and output."""
        log = self.mktemp()
        child = Child("dying", [sys.executable, "-c", "print('no such option'); raise SystemExit(3)"], 1, log)
        child.start()
        self.addCleanup(child.stop)
        e = self.assertRaises(NodeStartError, child.wait_ready, timeout=30)
        self.assertIn("status 3", str(e))
        self.assertIn("no such option", str(e))
        self.assertFalse(child.alive())
        self.assertFalse(child.stop())
