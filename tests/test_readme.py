"""
The README's shell examples run as written: the "Using a node" block
against a real node (tests/harness.py), and the mirror pair, bridge chain
and cache front blocks, which start their own nodes, in a temporary
directory standing for a fresh checkout (``.venv`` there is this test's
virtualenv).  Only two things change: each example's ports become free
ones, and ``curl`` fails on an HTTP error (``--fail-with-body``), so a
command whose answer is an error fails the test.
"""

import json
import os
import re
import shutil
import signal

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import REPO_ROOT, NodeTestMixin, deferred_test, free_port, sleep

README = os.path.join(REPO_ROOT, "README.md")
VENV = os.path.dirname(os.path.dirname(os.path.abspath(os.sys.executable)))

#: curl as the examples call it, but failing on a 4xx or 5xx answer (unless
#: the example asks for -f itself, as the wait loops do).
PREAMBLE = r"""
curl() {
  case " $* " in
    *" -sf "*|*" -f "*) command curl --max-time 20 "$@" ;;
    *) command curl --max-time 20 -sS --fail-with-body "$@" ;;
  esac
}
"""


def section(text, title):
    """The text of the README section ``## title``, up to the next one."""
    start = text.index("\n## " + title + "\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def sh_blocks(text):
    return re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S)


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def topology_block(name):
    """The sh block that starts the nodes of ``demo/NAME``."""
    found = [b for b in sh_blocks(readme()) if "demo/%s/" % (name,) in b]
    if len(found) != 1:
        raise AssertionError("README: %d sh blocks use demo/%s/" % (len(found), name))
    return found[0]


def free_ports(block):
    """The block with each of its 80xx ports replaced by a free port."""
    ports = {}

    def replace(match):
        return str(ports.setdefault(match.group(0), free_port()))

    return re.sub(r"(?<![0-9])80[0-9][0-9](?![0-9])", replace, block)


class ReadmeTestCase(NodeTestMixin, TestCase):
    timeout = 240

    def setUp(self):
        if shutil.which("curl") is None:
            if os.environ.get("CI"):
                self.fail("curl is missing: .ci/run installs it")
            raise SkipTest("curl is not installed")
        if not os.access(os.path.join(VENV, "bin", "twistd"), os.X_OK):
            raise SkipTest("no twistd in %s" % (VENV,))
        self.checkout = os.path.abspath(self.mktemp())
        os.makedirs(self.checkout)
        os.symlink(VENV, os.path.join(self.checkout, ".venv"))

    async def run_block(self, block):
        """Run ``block`` with bash -e in the checkout; its output."""
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        script = PREAMBLE + block
        with open(os.path.join(self.checkout, "example.sh"), "w") as f:
            f.write(script)
        out, err, code = await getProcessOutputAndValue(
            "timeout", ["120", "bash", "-e", "-o", "pipefail", "example.sh"],
            env=env, path=self.checkout, reactor=reactor)
        output = (out + err).decode("utf-8", "replace")
        with open(os.path.join(self.checkout, "example.log"), "w") as f:
            f.write(output)
        self.assertEqual(code, 0, "the README example failed (exit %s):\n%s\n--- output:\n%s" % (code, block, output))
        return output

    async def stop_daemons(self):
        """SIGTERM the nodes an example left running; wait until they exit."""
        pids = []
        for dirpath, _, filenames in os.walk(os.path.join(self.checkout, "demo")):
            for name in filenames:
                if name.endswith(".pid"):
                    # The example's own last line kills its nodes, and each
                    # removes its pid file as it exits: one may go between
                    # the listing and the open.
                    try:
                        with open(os.path.join(dirpath, name)) as f:
                            pids.append(int(f.read().strip()))
                    except (FileNotFoundError, ValueError):
                        continue
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for _ in range(100):
            alive = [pid for pid in pids if _alive(pid)]
            if not alive:
                return
            await sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)

    async def run_topology(self, name):
        self.addCleanup(lambda: self.stop_daemons())
        output = await self.run_block(free_ports(topology_block(name)))
        await self.stop_daemons()
        return output

    @deferred_test
    async def test_using_a_node(self):
        """Every example of "Using a node", in order, against one node."""
        node = await self.start_node()
        blocks = sh_blocks(section(readme(), "Using a node"))
        self.assertEqual(len(blocks), 1)
        block = blocks[0].replace("localhost:8001", "127.0.0.1:%d" % (node.port,))
        self.assertNotIn("8001", block)
        output = await self.run_block(block)
        self.assertIn('"value":"Dune, by Frank Herbert"', output)
        self.assertIn("304 Not Modified", output)
        code, _, _ = await self.call("GET", node.url + "/books/dune3")
        self.assertEqual(code, 404)
        code, _, body = await self.call("GET", node.url + "/books/dune")
        self.assertEqual(json.loads(body)["value"], "again")

    @deferred_test
    async def test_mirror_pair(self):
        output = await self.run_topology("mirror")
        self.assertIn('"value":"written on A"', output)
        self.assertIn('"value":"written on B"', output)

    @deferred_test
    async def test_bridge_chain(self):
        output = await self.run_topology("bridge")
        self.assertIn('"value":"written on A"', output)

    @deferred_test
    async def test_cache_front(self):
        output = await self.run_topology("cache")
        self.assertEqual(output.count('"lang":"fr"'), 4, output)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
