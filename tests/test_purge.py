"""
Tombstone collection (L{minstore.cluster.purge}) in memory: real nodes
with their Sync and Purger behind their RecordAPI on a FakeNetwork, time
on a Clock, storage inline.  The integration tests with twistd nodes are
L{PurgeIntegrationTests}.
"""

import json
import os
import shutil

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted.internet.defer import succeed

from minstore.api import RecordAPI
from minstore.errors import NotFound
from minstore.cluster.peers import PeerClient
from minstore.cluster.purge import MemoryState, Purger, PurgeService, version_before
from minstore.cluster.sync import Sync, SyncIndex
from minstore.node import Entry, Node, run_inline
from minstore.storage.memory import MemoryStorage
from tests.fakes import T0, FakeNetwork, replica, url
from tests.harness import NodeTestMixin, deferred_test, sleep

GRACE = 100.0


class Net:
    def __init__(self, test):
        self.test = test
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = FakeNetwork()

    def add(self, name, peers=(), state=None, storage=None):
        return Member(self, name, peers, state, storage)

    def advance(self, seconds):
        self.clock.advance(seconds)


class Member:
    def __init__(self, net, name, peers, state, storage):
        self.net = net
        self.test = net.test
        self.name = name
        self.url = url(name)
        self.peers = [url(p) for p in peers]
        self.storage = storage or MemoryStorage()
        self.node = Node(self.storage, node_id=name, now=net.clock.seconds)
        self.node.open()
        self.client = PeerClient(net.net, name)
        self.index = SyncIndex(self.storage)
        #: The peers' replication checkpoints and last acknowledged sends, as the test sets them.
        self.checkpoints = {}
        self.contacts = {}
        self.state = state or MemoryState()
        self.purger = Purger(
            self.node,
            self.index,
            lambda: self.peers,
            lambda: self.checkpoints,
            lambda: self.contacts,
            net.clock,
            run_inline,
            GRACE,
            self.state,
        )
        self.purger.load()
        self.sync = Sync(
            self.node, self.index, self.client, lambda: self.peers, net.clock, run_inline, timeout=5.0, purge=self.purger
        )
        self.api = RecordAPI(self.node, node_sync=self.sync)
        self.node.status_sections["purge"] = self.purger.status
        net.net.add(self.url, self.api.resource())

    def write(self, uid, value="v"):
        return self.test.successResultOf(self.node.create("c", uid, value))

    def delete(self, uid):
        return self.test.successResultOf(self.node.delete("c", uid))

    def put(self, data):
        return self.test.successResultOf(self.node.apply_replica(data))

    def held(self):
        return {u: v for c, u, v in self.storage.scan_versions(None, None, 10 ** 6)}

    def deleted(self, uid):
        data = self.storage.get("c", uid)
        return data is not None and bool(json.loads(data).get("deleted"))

    def sync_with(self, other):
        report = self.test.successResultOf(self.sync.sync(other.url))
        return report

    def purge(self):
        return self.test.successResultOf(self.purger.run())


class ConfirmationTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.a = self.net.add("a", ["b"])
        self.b = self.net.add("b", ["a"])

    def test_version_before(self):
        """Every version made before the time sorts below its cutoff, none made at or after it."""
        clock = self.a.node.clock
        before = clock.now()
        cut = version_before(self.net.clock.seconds() + 0.001)
        self.net.advance(0.002)
        after = clock.now()
        self.assertLess(before, cut)
        self.assertGreater(after, cut)

    def test_not_before_the_grace_period_even_when_confirmed(self):
        """A tombstone every peer holds stays until it is older than the grace period."""
        self.a.write("x")
        self.a.delete("x")
        self.assertIsNone(self.a.sync_with(self.b)["error"])
        self.net.advance(GRACE - 1)
        self.assertEqual(self.a.purge(), 0)
        self.assertTrue(self.a.deleted("x"))
        self.net.advance(2)
        self.assertEqual(self.a.purge(), 1)
        self.assertIsNone(self.a.storage.get("c", "x"))
        self.assertEqual(self.a.purger.status()["purged"], 1)

    def test_never_purged_while_a_peer_is_down(self):
        """A peer that cannot be synced with confirms nothing: the tombstone stays, however old."""
        self.a.write("x")
        self.a.delete("x")
        self.net.net.down(self.b.url)
        self.assertIsNotNone(self.a.sync_with(self.b)["error"])
        self.net.advance(10 * GRACE)
        self.assertEqual(self.a.purge(), 0)
        self.assertTrue(self.a.deleted("x"))
        self.net.net.up(self.b.url)
        self.assertIsNone(self.a.sync_with(self.b)["error"])
        self.assertTrue(self.b.deleted("x"))
        self.assertEqual(self.a.purge(), 1)

    def test_a_sync_confirms_only_what_was_held_when_it_began(self):
        """A tombstone written after the last completed sync began is not confirmed by it."""
        self.a.write("x")
        self.a.write("y")
        self.a.delete("x")
        self.a.sync_with(self.b)
        self.a.delete("y")
        self.net.advance(GRACE + 1)
        self.assertEqual(self.a.purge(), 1)
        self.assertTrue(self.a.deleted("y"))
        self.a.sync_with(self.b)
        self.assertEqual(self.a.purge(), 1)
        self.assertEqual(self.a.held(), {})

    def test_every_peer_must_confirm(self):
        """With two peers, one completed sync is not enough."""
        c = self.net.add("c", ["a"])
        self.a.peers.append(c.url)
        self.a.write("x")
        self.a.delete("x")
        self.a.sync_with(self.b)
        self.net.advance(GRACE + 1)
        self.assertEqual(self.a.purge(), 0)
        self.a.sync_with(c)
        self.assertEqual(self.a.purge(), 1)

    def test_forwarded_tombstone_confirmed_by_a_counted_checkpoint(self):
        """
        A tombstone replication sends (forward) is confirmed by the peer's
        checkpoint past it, for a peer there since the store was empty; one
        received as a replica (not forwarded) needs a sync.
        """
        self.a.write("x")
        self.a.delete("x")  # forwarded
        self.a.put(replica("y", 1))
        self.a.put(json.dumps({"collection": "c", "uid": "y", "version": self.a.node.clock.now(), "timestamp": 1, "deleted": True}).encode())
        self.a.checkpoints[self.b.url] = self.a.storage.last_seq()
        self.net.advance(GRACE + 1)
        self.assertEqual(self.a.purge(), 1)
        self.assertIsNone(self.a.storage.get("c", "x"))
        self.assertTrue(self.a.deleted("y"))

    def test_checkpoint_of_a_peer_added_later_does_not_count_before_a_sync(self):
        """A peer added while the node held tombstones starts its checkpoint past them: only a sync confirms them."""
        self.a.write("x")
        self.a.delete("x")
        c = self.net.add("c", ["a"])
        self.a.peers = [c.url]
        self.a.checkpoints = {c.url: self.a.storage.last_seq()}
        self.net.advance(GRACE + 1)
        self.assertEqual(self.a.purge(), 0)
        self.a.sync_with(c)
        self.assertTrue(c.deleted("x"))
        self.assertEqual(self.a.purge(), 1)

    def test_without_peers_only_the_grace_period(self):
        """A node without peers purges what is older than the grace period."""
        alone = self.net.add("alone")
        alone.write("x")
        alone.delete("x")
        self.assertEqual(alone.purge(), 0)
        self.net.advance(GRACE + 1)
        self.assertEqual(alone.purge(), 1)

    def test_purged_keys_leave_the_fingerprints(self):
        """After both purged, the two nodes' fingerprints match again: one round trip."""
        for i in range(300):
            self.a.write("u%03d" % i)
        self.a.sync_with(self.b)
        self.a.delete("u007")
        self.a.sync_with(self.b)
        self.b.sync_with(self.a)
        self.net.advance(GRACE + 1)
        self.assertEqual((self.a.purge(), self.b.purge()), (1, 1))
        report = self.a.sync_with(self.b)
        self.assertEqual((report["round_trips"], report["pulled"], report["pushed"]), (1, 0, 0))
        self.assertEqual(len(self.a.held()), 299)

    def test_bookkeeping_survives_a_restart(self):
        """The sync confirmations are kept: a node started again on the same state purges what was confirmed."""
        self.a.write("x")
        self.a.delete("x")
        self.a.sync_with(self.b)
        again = Purger(
            self.a.node, self.a.index, lambda: self.a.peers, dict, dict, self.net.clock, run_inline, GRACE, self.a.state
        )
        again.load()
        self.net.advance(GRACE + 1)
        self.assertEqual(self.successResultOf(again.run()), 1)


class HorizonTests(SynchronousTestCase):
    """What a node purged never comes back from a node that missed the delete."""

    def setUp(self):
        self.net = Net(self)
        self.a = self.net.add("a", ["b"])
        self.b = self.net.add("b", ["a"])
        self.a.write("x", "old")
        self.a.sync_with(self.b)
        self.stale = self.a.storage.get("c", "x")
        self.a.delete("x")
        self.a.sync_with(self.b)
        self.b.sync_with(self.a)
        self.net.advance(GRACE + 1)
        self.assertEqual((self.a.purge(), self.b.purge()), (1, 1))

    def test_storage_refuses_the_old_record(self):
        """A replica of the purged record (replication from a stale node) is not stored."""
        self.assertFalse(self.a.put(self.stale))
        self.assertEqual(self.a.held(), {})

    def test_a_node_that_missed_the_delete_does_not_bring_it_back(self):
        """
        C holds the old record (a node put back from a backup, not known as
        rejoining): syncs in both directions neither push nor pull it.
        """
        c = self.net.add("c", ["a"])
        self.a.peers.append(c.url)
        c.put(self.stale)
        report = c.sync_with(self.a)
        self.assertEqual((report["pushed"], report["error"]), (0, None))
        report = self.a.sync_with(c)
        self.assertEqual((report["pulled"], report["error"]), (0, None))
        self.assertEqual(self.a.held(), {})
        self.assertEqual(c.purger.status()["withheld"], 1)
        self.assertEqual(self.a.purger.status()["withheld"], 1)

    def test_an_update_below_the_horizon_reaches_a_node_holding_the_key(self):
        """
        Only keys the other side does not hold are withheld: a newer version
        of a key both hold, older than the horizon (an update replication
        missed), still goes, whichever side syncs.
        """
        for initiator in ("holder", "updated"):
            net = Net(self)
            a, b = net.add("a", ["b"]), net.add("b", ["a"])
            a.put(replica("k", 1, "one"))
            a.write("x")
            a.sync_with(b)
            update = replica("k", 2, "two")
            a.node.clock.observe(json.loads(update)["version"])
            a.delete("x")  # the tombstone, and so the horizon, is newer than the update
            a.sync_with(b)
            b.sync_with(a)
            net.advance(GRACE + 1)
            self.assertEqual((a.purge(), b.purge()), (1, 1))
            self.assertGreater(a.storage.purged_version(), json.loads(update)["version"])
            self.assertTrue(b.put(update))
            report = a.sync_with(b) if initiator == "holder" else b.sync_with(a)
            self.assertIsNone(report["error"])
            self.assertEqual(json.loads(a.storage.get("c", "k"))["value"], "two", initiator)
            self.assertEqual(a.held(), b.held())
            self.assertEqual((a.purger.status()["withheld"], b.purger.status()["withheld"]), (0, 0))

    def test_a_lookup_does_not_bring_it_back(self):
        """A peer's copy of a uid not held, at or below the horizon, does not count for a GET; a newer one does."""
        answers = {"x": Entry.parse(self.stale), "fresh": Entry.parse(replica("fresh", 10 ** 9))}

        class Remote:
            def get(_, collection, uid):
                return succeed(answers[uid])

        self.a.node.remote = Remote()
        self.failureResultOf(self.a.node.get("c", "x"), NotFound)
        self.assertEqual(self.successResultOf(self.a.node.get("c", "fresh")).data, answers["fresh"].data)

    def test_a_rejoining_node_takes_it_for_deleted(self):
        """
        C, rejoining (its last contact older than the grace period), pulls
        only, and replaces its old copy by a tombstone of the same version,
        not passed on; once synced with every peer it pushes again.
        """
        state = MemoryState({"peers": {self.a.url: {"contact": self.net.clock.seconds() - 2 * GRACE, "synced": 1}}})
        c = self.net.add("c", ["a"], state=state)
        self.assertEqual(c.purger.status()["rejoining"], [self.a.url])
        c.put(self.stale)
        c.put(replica("mine", 10 ** 9))  # newer than the horizon: held back while rejoining
        self.a.write("y")
        report = c.sync_with(self.a)
        self.assertEqual((report["error"], report["pulled"], report["pushed"]), (None, 1, 0))
        self.assertTrue(c.deleted("x"))
        self.assertEqual(json.loads(c.storage.get("c", "x"))["version"], json.loads(self.stale)["version"])
        self.assertIsNone(c.purger.status()["rejoining"])
        self.assertEqual(c.purger.status()["retired"], 1)
        self.assertEqual(self.a.held().get("x"), None)
        report = c.sync_with(self.a)
        self.assertEqual(report["pushed"], 1)  # "mine"; not the tombstone of x
        self.assertNotIn("x", self.a.held())
        # The retired tombstone is as old as the record was, and A has confirmed: it goes.
        self.assertEqual(c.purge(), 1)
        self.assertEqual(set(c.held()), set(self.a.held()))
        self.assertNotIn("x", c.held())

    def test_rejoining_purges_nothing(self):
        state = MemoryState({"peers": {self.a.url: {"contact": self.net.clock.seconds() - 2 * GRACE}}})
        c = self.net.add("c", ["a"], state=state)
        c.put(replica("z", 1))
        c.put(json.dumps({"collection": "c", "uid": "z", "version": c.node.clock.now(), "timestamp": 1, "deleted": True}).encode())
        self.net.advance(GRACE + 1)
        c.peers = []
        self.assertEqual(c.purge(), 0)
        self.assertTrue(c.deleted("z"))

    def test_malformed_horizon_fails_the_sync(self):
        """A peer whose horizon is not a version fails that sync."""
        self.b.purger.horizon = lambda: "9" * 201  # longer than any version
        report = self.a.sync_with(self.b)
        self.assertIn("purged", report["error"])


class ServiceTests(SynchronousTestCase):
    def test_runs_periodically_with_status_and_metrics(self):
        """The service runs the purge every interval on the node's clock; status and metrics count it."""
        net = Net(self)
        a = net.add("a")
        service = PurgeService(a.purger, net.clock)
        service.startService()
        self.addCleanup(service.stopService)
        a.write("x")
        a.delete("x")
        self.assertEqual(a.purger.interval, GRACE / 4)
        net.advance(GRACE / 4)
        self.assertEqual(a.purger.runs, 1)
        self.assertEqual(a.purger.purged, 0)
        for _ in range(5):
            net.advance(GRACE / 4)
        status = a.purger.status()
        self.assertEqual((status["purged"], status["grace"], status["rejoining"]), (1, GRACE, None))
        self.assertEqual(status["purged_version"], json.loads(json.dumps(status))["purged_version"])
        self.assertIsNotNone(status["purged_version"])
        metrics = dict((m.name, m) for m in a.purger.collect())
        self.assertEqual(metrics["minstore_tombstones_purged"].samples[0].value, 1)
        self.assertEqual(metrics["minstore_rejoining"].samples[0].value, 0)

    def test_a_failing_run_is_counted_and_the_loop_goes_on(self):
        net = Net(self)
        a = net.add("a")
        calls = []

        def broken(*args):
            calls.append(args)
            raise OSError("disk on fire")

        a.storage.purge_tombstones = broken
        service = PurgeService(a.purger, net.clock)
        service.startService()
        self.addCleanup(service.stopService)
        net.advance(GRACE / 4)
        net.advance(GRACE / 4)
        self.assertEqual(len(calls), 2)
        self.assertEqual(a.purger.status()["errors"], 2)
        self.assertIn("disk on fire", a.purger.status()["last_error"])


class PurgeIntegrationTests(NodeTestMixin, TestCase):
    """Real twistd nodes with --tombstone-grace 1 and a short replication interval."""

    timeout = 120
    ARGS = ["--tombstone-grace", "1", "--replication-interval", "0.05"]

    _last_status = None

    async def status(self, node):
        code, _, status = await self.call_json("GET", node.url + "/_node/status")
        self.assertEqual(code, 200)
        self._last_status = status.get("purge")
        return status

    async def until(self, predicate, what, seconds=20.0):
        for _ in range(int(seconds / 0.1)):
            if await predicate():
                return
            await sleep(0.1)
        self.fail("not within %gs: %s (%r)" % (seconds, what, self._last_status))

    async def sync(self, node):
        code, _, body = await self.call_json("POST", node.url + "/_node/sync")
        self.assertEqual(code, 200, body)
        for report in body["peers"]:
            self.assertIsNone(report["error"], report)
        return body["peers"]

    async def purged(self, node):
        return (await self.status(node))["purge"]["purged"]

    async def held(self, node, uid):
        code, _, _ = await self.call("GET", node.url + "/c/" + uid + "?local=1")
        return code

    @deferred_test
    async def test_purged_on_both_then_a_backup_put_back_does_not_bring_it_back(self):
        """
        Delete on A; both confirm (syncs); the tombstone is purged on both
        (status and /metrics say so, GET still 404). Then B is stopped and
        its data directory replaced by a copy taken before the delete: once
        started it rejoins, and after syncs the record is on no node.
        """
        a, b = await self.start_cluster(2, args=self.ARGS, node_args={0: ["--storage", "sqlite"], 1: ["--storage", "files"]})
        code, _, _ = await self.call("POST", a.url + "/c/doomed", json={"value": "old"})
        self.assertEqual(code, 200)
        code, _, _ = await self.call("POST", a.url + "/c/kept", json={"value": "k"})
        self.assertEqual(code, 200)
        await self.until(lambda: self._code_is(b, "doomed", 200), "replicated to b")

        # A copy of b's data taken while it holds the record (stopped for a consistent copy).
        await b.stop()
        backup = os.path.abspath(self.mktemp())
        shutil.copytree(b.data_dir, backup)
        await b.start()

        code, _, _ = await self.call("DELETE", a.url + "/c/doomed")
        self.assertEqual(code, 200)
        await self.until(lambda: self._code_is(b, "doomed", 404), "delete replicated to b")
        await sleep(1.2)  # the grace period
        # (b may have restarted rejoining, its last write more than the 1 s
        # grace period ago: its first sync only pulls and confirms nothing.)
        for node in (a, b, b):
            await self.sync(node)
        await self.until(lambda: self._purged_at_least(a, 1), "purged on a")
        await self.until(lambda: self._purged_at_least(b, 1), "purged on b")
        for node in (a, b):
            code, _, body = await self.call_json("GET", node.url + "/c/doomed")
            self.assertEqual((code, body["error"]), (404, "not_found"))
            code, _, metrics = await self.call("GET", node.url + "/metrics")
            self.assertIn(b"minstore_tombstones_purged_total 1.0", metrics)
            code, _, body = await self.call_json("GET", node.url + "/_changes?since=0")
            self.assertNotIn("doomed", [c["uid"] for c in body["changes"]])

        # b put back from the backup: it holds the old record and no tombstone.
        await b.stop()
        shutil.rmtree(b.data_dir)
        shutil.copytree(backup, b.data_dir)
        await sleep(1.2)  # its last contact is now older than the grace period
        await b.start()
        status = await self.status(b)
        self.assertEqual(status["purge"]["rejoining"], [a.url])
        self.assertEqual(await self.held(b, "doomed"), 200)  # until its first sync
        await self.sync(b)
        await self.sync(a)
        await sleep(0.5)  # replication of b's feed after its old checkpoint, if any
        await self.sync(b)
        for node in (a, b):
            self.assertEqual(await self.held(node, "doomed"), 404)
            code, _, _ = await self.call("GET", node.url + "/c/doomed")
            self.assertEqual(code, 404)
            self.assertEqual(await self.held(node, "kept"), 200)
        self.assertIsNone((await self.status(b))["purge"]["rejoining"])

    @deferred_test
    async def test_never_purged_while_a_peer_is_down(self):
        """A's tombstone stays while its peer B is down, however long; once B is back and synced, it goes."""
        a, b = await self.start_cluster(2, args=self.ARGS + ["--storage", "sqlite"])
        code, _, _ = await self.call("POST", a.url + "/c/x", json={"value": 1})
        self.assertEqual(code, 200)
        await self.until(lambda: self._code_is(b, "x", 200), "replicated to b")
        await b.stop()
        code, _, _ = await self.call("DELETE", a.url + "/c/x")
        self.assertEqual(code, 200)
        await sleep(2.5)
        status = await self.status(a)
        self.assertGreater(status["purge"]["runs"], 3)
        self.assertEqual(status["purge"]["purged"], 0)
        code, _, _ = await self.call("GET", a.url + "/c/x?local=1")
        self.assertEqual(code, 404)
        code, _, changes = await self.call_json("GET", a.url + "/_changes?since=0")
        self.assertEqual([(c["uid"], c["deleted"]) for c in changes["changes"]], [("x", True)])
        await b.start()
        await self.until(lambda: self._code_is(b, "x", 404), "delete replicated to b")
        await self.until(lambda: self._purged_at_least(a, 1), "purged on a once b holds it")

    async def _has_peers(self, node):
        return bool((await self.status(node))["servers"]["peers"])

    async def _code_is(self, node, uid, code):
        return await self.held(node, uid) == code

    async def _purged_at_least(self, node, n):
        return await self.purged(node) >= n
