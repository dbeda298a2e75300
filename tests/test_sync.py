"""
Compare and synchronise (DESIGN section 4, L{minstore.cluster.sync}) in
memory: real nodes behind their real RecordAPI on a L{tests.fakes.FakeNetwork},
time on a Clock, storage inline.  The integration test with two twistd
nodes is L{SyncIntegrationTests}.
"""

import json
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from minstore.api import RecordAPI
from minstore.cluster import sync as sync_module
from minstore.cluster.peers import PeerClient
from minstore.interfaces import NEWER, WriteItem
from minstore.cluster.sync import BOTTOM, TOP, Sync, SyncIndex, SyncService, item_hash
from minstore.node import Node, run_inline
from minstore.storage.memory import MemoryStorage
from minstore.storage.sqlite import SQLiteStorage
from tests.fakes import JSON, T0, FakeNetwork, replica, tombstone, url
from tests.harness import NodeTestMixin, deferred_test, sleep


class Answering(Resource):
    """A peer that answers every request with the same bytes."""

    isLeaf = True

    def __init__(self, body, code=200):
        Resource.__init__(self)
        self.body = body
        self.code = code
        self.requests = []

    def render_POST(self, request):
        self.requests.append(request.path)
        request.setResponseCode(self.code)
        return self.body


class Net:
    def __init__(self, test):
        self.test = test
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = FakeNetwork()

    def add(self, name, peers=(), storage=None):
        return Member(self, name, peers, storage)

    def run_until_called(self, d, step=0.02, most=100):
        """Advance the clock a step at a time until ``d`` has fired; how many steps it took."""
        steps = 0
        while not d.called:
            self.test.assertLess(steps, most)
            self.clock.advance(step)
            steps += 1
        return steps


class Member:
    def __init__(self, net, name, peers, storage):
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
        self.sync = Sync(self.node, self.index, self.client, lambda: self.peers, net.clock, run_inline, timeout=5.0)
        self.api = RecordAPI(self.node, node_sync=self.sync)
        self.http = net.net.add(self.url, self.api.resource())

    def put(self, *records):
        """Store records or tombstones (bytes) as replicas, through the node."""
        for data in records:
            self.test.successResultOf(self.node.apply_replica(data))

    def load(self, records):
        """
        Store many in one storage write, as a node restored from a backup
        holds them: not through the node (so before any sync only).
        """
        items = []
        for data in records:
            r = json.loads(data)
            items.append(WriteItem(r["collection"], r["uid"], data, bool(r.get("deleted")), r["version"], False, NEWER))
        self.storage.write(items)

    def held(self):
        return {(c, u): v for c, u, v in self.storage.scan_versions(None, None, 10 ** 9)}

    def sync_with(self, other):
        return self.test.successResultOf(self.sync.sync(other.url))

    def post(self, path):
        d = self.http.post(self.url + path)
        self.http.flush()
        response = self.test.successResultOf(d)
        return response.code, json.loads(self.test.successResultOf(response.content()))


def newest(*members):
    merged = {}
    for m in members:
        for key, v in m.held().items():
            if key not in merged or v > merged[key]:
                merged[key] = v
    return merged


class ReconcileTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.a = self.net.add("a", ["b"])
        self.b = self.net.add("b", ["a"])

    def fill(self, n, *members):
        records = [replica("u%05d" % i, i) for i in range(n)]
        for m in members:
            m.load(records)

    def test_identical_sets(self):
        """Identical nodes confirm in one round trip, under 1 KB, with no record sent."""
        self.fill(2000, self.a, self.b)
        report = self.a.sync_with(self.b)
        self.assertIsNone(report["error"])
        self.assertEqual(report["round_trips"], 1)
        self.assertLess(report["metadata_bytes"], 1024)
        self.assertEqual((report["pulled"], report["pushed"], report["record_bytes"]), (0, 0, 0))

    def test_empty_sides(self):
        """Two empty nodes: one round trip, nothing sent."""
        report = self.a.sync_with(self.b)
        self.assertEqual((report["round_trips"], report["pulled"], report["pushed"]), (1, 0, 0))

    def test_one_difference_each_way(self):
        """A record only on A is pushed, one only on B is pulled, byte for byte."""
        self.fill(3000, self.a, self.b)
        only_a, only_b = replica("only-a", 5000), replica("only-b", 5001)
        self.a.put(only_a)
        self.b.put(only_b)
        report = self.a.sync_with(self.b)
        self.assertIsNone(report["error"])
        self.assertEqual((report["pulled"], report["pushed"]), (1, 1))
        self.assertEqual(self.a.held(), self.b.held())
        self.assertEqual(self.a.storage.get("c", "only-b"), only_b)
        self.assertEqual(self.b.storage.get("c", "only-a"), only_a)
        self.assertEqual(report["record_bytes"], len(only_a) + len(only_b))
        self.assertLessEqual(report["round_trips"], 7)
        # And then they are equal: one round trip.
        self.assertEqual(self.b.sync_with(self.a)["round_trips"], 1)

    def test_newer_version_wins_both_ways(self):
        """Where each side has the newer version of a different uid, both end with the newer of each."""
        self.fill(500, self.a, self.b)
        self.a.put(replica("u00010", 9000, "a-newer"))
        self.b.put(replica("u00020", 9000, "b-newer"))
        report = self.b.sync_with(self.a)
        self.assertEqual((report["pulled"], report["pushed"]), (1, 1))
        for m in (self.a, self.b):
            self.assertEqual(json.loads(m.storage.get("c", "u00010"))["value"], "a-newer")
            self.assertEqual(json.loads(m.storage.get("c", "u00020"))["value"], "b-newer")

    def test_tombstone_wins_over_older_record(self):
        """A delete made after a record's version wins on both sides; the record does not come back."""
        self.a.put(replica("x", 100))
        self.b.put(replica("x", 100))
        self.b.put(tombstone("x", 200))
        self.a.sync_with(self.b)
        self.assertTrue(json.loads(self.a.storage.get("c", "x"))["deleted"])
        self.a.sync_with(self.b)
        self.b.sync_with(self.a)
        self.assertTrue(json.loads(self.b.storage.get("c", "x"))["deleted"])

    def test_tombstone_loses_to_newer_record(self):
        """A record written after a delete wins over the tombstone, from either side."""
        self.a.put(tombstone("x", 200))
        self.b.put(replica("x", 300, "again"))
        report = self.a.sync_with(self.b)
        self.assertEqual(report["pulled"], 1)
        self.assertEqual(json.loads(self.a.storage.get("c", "x"))["value"], "again")
        self.assertEqual(self.b.sync_with(self.a)["pushed"], 0)

    def test_never_older_over_newer(self):
        """An older version held by the peer never replaces a newer one, whoever syncs."""
        self.a.put(replica("x", 500, "new"))
        self.b.put(replica("x", 100, "old"))
        self.b.sync_with(self.a)
        self.a.sync_with(self.b)
        for m in (self.a, self.b):
            self.assertEqual(json.loads(m.storage.get("c", "x"))["value"], "new")

    def test_new_peer_gets_everything(self):
        """An empty peer gets a full copy, records and tombstones, in one range round and pushes."""
        self.fill(2500, self.a)
        self.a.put(tombstone("u00007", 9000))
        report = self.a.sync_with(self.b)
        self.assertIsNone(report["error"])
        self.assertEqual(report["pushed"], 2500)
        self.assertEqual(self.a.held(), self.b.held())
        self.assertEqual(self.b.storage.get("c", "u00007"), self.a.storage.get("c", "u00007"))

    def test_empty_node_pulls_everything(self):
        """An empty node syncing with a full one pulls it all, in pages."""
        self.fill(2500, self.b)
        report = self.a.sync_with(self.b)
        self.assertIsNone(report["error"])
        self.assertEqual(report["pulled"], 2500)
        self.assertEqual(self.a.held(), self.b.held())

    def test_random_differences_of_every_kind(self):
        """
        Random differences of every kind (only on A, only on B, newer on
        either, deleted on either, in several collections) converge in one
        sync, from either side, to the newer version of every key.
        """
        rng = random.Random(14)
        for initiator in ("a", "b"):
            net = Net(self)
            a, b = net.add("a", ["b"]), net.add("b", ["a"])
            keys = [("c%d" % rng.randrange(3), "k%06d" % rng.randrange(10 ** 6)) for _ in range(4000)]
            on_a, on_b = [], []
            for i, (c, u) in enumerate(keys):
                common = replica(u, 1000 + i, collection=c)
                roll = rng.random()
                if roll < 0.9:
                    on_a.append(common)
                    on_b.append(common)
                elif roll < 0.92:
                    on_a.append(common)
                elif roll < 0.94:
                    on_b.append(common)
                elif roll < 0.96:
                    on_a.append(common)
                    on_b.append(replica(u, 900000 + i, "newer-b", collection=c))
                elif roll < 0.98:
                    on_b.append(common)
                    on_a.append(tombstone(u, 900000 + i, collection=c))
                else:
                    on_a.append(common)
                    on_b.append(tombstone(u, 900000 + i, collection=c))
            a.load(on_a)
            b.load(on_b)
            expected = newest(a, b)
            first, second = (a, b) if initiator == "a" else (b, a)
            report = first.sync_with(second)
            self.assertIsNone(report["error"])
            self.assertEqual(a.held(), expected)
            self.assertEqual(b.held(), expected)
            self.assertGreater(report["pulled"], 0)
            self.assertGreater(report["pushed"], 0)
            for key in expected:
                self.assertEqual(a.storage.get(*key), b.storage.get(*key))

    def test_pulled_records_land_in_the_feed(self):
        """What a sync stores goes through the replica path: it is in the change feed."""
        self.b.put(replica("x", 100))
        before = self.a.storage.last_seq()
        self.a.sync_with(self.b)
        changes, _ = self.a.storage.changes(before, 10)
        self.assertEqual([c.uid for c in changes], ["x"])

    def test_repeated_sync_reads_only_what_changed(self):
        """After a sync, one more write costs the next sync a block re-read, not the whole key space."""
        self.fill(5000, self.a, self.b)
        self.a.sync_with(self.b)
        self.a.put(replica("late", 99999))
        scanned = (self.a.index.scanned, self.b.index.scanned)
        report = self.a.sync_with(self.b)
        self.assertEqual(report["pushed"], 1)
        self.assertLess(self.a.index.scanned - scanned[0], 1500)
        self.assertLess(self.b.index.scanned - scanned[1], 1500)


class BudgetTests(SynchronousTestCase):
    def test_many_differences_few_round_trips(self):
        """
        50 differences of each kind among 30,000 records converge in at
        most 5 round trips and under 300 bytes of metadata a difference.
        """
        net = Net(self)
        a, b = net.add("a", ["b"]), net.add("b", ["a"])
        n, d = 30000, 50
        common = [replica("u%06d" % i, i) for i in range(n)]
        a.load(common)
        b.load(common)
        picks = iter(range(0, n, n // (4 * d + 1)))
        for i in range(d):
            a.put(replica("only-a-%03d" % i, n + i), replica("u%06d" % next(picks), 10 ** 7 + i, "newer-a"))
            b.put(replica("only-b-%03d" % i, n + i), replica("u%06d" % next(picks), 10 ** 7 + i, "newer-b"))
            (a if i % 2 else b).put(tombstone("u%06d" % next(picks), 10 ** 7 + i))
        expected = newest(a, b)
        report = a.sync_with(b)
        self.assertIsNone(report["error"])
        self.assertEqual((a.held(), b.held()), (expected, expected))
        self.assertEqual((report["pulled"], report["pushed"]), (2.5 * d, 2.5 * d))
        self.assertLessEqual(report["round_trips"], 5)
        self.assertLess(report["metadata_bytes"], 300 * 5 * d)
        self.assertEqual(b.sync_with(a)["round_trips"], 1)

    def test_paced(self):
        """With a pace, a sync waits on the node's clock after each chunk of work, as long as it took (times the pace)."""
        net = Net(self)
        a, b = net.add("a", ["b"]), net.add("b", ["a"])
        a.load([replica("u%05d" % i, i) for i in range(3000)])
        ticks = iter(range(10 ** 6))
        a.sync.now = lambda: next(ticks) * 0.01
        a.sync.pace = 2.0
        d = a.sync.sync(b.url)
        self.assertGreater(net.run_until_called(d), 1)
        self.assertEqual(self.successResultOf(d)["pushed"], 3000)
        self.assertEqual(a.held(), b.held())

    def test_paced_only_while_clients_come(self):
        """
        With the node's client count given, a chunk during which no client
        request came is not followed by a wait (the sync ends without the
        clock moving); one during which clients came is.
        """
        net = Net(self)
        a, b = net.add("a", ["b"]), net.add("b", ["a"])
        a.load([replica("u%05d" % i, i) for i in range(3000)])
        ticks = iter(range(10 ** 6))
        a.sync.now = lambda: next(ticks) * 0.01
        a.sync.pace = 2.0
        a.sync.clients = lambda: a.api.client_requests
        d = a.sync.sync(b.url)
        self.assertEqual(self.successResultOf(d)["pushed"], 3000)

        b.load([replica("v%05d" % i, i) for i in range(3000)])
        # A client request (a GET through the API) during every chunk.
        work = a.sync.in_thread

        def with_a_client(f, *args):
            a.http.get(a.url + "/c/u00001")
            return work(f, *args)

        a.sync.in_thread = with_a_client
        d = a.sync.sync(b.url)
        self.assertNoResult(d)
        self.assertGreater(net.run_until_called(d), 0)
        self.assertEqual(self.successResultOf(d)["pulled"], 3000)
        self.assertGreater(a.api.client_requests, 0)
        self.assertEqual(a.held(), b.held())


class CodecTests(SynchronousTestCase):
    def test_round_trip(self):
        """A message decodes to what was encoded: bounds (front-coded, any text), modes, counts, ids, records."""
        rng = random.Random(7)
        uids = sorted(set("".join(rng.choice("ab\u00e9\U0001f600/ \x00z") for _ in range(rng.randrange(1, 6))) for _ in range(300)))
        keys = sorted(("c%d" % rng.randrange(3), u) for u in uids)
        bounds = [BOTTOM] + sorted(set(keys)) + [TOP]
        entries = []
        for lo, hi in zip(bounds, bounds[1:]):
            mode = rng.choice([sync_module.FP, sync_module.IDS, sync_module.WANT, sync_module.FP])
            if mode == sync_module.FP:
                payload = (rng.randrange(10 ** 7), rng.getrandbits(32))
            else:
                payload = [rng.getrandbits(32) for _ in range(rng.randrange(5))]
            entries.append((lo, hi, mode, payload))
        records = [replica("r%d" % i, i) for i in range(5)]
        body = sync_module.encode_message(12345, 3, entries, records)
        message = sync_module.decode_message(body)
        self.assertEqual((message.salt, message.stored, message.records), (12345, 3, records))
        self.assertEqual(message.entries, entries)

    def test_skips_merge(self):
        """Consecutive settled ranges travel as one."""
        entries = [(BOTTOM, ("c", "a"), 0, None), (("c", "a"), ("c", "b"), 0, None), (("c", "b"), TOP, 0, None)]
        message = sync_module.decode_message(sync_module.encode_message(1, 0, entries, []))
        self.assertEqual(message.entries, [(BOTTOM, TOP, 0, None)])


class IndexTests(SynchronousTestCase):
    def test_fingerprints_match_a_scan(self):
        """
        The fingerprint of any range, from the blocks kept up to date on
        each write, is what a scan of the range gives.
        """
        rng = random.Random(3)
        storage = MemoryStorage()
        node = Node(storage, node_id="n")
        index = SyncIndex(storage)
        node.commit_observers.append(index)
        index.warm()
        for step in range(6):
            for i in range(700):
                uid = "k%05d" % rng.randrange(5000)
                d = node.apply_replica(replica(uid, step * 10000 + i, collection=rng.choice("xy")))
                self.successResultOf(d)
            rows = storage.scan_versions(None, None, 10 ** 6)
            keys = [(c, u) for c, u, _ in rows]
            for _ in range(30):
                lo, hi = sorted(rng.sample([BOTTOM, TOP] + keys, 2))
                want_n, want_fp = 0, 0
                for c, u, v in rows:
                    if lo < (c, u) <= hi:
                        want_n += 1
                        want_fp ^= item_hash(c, u, v)
                self.assertEqual(index.fingerprint(lo, hi), (want_n, want_fp))
        self.assertGreater(index.blocks(), 10)


class BadPeerTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.a = self.net.add("a", ["b"])
        self.a.put(replica("x", 100))

    def bad_peer(self, body, code=200):
        peer = Answering(body, code)
        self.net.net.add(url("b"), peer)
        return peer

    def test_malformed_answers(self):
        """A peer answering nonsense fails the sync with a logged error; nothing is stored or sent."""
        answers = [
            b"not json",
            b"[]",
            b'{"ranges": "x"}',
            b'{"ranges": []}',
            b'{"ranges": [{"bogus": 1}]}',
            b'{"ranges": [{"items": [["c"]], "more": null}]}',
            b'{"ranges": [{"split": [[null, 1, "00"]]}]}',
            b'{"ranges": [{"split": [[["c", "z"], 1, "0000000000000000"], [["c", "a"], 1, "0000000000000000"]]}]}',
            b"x" * (sync_module.MAX_ANSWER + 1),
            b"\x02" + b"\x00" * 8,
            sync_module.encode_message(1, 0, [(BOTTOM, TOP, sync_module.SKIP, None)], []),  # another salt
            sync_module.encode_message(1, 0, [(BOTTOM, ("c", "m"), sync_module.SKIP, None)], []),
        ]
        for body in answers:
            peer = self.bad_peer(body)
            report = self.successResultOf(self.a.sync.sync(url("b")))
            self.assertIsNotNone(report["error"], body[:80])
            self.assertEqual((report["pulled"], report["pushed"]), (0, 0))
            self.assertTrue(all(b"replicas" not in p for p in peer.requests))
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.assertEqual(self.a.sync.last[url("b")]["failures"], len(answers))

    def test_peer_answering_an_error(self):
        """A peer answering 500 fails the sync; POST /_node/sync says 502 with the report."""
        self.bad_peer(b'{"error": "internal_error", "message": "boom"}', 500)
        code, body = self.a.post("/_node/sync")
        self.assertEqual(code, 502)
        self.assertEqual(body["error"], "sync_failed")
        self.assertIn("500", body["peers"][0]["error"])

    def test_split_that_never_ends(self):
        """A peer that cuts every range forever, never agreeing, is cut off after MAX_DEPTH rounds."""

        class Splitter(Resource):
            isLeaf = True

            def render_POST(self, request):
                message = sync_module.decode_message(request.content.read())
                out = []
                for lo, hi, mode, payload in message.entries:
                    if mode == sync_module.FP and hi != sync_module.TOP:
                        mid = (hi[0], hi[1][:-1]) if len(hi[1]) > 1 and (hi[0], hi[1][:-1]) > lo else None
                    else:
                        mid = ("c", (lo[1] if lo else "") + "m") if mode == sync_module.FP else None
                    if mid is None or not lo < mid < hi:
                        out.append((lo, hi, sync_module.FP, (5, 1)))
                        continue
                    out.append((lo, mid, sync_module.FP, (5, 1)))
                    out.append((mid, hi, sync_module.FP, (5, 2)))
                return sync_module.encode_message(message.salt, 0, out, [])

        self.net.net.add(url("b"), Splitter())
        report = self.successResultOf(self.a.sync.sync(url("b")))
        self.assertIn("no agreement", report["error"])
        self.assertEqual(report["round_trips"], sync_module.MAX_DEPTH + 1)

    def test_timeout(self):
        """A peer that never answers fails the sync after the time-out, on the node's clock."""
        self.net.net.hang(url("b"))
        d = self.a.sync.sync(url("b"))
        self.assertNoResult(d)
        self.net.clock.advance(5.1)
        report = self.successResultOf(d)
        self.assertIn("no answer within 5s", report["error"])

    def test_peer_down(self):
        """A peer that refuses connections fails the sync with the reason."""
        self.net.net.down(url("b"))
        report = self.successResultOf(self.a.sync.sync(url("b")))
        self.assertIn("ConnectionRefused", report["error"])


class RouteTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.a = self.net.add("a", ["b", "c"])
        self.b = self.net.add("b")
        self.c = self.net.add("c")
        self.a.put(replica("x", 100))

    def test_sync_one_peer(self):
        """POST /_node/sync?peer=URL syncs with that peer only and answers its report."""
        code, body = self.a.post("/_node/sync?peer=" + url("b"))
        self.assertEqual(code, 200)
        [report] = body["peers"]
        self.assertEqual(report["peer"], url("b"))
        for field in ("round_trips", "metadata_bytes", "record_bytes", "pulled", "pushed", "seconds"):
            self.assertIn(field, report)
        self.assertEqual(report["pushed"], 1)
        self.assertIsNotNone(self.b.storage.get("c", "x"))
        self.assertIsNone(self.c.storage.get("c", "x"))

    def test_sync_every_peer(self):
        """Without peer, every peer in turn."""
        code, body = self.a.post("/_node/sync")
        self.assertEqual(code, 200)
        self.assertEqual([r["peer"] for r in body["peers"]], [url("b"), url("c")])
        self.assertIsNotNone(self.c.storage.get("c", "x"))

    def test_unknown_peer(self):
        """A peer that is not one of the node's is a 400."""
        for peer in ("http://elsewhere:8001", "nonsense"):
            code, body = self.a.post("/_node/sync?peer=" + peer)
            self.assertEqual(code, 400)
            self.assertEqual(body["error"], "unknown_peer")

    def test_status_and_metrics(self):
        """/_node/status and /metrics show each peer's last sync."""
        self.a.node.status_sections["sync"] = self.a.sync.status
        self.a.node.metrics.registry.register(self.a.sync)
        self.a.post("/_node/sync?peer=" + url("b"))
        d = self.a.http.get(self.a.url + "/_node/status")
        status = json.loads(self.successResultOf(self.successResultOf(d).content()))
        [peer] = status["sync"]["peers"]
        self.assertEqual((peer["peer"], peer["pushed"], peer["error"], peer["syncs"]), (url("b"), 1, None, 1))
        d = self.a.http.get(self.a.url + "/metrics")
        text = self.successResultOf(self.successResultOf(d).content()).decode()
        self.assertIn('minstore_sync_runs_total{outcome="ok",peer="http://b:8001"} 1.0', text)
        self.assertIn('minstore_sync_last_differences{peer="http://b:8001"} 1.0', text)

    def test_malformed_requests(self):
        """The peer's side answers a malformed sync message 400 bad_sync_message."""
        good = sync_module.encode_message(3, 0, [(BOTTOM, TOP, sync_module.FP, (0, 0))], [])
        bodies = [
            b"",
            b"nope",
            b'{"ranges": [[null, null, 0, "0000000000000000"]]}',
            good[:-1],  # cut short
            good + b"\0",  # trailing bytes
            good[:1] + (2).to_bytes(8, "big") + good[9:],  # an even salt
            good[:12] + b"\0" + good[13:],  # no ranges (after the stored count, the horizon and withheld)
            good.replace(b"\x01\x00\x00\x00\x00\x00\x00", b"\x07\x00\x00\x00\x00\x00\x00"),  # unknown mode
            sync_module.encode_message(3, 0, [(BOTTOM, ("c", "b"), 1, (1, 1)), (("c", "b"), ("c", "a"), 1, (1, 1)), (("c", "a"), TOP, 0, None)], []),
            sync_module.encode_message(3, 0, [(BOTTOM, ("c", "x"), 0, None)], []),  # does not end at the top
        ]
        for body in bodies:
            d = self.b.http.post(self.b.url + "/_cluster/sync/ranges", data=body, headers=JSON)
            self.b.http.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 400, body)
            error = json.loads(self.successResultOf(response.content()))
            self.assertEqual(error["error"], "bad_sync_message", body)
        self.assertEqual(self.b.storage.get("c", "x"), None)

    def test_malformed_record_in_a_message(self):
        """A record in a message that is not one: 400, nothing stored."""
        body = sync_module.encode_message(3, 0, [(BOTTOM, TOP, sync_module.SKIP, None)], [b"{not a record"])
        d = self.b.http.post(self.b.url + "/_cluster/sync/ranges", data=body, headers=JSON)
        self.b.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(self.successResultOf(response.content()))["error"], "bad_replica")


class PeriodicTests(SynchronousTestCase):
    def test_interval(self):
        """--sync-interval: every peer synced each interval; a failing peer does not stop the loop."""
        net = Net(self)
        a = net.add("a", ["b", "dead"])
        b = net.add("b")
        net.net.down(url("dead"))
        service = SyncService(a.sync, 30.0, net.clock)
        service.startService()
        self.addCleanup(service.stopService)
        a.put(replica("x", 100))
        net.clock.advance(29)
        self.assertIsNone(b.storage.get("c", "x"))
        net.clock.advance(1)
        self.assertIsNotNone(b.storage.get("c", "x"))
        a.put(replica("y", 200))
        net.clock.advance(30)
        self.assertIsNotNone(b.storage.get("c", "y"))
        self.assertEqual(a.sync.last[url("dead")]["failures"], 2)
        self.assertEqual(a.sync.last[url("b")]["syncs"], 2)


class WarmTests(SynchronousTestCase):
    def start_recording(self, node, net):
        """Start a SyncService on ``node``; the functions it sends to the thread pool."""
        calls = []
        real = node.sync.in_thread
        node.sync.in_thread = lambda f, *args: calls.append(f) or real(f, *args)
        service = SyncService(node.sync, 0, net.clock)
        service.startService()
        self.addCleanup(service.stopService)
        return calls

    def test_fingerprints_read_at_start_with_peers(self):
        """A node with peers reads its fingerprints when it starts, so that its first sync is quick."""
        net = Net(self)
        a = net.add("a", ["b"])
        net.add("b")
        calls = self.start_recording(a, net)
        self.assertEqual(calls, [a.sync.index.warm])

    def test_no_read_at_start_without_peers(self):
        """
        A node without peers does not spend a core reading fingerprints
        while it starts serving; a peer's sync reads them when it needs them.
        """
        net = Net(self)
        a = net.add("a")
        b = net.add("b", ["a"])
        calls = self.start_recording(a, net)
        self.assertEqual(calls, [])
        a.put(replica("x", 100))
        b.sync_with(a)
        self.assertIsNotNone(b.storage.get("c", "x"))


class SQLiteSyncTests(SynchronousTestCase):
    def test_between_engines(self):
        """A memory node and a SQLite node agree on key order and converge."""
        net = Net(self)
        storage = SQLiteStorage(self.mktemp())
        a = net.add("a", ["b"], storage=storage)
        self.addCleanup(storage.close)
        b = net.add("b", ["a"])
        uids = ["a", "a\x00", "\u00e9", "\U0001f600", "Z", "a/b", "a b"] + ["u%04d" % i for i in range(300)]
        for i, uid in enumerate(uids):
            (a if i % 3 else b).put(replica(uid, i))
            if i % 5 == 0:
                (b if i % 3 else a).put(replica(uid, i))
        report = a.sync_with(b)
        self.assertIsNone(report["error"])
        self.assertEqual(a.held(), b.held())
        self.assertEqual(a.sync_with(b)["round_trips"], 1)


class SyncIntegrationTests(NodeTestMixin, TestCase):
    timeout = 120

    async def write(self, node, uid, value):
        code, _, _ = await self.call("PUT", node.url + "/c/" + uid, json={"value": value})
        if code == 404:
            code, _, _ = await self.call("POST", node.url + "/c/" + uid, json={"value": value})
        self.assertEqual(code, 200)

    async def listing(self, node):
        code, _, body = await self.call_json("GET", node.url + "/c/?limit=1000")
        self.assertEqual(code, 200)
        return body["items"]

    @deferred_test
    async def test_diverged_pair_and_a_peer_added_later(self):
        """
        Two nodes that took writes apart (and deletes) become equal after
        B is added to A's servers.list (SIGHUP) and A is asked to sync:
        the newer version of every uid on both, deletes included.
        """
        b = await self.start_node(name="b", args=["--storage", "sqlite"])
        a = await self.start_node(name="a", servers=[], args=["--storage", "files"])
        await self.write(b, "old-on-b", "b1")
        await self.write(a, "old-on-b", "a-newer")
        await self.write(a, "deleted-on-a", "x")
        await self.write(b, "deleted-on-a", "b-copy")
        code, _, _ = await self.call("DELETE", a.url + "/c/deleted-on-a")
        self.assertEqual(code, 200)
        await self.write(a, "newer-on-b", "a1")
        await self.write(b, "newer-on-b", "b-newer")
        for i in range(150):
            await self.write(a if i % 2 else b, "only-%03d" % i, i)

        a.set_servers([b.url])
        a.hup()
        for _ in range(100):
            _, _, status = await self.call_json("GET", a.url + "/_node/status")
            if status["servers"]["peers"] == [b.url]:
                break
            await sleep(0.05)
        code, _, bad = await self.call_json("POST", a.url + "/_node/sync?peer=http://127.0.0.1:1")
        self.assertEqual((code, bad["error"]), (400, "unknown_peer"))

        code, _, body = await self.call_json("POST", a.url + "/_node/sync?peer=" + b.url)
        self.assertEqual(code, 200, body)
        [report] = body["peers"]
        self.assertIsNone(report["error"])
        self.assertEqual(report["pulled"], 75 + 1)  # b's only-*, newer-on-b
        self.assertEqual(report["pushed"], 75 + 2)  # a's only-*, old-on-b, the tombstone

        on_a, on_b = await self.listing(a), await self.listing(b)
        self.assertEqual(on_a, on_b)
        self.assertEqual(len(on_a), 152)
        values = {r["uid"]: r["value"] for r in on_a}
        self.assertEqual((values["old-on-b"], values["newer-on-b"]), ("a-newer", "b-newer"))
        for node in (a, b):
            code, _, _ = await self.call("GET", node.url + "/c/deleted-on-a?local=1")
            self.assertEqual(code, 404)
        code, _, body = await self.call_json("POST", b.url + "/_node/sync")
        self.assertEqual((code, body["peers"]), (200, []))
        code, _, body = await self.call_json("POST", a.url + "/_node/sync")
        self.assertEqual(body["peers"][0]["round_trips"], 1)
        _, _, status = await self.call_json("GET", a.url + "/_node/status")
        self.assertEqual(status["sync"]["peers"][0]["syncs"], 2)
