"""
The node over a sequenced store (issue 10, DESIGN sections 4 and 6): a full
disk fails a batch with 507 and keeps nothing of it, versions resume from
the highest held after a restart, a damaged store refuses the start in one
line, and a node killed under load keeps every acknowledged write.
"""

import json
import os

from treq.testing import StubTreq
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from minstore.api import RecordAPI
from minstore.node import Node, run_inline
from minstore.records import HybridLogicalClock
from minstore.storage.files import FileStorage
from minstore.storage.sqlite import SQLiteStorage
from tests.harness import NodeTestMixin, deferred_test

JSON = {b"content-type": [b"application/json"]}


class FullDiskTests(SynchronousTestCase):
    """A write that storage cannot make durable answers 507 and is never served or replayed."""

    engine = SQLiteStorage

    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        self.storage = self.engine(self.data)
        self.node = Node(self.storage, node_id="n", in_thread=run_inline)
        self.node.open()
        self.addCleanup(lambda: self.node.storage.close())
        self.http = StubTreq(RecordAPI(self.node).resource())

    def request(self, method, path, body=None):
        kwargs = {}
        if body is not None:
            kwargs = {"data": json.dumps(body).encode(), "headers": JSON}
        response = self.successResultOf(self.http.request(method, "http://n" + path, **kwargs))
        return response.code, self.successResultOf(response.content())

    def fill(self):
        conn = self.storage._writer
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute("PRAGMA max_page_count = %d" % pages).fetchall()

    def free(self):
        self.storage._writer.execute("PRAGMA max_page_count = 1073741823").fetchall()

    def test_full_disk_answers_507_and_keeps_nothing(self):
        self.assertEqual(self.request("POST", "/c/before", {"value": "x"})[0], 200)
        self.fill()
        code, body = self.request("POST", "/c/lost", {"value": "y" * 50000})
        self.assertEqual(code, 507, body)
        self.assertEqual(json.loads(body)["error"], "insufficient_storage")
        self.assertEqual(self.request("GET", "/c/lost?local=1")[0], 404)
        self.free()
        self.assertEqual(self.request("POST", "/c/after", {"value": "z"})[0], 200)
        # Reopened: the failed write is not replayed, the later one is durable.
        self.storage.close()
        self.storage = self.engine(self.data)
        self.node = Node(self.storage, node_id="n", in_thread=run_inline)
        self.node.open()
        self.http = StubTreq(RecordAPI(self.node).resource())
        self.assertEqual(self.request("GET", "/c/lost?local=1")[0], 404)
        self.assertEqual(self.request("GET", "/c/after?local=1")[0], 200)
        self.assertEqual([c.uid for c in self.storage.changes(0, 10)[0]], ["before", "after"])


class FilesFullDiskTests(FullDiskTests):
    engine = FileStorage


class ClockResumeTests(SynchronousTestCase):
    def test_versions_continue_after_the_highest_held(self):
        """
        A node reopened over its data issues versions after the highest one
        it holds (one a peer made ahead of this node's clock included), and
        from the wall clock once the wall clock is later.
        """
        data = self.mktemp()
        now = [1_700_000_000.0]
        storage = SQLiteStorage(data)
        node = Node(storage, node_id="a", in_thread=run_inline, clock=HybridLogicalClock("a", now=lambda: now[0]), now=lambda: now[0])
        node.open()
        ahead = "%013d-000005-b" % (int(now[0] * 1000) + 30_000)
        replica = json.dumps({"collection": "c", "uid": "r", "version": ahead, "value": 1, "timestamp": 0}).encode()
        self.assertTrue(self.successResultOf(node.apply_replica(replica)))
        storage.close()

        now[0] -= 3600  # the wall clock stepped back while the node was down
        storage = SQLiteStorage(data)
        node = Node(storage, node_id="a", in_thread=run_inline, clock=HybridLogicalClock("a", now=lambda: now[0]), now=lambda: now[0])
        node.open()
        self.addCleanup(storage.close)
        first = self.successResultOf(node.create("c", "x", 1)).version
        self.assertGreater(first, ahead)
        self.assertEqual(first, "%013d-000006-a" % (int(now[0] * 1000) + 3600_000 + 30_000))
        now[0] += 7200  # now the wall clock is later: versions follow it, no reservation ahead
        second = self.successResultOf(node.create("c", "y", 1)).version
        self.assertEqual(second, "%013d-000000-a" % int(now[0] * 1000))


class StoreIntegrationTests(NodeTestMixin, TestCase):
    timeout = 120

    @deferred_test
    async def test_damaged_catalog_refuses_the_start(self):
        """A store that is not a database: exit status 1, one line naming the file, no traceback, nothing served."""
        for engine, name in (("sqlite", "minstore.sqlite3"), ("files", "catalog.sqlite3")):
            data = os.path.abspath(self.mktemp())
            os.makedirs(data)
            with open(os.path.join(data, name), "wb") as f:
                f.write(b"\xff\xfe garbage, not SQLite " * 200)
            node = await self.run_node_to_exit(timeout=30, data_dir=data, args=["--storage", engine])
            self.assertEqual(node.exit_code, 1, node.output())
            self.assertNotIn("Traceback", node.output())
            lines = [l for l in node.output_lines() if "cannot start" in l]
            self.assertTrue(lines, node.output())
            self.assertIn(name, lines[-1])

    @deferred_test
    async def test_kill9_under_writes_keeps_every_acknowledged_write(self):
        """
        A node killed with SIGKILL while 16 writers POST and PUT serves,
        after a restart, every write it acknowledged; its feed holds each
        uid once.
        """
        for engine in ("files", "sqlite"):
            node = await self.start_node(args=["--storage", engine, "--processes", ""])
            acknowledged = {}
            stop = [False]

            async def writer(w):
                n = 0
                while not stop[0] and n < 400:
                    n += 1
                    uid = "w%d-%d" % (w, n % 25)
                    method = "POST" if n <= 25 else "PUT"
                    try:
                        code, _, _ = await self.call(method, node.url + "/c/" + uid, json={"value": n}, timeout=5)
                    except Exception:
                        return
                    if code == 200:
                        acknowledged[uid] = n

            from twisted.internet import reactor
            from twisted.internet.defer import ensureDeferred
            from tests.harness import sleep

            writers = [ensureDeferred(writer(w)) for w in range(16)]
            # Kill once writes are flowing (bounded: at most 30 s).
            for _ in range(300):
                if len(acknowledged) >= 40:
                    break
                await sleep(0.1, reactor)
            await sleep(0.2, reactor)
            await node.kill9()
            stop[0] = True
            await gatherResults(writers, consumeErrors=True)
            self.assertGreaterEqual(len(acknowledged), 40)
            await node.restart()
            for uid, n in sorted(acknowledged.items()):
                code, _, body = await self.call("GET", node.url + "/c/" + uid + "?local=1")
                self.assertEqual(code, 200, uid)
                self.assertGreaterEqual(json.loads(body)["value"], n, uid)
            await node.stop()

    @deferred_test
    async def test_damaged_node_id_refuses_the_start(self):
        """A node_id file that holds no id stops the start with one line naming it, exit 1."""
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        with open(os.path.join(data, "node_id"), "wb") as f:
            f.write(b"\xff\x00 not an id\n")
        node = await self.run_node_to_exit(timeout=30, data_dir=data, args=["--storage", "memory"])
        self.assertEqual(node.exit_code, 1, node.output())
        self.assertNotIn("Traceback", node.output())
        lines = [l for l in node.output_lines() if "cannot start" in l]
        self.assertEqual(len(lines), 1, node.output())
        self.assertIn("node_id", lines[0])
