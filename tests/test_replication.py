"""
Spreading (DESIGN section 4) in memory: mirroring to every peer, bridge
forwarding, coalescing, ordering by version, tombstones, back-off with
jitter, durable checkpoints, ``sync=1``, status and metrics, re-reading
servers.list.

Each node is a real L{Node} behind its real L{RecordAPI}, reached by its
peers through L{minstore.testing.fakes.FakeNetwork} (a StubTreq per host); time is a
L{Clock} (the fixture is L{minstore.testing.fakes.Cluster}).  Replication reads each
node's own storage feed (L{minstore.interfaces.IStorage.changes}); the
restart tests run over L{SQLiteStorage} in a directory.
"""

import json
import os

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from minstore.cluster.peers import PeerClient, PeerError
from minstore.cluster.replication import BATCH_RECORDS, DOWN_AFTER, Replication, backoff_delay
from minstore.cluster.servers import ServerList
from minstore.cluster.service import ClusterService
from minstore.node import Node, run_inline
from minstore.storage.memory import MemoryStorage
from minstore.testing.fakes import JSON, T0, Cluster, replica, tombstone, url, version


class LaterThread:
    """
    An ``in_thread`` like a thread pool's: the work is done at once, but its
    result reaches the reactor only on a later turn (``clock.advance(0)``),
    as through ``callFromThread``.
    """

    def __init__(self, clock):
        self.clock = clock

    def __call__(self, f, *args):
        d = Deferred()
        try:
            result = f(*args)
        except BaseException:
            self.clock.callLater(0, d.errback, Failure())
        else:
            self.clock.callLater(0, d.callback, result)
        return d


def stamp(name):
    """A process that marks the record with the name of the node that ran it."""

    def process(record):
        record = dict(record)
        record["stamped_by"] = name
        return record

    return process


class BackoffDelayTests(SynchronousTestCase):
    def test_bounds(self):
        """
        Retry n waits between half and all of base * 2^(n-1), capped: rng 0
        gives the lower bound, rng 1 the upper, 0.5 three quarters.
        """
        for n in range(1, 15):
            full = min(30.0, 0.25 * 2 ** (n - 1))
            self.assertEqual(backoff_delay(n, 0.25, 30.0, lambda: 0.0), full / 2)
            self.assertEqual(backoff_delay(n, 0.25, 30.0, lambda: 1.0), full)
            self.assertEqual(backoff_delay(n, 0.25, 30.0, lambda: 0.5), full * 0.75)
        self.assertEqual(backoff_delay(1, 0.25, 30.0, lambda: 1.0), 0.25)
        self.assertEqual(backoff_delay(4, 0.25, 30.0, lambda: 1.0), 2.0)
        self.assertEqual(backoff_delay(20, 0.25, 30.0, lambda: 1.0), 30.0)
        self.assertEqual(backoff_delay(20, 0.25, 30.0, lambda: 0.0), 15.0)


class FlakyClient:
    """A PeerClient stand-in: refuses while ``failing``, else stores nothing and says so."""

    def __init__(self, clock):
        self.clock = clock
        self.failing = True
        self.calls = []  # (time, peer, records)
        self.delivered = []

    async def send_replicas(self, peer, records, bridge=False, timeout=None):
        self.calls.append((self.clock.seconds(), peer, list(records)))
        if self.failing:
            raise ConnectionRefusedError("%s is down" % peer)
        self.delivered.extend(records)
        return len(records)


class RetryScheduleTests(SynchronousTestCase):
    def make(self, rng, base=1.0, cap=8.0):
        self.clock = Clock()
        self.clock.advance(T0)
        self.node = Node(MemoryStorage(), node_id="a", now=self.clock.seconds)
        self.client = FlakyClient(self.clock)
        self.replication = Replication(
            self.node,
            self.client,
            self.clock,
            run_inline,
            retry_base=base,
            retry_cap=cap,
            rng=rng,
        )
        self.replication.start(ServerList([url("b")]))
        self.addCleanup(self.replication.stop)
        return self.replication.peers[url("b")]

    def call_times(self):
        return [t - T0 for t, _, _ in self.client.calls]

    def test_schedule_doubles_to_the_cap(self):
        """
        A peer that always fails is retried after base, then doubling
        delays up to the cap (rng 1: no jitter taken off); it is "retrying"
        until DOWN_AFTER failures in a row, then "down", with last_error set.
        """
        peer = self.make(lambda: 1.0, base=1.0, cap=8.0)
        self.successResultOf(self.node.create("c", "x", 1))
        self.assertEqual(self.call_times(), [0.0])
        self.assertEqual(peer.state, "retrying")
        self.assertIn("ConnectionRefusedError", peer.last_error)

        expected = [0.0]
        states = []
        for delay in (1.0, 2.0, 4.0, 8.0, 8.0, 8.0):
            self.clock.advance(delay - 0.001)
            self.assertEqual(self.call_times(), expected, "retried before %s s" % delay)
            self.clock.advance(0.001)
            expected.append(expected[-1] + delay)
            self.assertEqual(self.call_times(), expected)
            states.append(peer.state)
        self.assertEqual(DOWN_AFTER, 5)
        self.assertEqual(states, ["retrying", "retrying", "retrying", "down", "down", "down"])
        self.assertEqual(peer.failures, 7)
        self.assertEqual(peer.errors, 7)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_jitter_takes_off_up_to_half(self):
        """With rng 0 every wait is half of the doubling delay."""
        self.make(lambda: 0.0, base=1.0, cap=8.0)
        self.successResultOf(self.node.create("c", "x", 1))
        for _ in range(6):
            self.clock.advance(0.25)
        self.assertEqual(self.call_times(), [0.0, 0.5, 1.5])
        self.clock.pump([0.5] * 20)
        self.assertEqual(self.call_times(), [0.0, 0.5, 1.5, 3.5, 7.5, 11.5])

    def test_back_up_delivers_everything(self):
        """
        Once the failing peer answers again, everything written meanwhile
        is delivered in one request (the newest version of each uid, in
        sequence order), it is "up" with a backlog of 0, failures reset,
        and its checkpoint is the last seq, saved an interval later.
        """
        peer = self.make(lambda: 1.0)
        self.successResultOf(self.node.create("c", "x", 1))
        for _ in range(DOWN_AFTER + 1):
            self.clock.advance(8.0)
        self.assertEqual(peer.state, "down")
        self.successResultOf(self.node.create("c", "y", 2))
        self.successResultOf(self.node.update("c", "x", 3))
        self.clock.advance(8.0)  # a retry fails again, and counts the feed
        self.assertEqual(peer.backlog, 2)
        calls = len(self.client.calls)

        self.client.failing = False
        self.clock.advance(8.0)
        self.assertEqual(len(self.client.calls), calls + 1)
        self.assertEqual(peer.state, "up")
        self.assertEqual(peer.failures, 0)
        self.assertEqual(peer.backlog, 0)
        self.assertEqual(peer.checkpoint, self.node.storage.last_seq())
        self.assertEqual(peer.checkpoint, 3)
        self.assertEqual(peer.last_success, self.clock.seconds())
        self.assertEqual(
            self.client.delivered, [self.node.storage.get("c", "y"), self.node.storage.get("c", "x")]
        )
        self.clock.advance(Replication.CHECKPOINT_INTERVAL)
        self.assertEqual(self.node.storage.checkpoints(), {url("b"): 3})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_reads_the_feed_again(self):
        """
        A failed batch is not kept for the retry: the retry reads the feed
        again, so it carries what was written meanwhile, each uid once, at
        its newest version (ten updates while the peer is down: one change).
        """
        peer = self.make(lambda: 1.0)
        for n in range(10):
            self.successResultOf(self.node.create("c", "x", n) if n == 0 else self.node.update("c", "x", n))
        self.successResultOf(self.node.create("c", "y", 0))
        self.assertEqual([len(records) for _, _, records in self.client.calls], [1])
        self.assertIsNone(peer._batch)
        self.client.failing = False
        self.clock.advance(1.0)
        self.assertEqual(
            self.client.delivered, [self.node.storage.get("c", "x"), self.node.storage.get("c", "y")]
        )
        self.assertEqual(json.loads(self.client.delivered[0])["value"], 9)
        self.assertEqual(peer.sent, 2)

    def test_many_writes_while_down_hold_one_batch(self):
        """
        A peer down for 1,000 writes costs the emitter one batch at most:
        nothing the replicator holds grows with the backlog (each request
        carries at most BATCH_RECORDS, the failed one is not even kept),
        the backlog is counted from the feed, and once the peer is back the
        storage's feed delivers every uid once, at its newest version, in
        requests of at most BATCH_RECORDS.
        """
        peer = self.make(lambda: 1.0)
        uids = ["u%03d" % (n % 400) for n in range(1000)]  # 400 uids, most written 2 or 3 times
        for n, uid in enumerate(uids):
            if self.node.storage.get("c", uid) is None:
                self.successResultOf(self.node.create("c", uid, n))
            else:
                self.successResultOf(self.node.update("c", uid, n))
            if n % 100 == 0:
                self.clock.advance(1.0)  # retries come and fail while the writes go on
                for name, held in vars(peer).items():
                    if hasattr(held, "__len__") and not isinstance(held, str):
                        self.assertLessEqual(len(held), BATCH_RECORDS, name)
        self.assertEqual(self.node.storage.last_seq(), 1000)
        self.assertIsNone(peer._batch)
        self.assertTrue(all(len(records) <= BATCH_RECORDS for _, _, records in self.client.calls))
        self.clock.advance(8.0)
        self.assertEqual(peer.backlog, 400)
        self.assertEqual(self.replication.status()[0]["backlog"], 400)
        self.assertEqual(self.client.delivered, [])

        self.client.failing = False
        self.clock.advance(8.0)
        sizes = [len(records) for _, _, records in self.client.calls[-2:]]
        self.assertEqual(sizes, [BATCH_RECORDS, 400 - BATCH_RECORDS])
        delivered = [json.loads(data) for data in self.client.delivered]
        self.assertEqual(len(delivered), 400)
        self.assertEqual(sorted(r["uid"] for r in delivered), sorted(set(uids)))
        self.assertEqual(
            self.client.delivered, [self.node.storage.get("c", r["uid"]) for r in delivered]
        )
        # In the order of each uid's last write (the feed's sequence order).
        last_write = {uid: n for n, uid in enumerate(uids)}
        self.assertEqual([r["uid"] for r in delivered], sorted(last_write, key=last_write.get))
        self.assertEqual((peer.backlog, peer.checkpoint, peer.state), (0, 1000, "up"))

    def test_stop_cancels_the_retry(self):
        """stop() cancels a pending retry: no call is left on the clock, none is sent after."""
        self.make(lambda: 1.0)
        self.successResultOf(self.node.create("c", "x", 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.replication.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.client.calls), 1)


class SendIntervalTests(SynchronousTestCase):
    def test_one_request_per_interval_carries_what_arrived(self):
        """
        With send_interval, writes arriving within the interval after a send
        wait for it and go in one request; with 0, each goes at once.
        """
        cluster = Cluster(self)
        b = cluster.add("b")
        a = cluster.add("a", peers=["b"], send_interval=0.02)
        a.write("x", 1)
        cluster.advance(0)
        self.assertEqual(len(cluster.replica_posts("b")), 1)
        for uid in "yzw":
            a.write(uid, 1)
            cluster.advance(0.005)
        self.assertEqual(len(cluster.replica_posts("b")), 1)  # 15 ms: still waiting
        cluster.advance(0.005)
        self.assertEqual(len(cluster.replica_posts("b")), 2)
        self.assertEqual(b.received_uids(), ["x", "y", "z", "w"])
        a.replication.stop()
        self.assertEqual(cluster.clock.getDelayedCalls(), [])

    def test_no_interval_sends_each_write_at_once(self):
        cluster = Cluster(self)
        cluster.add("b")
        a = cluster.add("a", peers=["b"])
        for uid in "xyz":
            a.write(uid, 1)
            cluster.advance(0)
        self.assertEqual(len(cluster.replica_posts("b")), 3)


class CountingStorage(MemoryStorage):
    """A MemoryStorage that records the checkpoints of each save."""

    def __init__(self):
        MemoryStorage.__init__(self)
        self.saves = []

    def save_checkpoints(self, checkpoints):
        self.saves.append(dict(checkpoints))
        return MemoryStorage.save_checkpoints(self, checkpoints)


class CheckpointSaveTests(SynchronousTestCase):
    """Checkpoints are saved once per CHECKPOINT_INTERVAL while peers acknowledge, not once per batch."""

    interval = Replication.CHECKPOINT_INTERVAL

    def make(self, peers=("b",), in_thread=run_inline):
        self.clock = Clock()
        self.clock.advance(T0)
        self.storage = CountingStorage()
        self.node = Node(self.storage, node_id="a", now=self.clock.seconds)
        self.client = FlakyClient(self.clock)
        self.client.failing = False
        self.replication = Replication(self.node, self.client, self.clock, in_thread)
        self.replication.start(ServerList([url(p) for p in peers]))
        # Peers seen for the first time are saved at once, at start.
        self.assertEqual(self.storage.saves, [{url(p): 0 for p in peers}])
        del self.storage.saves[:]
        self.addCleanup(self.replication.stop)

    def test_interval(self):
        self.assertEqual(Replication.CHECKPOINT_INTERVAL, 1.0)

    def test_known_peers_not_saved_at_start(self):
        """A start whose peers all have a saved checkpoint saves nothing; one that drops a peer saves at once."""
        self.make(peers=("b", "c"))
        self.successResultOf(self.node.create("c", "x", 1))
        self.successResultOf(self.replication.stop())
        self.assertEqual(self.storage.saves, [{url("b"): 1, url("c"): 1}])
        again = Replication(self.node, self.client, self.clock, run_inline)
        again.start(ServerList([url("b"), url("c")]))
        self.assertEqual(len(self.storage.saves), 1)
        self.assertEqual({u: r.checkpoint for u, r in again.peers.items()}, {url("b"): 1, url("c"): 1})
        self.successResultOf(again.stop())
        third = Replication(self.node, self.client, self.clock, run_inline)
        third.start(ServerList([url("b")]))
        self.addCleanup(third.stop)
        self.assertEqual(self.storage.checkpoints(), {url("b"): 1})

    def test_many_deliveries_one_save(self):
        """
        Twenty batches acknowledged within the interval cause no save until
        the interval after the first has passed, then one, with the last
        checkpoint; nothing more while nothing more is delivered.
        """
        self.make()
        for n in range(20):
            self.successResultOf(self.node.create("c", "u%d" % n, n))
            self.clock.advance(self.interval / 40)
        self.assertEqual(len(self.client.calls), 20)
        self.assertEqual(self.storage.saves, [])
        self.assertEqual(self.storage.checkpoints(), {url("b"): 0})
        self.clock.advance(self.interval / 2 - 0.001)
        self.assertEqual(self.storage.saves, [])
        self.clock.advance(0.001)
        self.assertEqual(self.storage.saves, [{url("b"): 20}])
        self.assertEqual(self.storage.checkpoints(), {url("b"): 20})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10 * self.interval)
        self.assertEqual(len(self.storage.saves), 1)

    def test_next_save_after_the_interval(self):
        """A delivery after a save schedules the next one an interval later, not sooner."""
        self.make()
        self.successResultOf(self.node.create("c", "x", 1))
        self.clock.advance(self.interval)
        self.assertEqual(self.storage.saves, [{url("b"): 1}])
        self.clock.advance(5.0)
        self.successResultOf(self.node.create("c", "y", 1))
        self.clock.advance(self.interval - 0.001)
        self.assertEqual(len(self.storage.saves), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.storage.saves, [{url("b"): 1}, {url("b"): 2}])

    def test_steady_deliveries_save_once_per_interval(self):
        """Under a steady flow of deliveries there is one save per interval."""
        self.make()
        for n in range(40):
            self.successResultOf(self.node.create("c", "u%d" % n, n))
            self.clock.advance(self.interval / 4)
        self.assertEqual(len(self.client.calls), 40)
        self.assertEqual(len(self.storage.saves), 10)
        seqs = [save[url("b")] for save in self.storage.saves]
        self.assertEqual(seqs, sorted(seqs))

    def test_save_in_a_thread(self):
        """
        With saves run in a thread pool, a save that falls due while the
        previous one is still running follows it, with the newer
        checkpoints; two never run at once.
        """
        pool = []  # (f, args, Deferred) of the saves handed to the "thread pool", not run yet

        def in_thread(f, *args):
            if f != self.storage.save_checkpoints:
                return run_inline(f, *args)  # the feed's reads: at once
            d = Deferred()
            pool.append((f, args, d))
            return d

        def run_one():
            f, args, d = pool.pop(0)
            d.callback(f(*args))

        self.make(in_thread=in_thread)
        self.successResultOf(self.node.create("c", "x", 1))
        self.clock.advance(self.interval)
        self.assertEqual(len(pool), 1)
        self.successResultOf(self.node.create("c", "y", 1))
        self.clock.advance(self.interval)
        self.assertEqual(len(pool), 1)  # the second waits for the first
        run_one()
        self.assertEqual(self.storage.saves, [{url("b"): 1}])
        self.assertEqual(len(pool), 1)
        run_one()
        self.assertEqual(self.storage.saves, [{url("b"): 1}, {url("b"): 2}])
        self.assertEqual((pool, self.clock.getDelayedCalls()), ([], []))

    def test_unacknowledged_peer_keeps_its_checkpoint(self):
        """
        A save records each peer's own checkpoint: a peer that is sent
        nothing more stays at what it acknowledged while the other moves on.
        """
        self.make(peers=("b", "c"))
        for n in range(1, 4):
            self.successResultOf(self.node.create("c", "u%d" % n, n))
        self.clock.advance(self.interval)
        self.assertEqual(self.storage.checkpoints(), {url("b"): 3, url("c"): 3})
        self.replication.peers[url("c")].stop()  # c is sent nothing more
        for n in range(4, 6):
            self.successResultOf(self.node.create("c", "u%d" % n, n))
        self.clock.advance(self.interval)
        self.assertEqual(self.storage.checkpoints(), {url("b"): 5, url("c"): 3})

    def test_reconfigure_saves_at_once(self):
        """
        Adding or removing a peer saves the checkpoints at once (an added
        peer must be saved before a crash), replacing a save that was
        due; no second save follows.
        """
        self.make()
        self.successResultOf(self.node.create("c", "x", 1))
        self.replication.reconfigure(ServerList([url("b"), url("c")]))
        self.assertEqual(self.storage.saves, [{url("b"): 1, url("c"): 1}])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.replication.reconfigure(ServerList([url("c")]))
        self.assertEqual(self.storage.saves[-1], {url("c"): 1})
        self.clock.advance(10 * self.interval)
        self.assertEqual(len(self.storage.saves), 2)

    def test_stop_makes_the_final_save(self):
        """
        stop() cancels the save that was due and makes the final one at
        once, with the current checkpoints (its Deferred fires once it is
        done); nothing is left on the clock and no save runs after it.
        """
        self.make()
        self.successResultOf(self.node.create("c", "x", 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.replication.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.storage.saves, [{url("b"): 1}])
        self.clock.advance(10 * self.interval)
        self.assertEqual(len(self.storage.saves), 1)


class MirrorTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b", processes=[stamp("b")])
        self.c = self.cluster.add("c", processes=[stamp("c")])
        self.a = self.cluster.add("a", peers=["b", "c"], processes=[stamp("a")])

    def test_create_reaches_every_peer(self):
        """
        A record created on the emitter is stored byte for byte on both
        receivers, as processed by the emitter (the receivers do not run
        their own processes).
        """
        data = self.a.write("x", {"title": "héllo"})
        self.assertEqual(json.loads(data)["stamped_by"], "a")
        self.assertEqual(self.b.stored("x"), data)
        self.assertEqual(self.c.stored("x"), data)
        self.assertEqual(len(self.cluster.all_replica_posts()), 2)

    def test_api_writes_reach_every_peer(self):
        """POST, PUT and DELETE through the emitter's RecordAPI reach both receivers; a deleted record is 404 there."""
        response, body = self.a.request("POST", "/c/x", {"value": "one"})
        self.assertEqual(response.code, 200)
        for receiver in (self.b, self.c):
            self.assertEqual(receiver.stored("x"), body)

        response, body = self.a.request("PUT", "/c/x", {"value": "two"})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["value"], "two")
        for receiver in (self.b, self.c):
            self.assertEqual(receiver.stored("x"), body)
            response, got = receiver.request("GET", "/c/x")
            self.assertEqual((response.code, got), (200, body))

        response, _ = self.a.request("DELETE", "/c/x")
        self.assertEqual(response.code, 200)
        for receiver in (self.b, self.c):
            self.assertEqual(receiver.stored("x"), self.a.stored("x"))
            self.assertTrue(json.loads(receiver.stored("x"))["deleted"])
            response, _ = receiver.request("GET", "/c/x")
            self.assertEqual(response.code, 404)

    def test_receiver_does_not_pass_on(self):
        """Without bridge=1 a receiver stores the replica and sends it nowhere."""
        d = self.cluster.add("d")
        self.b.replication.reconfigure(ServerList([url("d")]))
        self.a.write("x", 1)
        self.assertEqual(d.stored("x"), None)
        self.assertEqual(self.cluster.replica_posts("d"), [])
        self.assertEqual([forward for _, forward, _ in self.b.received], [False])
        # b's feed holds the replica, not flagged to pass on: b owes d nothing.
        changes, _ = self.b.storage.changes(0, 10)
        self.assertEqual([(c.uid, c.forward) for c in changes], [("x", False)])
        self.assertEqual(self.b.storage.changes(0, 10, forwarded_only=True)[0], [])
        self.cluster.advance(60)
        self.assertEqual(self.cluster.replica_posts("d"), [])
        self.assertEqual(self.b.replication.status()[0]["backlog"], 0)

    def test_coalescing_while_down(self):
        """
        While a peer is failing, ten updates of one uid leave it a backlog of
        one; back up, it receives only the newest version, in one request.
        """
        self.cluster.net.down(self.c.url)
        for n in range(10):
            data = self.a.write("x", n)
        peer_c = self.a.replication.peers[self.c.url]
        self.assertEqual(peer_c.backlog, 1)
        self.assertEqual(self.a.replication.status()[1]["backlog"], 1)
        self.assertEqual(len(self.b.received), 10)
        failed = len(self.cluster.replica_posts("c"))

        self.cluster.net.up(self.c.url)
        self.cluster.advance(8.0)
        self.assertEqual(len(self.cluster.replica_posts("c")), failed + 1)
        self.assertEqual(self.c.received, [(data, False, True)])
        self.assertEqual(self.c.stored("x"), data)
        self.assertEqual(json.loads(data)["value"], 9)

    def test_order_per_uid(self):
        """
        Each receiver gets the versions of a uid in increasing order, each
        applied, whether delivered at once or after a failure.
        """
        self.cluster.net.down(self.c.url)
        for n in range(5):
            self.a.write("x", n)
            self.a.write("y", n)
            if n == 2:
                self.cluster.net.up(self.c.url)
                self.cluster.advance(8.0)
                self.cluster.net.down(self.c.url)
        self.cluster.net.up(self.c.url)
        self.cluster.advance(8.0)
        for receiver in (self.b, self.c):
            for uid in ("x", "y"):
                versions = [
                    json.loads(data)["version"]
                    for data, _, _ in receiver.received
                    if json.loads(data)["uid"] == uid
                ]
                self.assertEqual(versions, sorted(versions))
                self.assertEqual(len(set(versions)), len(versions))
                self.assertEqual(receiver.stored(uid), self.a.stored(uid))
            self.assertTrue(all(applied for _, _, applied in receiver.received))
        self.assertEqual(len(self.b.received), 10)
        self.assertLess(len(self.c.received), 10)

    def test_status(self):
        """status() lists each peer: url, state, backlog and the age of its oldest undelivered write."""
        self.cluster.net.down(self.c.url)
        self.a.write("x", 1)
        self.cluster.advance(0.5)
        self.a.write("y", 1)
        self.cluster.advance(2.0)
        status = {s["url"]: s for s in self.a.replication.status()}
        self.assertEqual(list(status), [self.b.url, self.c.url])
        self.assertEqual(
            {k: status[self.b.url][k] for k in ("state", "backlog", "oldest_undelivered_age")},
            {"state": "up", "backlog": 0, "oldest_undelivered_age": 0.0},
        )
        self.assertEqual(
            {k: status[self.c.url][k] for k in ("state", "backlog", "oldest_undelivered_age")},
            {"state": "retrying", "backlog": 2, "oldest_undelivered_age": 2.5},
        )
        self.assertEqual(status[self.b.url]["sent"], 2)
        self.assertIn("ConnectionRefusedError", status[self.c.url]["last_error"])

    def test_collect(self):
        """collect() yields the backlog and the lag in seconds of each peer, and whether it is up."""
        self.cluster.net.down(self.c.url)
        self.a.write("x", 1)
        self.cluster.advance(3.0)
        families = {f.name: f for f in self.a.replication.collect()}
        self.assertIn("minstore_replication_backlog", families)
        self.assertIn("minstore_replication_lag_seconds", families)

        def samples(name):
            return {s.labels["peer"]: s.value for s in families[name].samples}

        self.assertEqual(samples("minstore_replication_backlog"), {self.b.url: 0, self.c.url: 1})
        self.assertEqual(samples("minstore_replication_lag_seconds"), {self.b.url: 0.0, self.c.url: 3.0})
        self.assertEqual(samples("minstore_replication_peer_up"), {self.b.url: 1, self.c.url: 0})


class VersionOrderTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)
        self.node = self.cluster.add("r").node

    def apply(self, data):
        return self.successResultOf(self.node.apply_replica(data))

    def test_older_version_not_applied(self):
        """A replica older than (or as old as) the stored version is not applied: False, record unchanged."""
        new, old = replica("x", 20, "new"), replica("x", 10, "old")
        self.assertTrue(self.apply(new))
        self.assertFalse(self.apply(old))
        self.assertFalse(self.apply(new))
        self.assertEqual(self.node.storage.get("c", "x"), new)

    def test_newer_version_applied(self):
        """A newer replica replaces the stored record as it is."""
        self.assertTrue(self.apply(replica("x", 10, "old")))
        self.assertTrue(self.apply(replica("x", 20, "new")))
        self.assertEqual(self.node.storage.get("c", "x"), replica("x", 20, "new"))

    def test_tombstone_wins_over_old_replica(self):
        """
        After a delete (a tombstone), an older replica of the record does not
        bring it back: not applied, and GET is 404.
        """
        self.assertTrue(self.apply(replica("x", 10)))
        self.assertTrue(self.apply(tombstone("x", 20)))
        self.assertFalse(self.apply(replica("x", 15)))
        self.assertEqual(self.node.storage.get("c", "x"), tombstone("x", 20))
        self.failureResultOf(self.node.get("c", "x", local=True))
        self.assertTrue(self.apply(replica("x", 30, "again")))
        self.assertEqual(self.successResultOf(self.node.get("c", "x")).data, replica("x", 30, "again"))

    def test_replica_applied_without_a_read(self):
        """
        A replica is stored without reading storage first, whether the uid
        is held or not: the storage write's NEWER condition compares the
        versions in the same step (an older one is not stored).
        """
        reads = []
        storage = self.node.storage
        get = storage.get
        storage.get = lambda collection, uid: reads.append(uid) or get(collection, uid)
        self.assertTrue(self.apply(replica("x", 10)))
        self.node._cache.clear()
        self.assertFalse(self.apply(replica("x", 5)))
        self.assertTrue(self.apply(replica("x", 20)))
        self.node._cache.clear()
        self.assertFalse(self.apply(replica("x", 20)))
        self.assertEqual(reads, [])
        storage.get = get
        self.assertEqual(storage.get("c", "x"), replica("x", 20))
        self.assertEqual(storage.last_seq(), 2)

    def test_tombstone_arriving_first(self):
        """A tombstone for a uid never seen is kept, so the older record arriving after it is refused."""
        self.assertTrue(self.apply(tombstone("x", 20)))
        self.assertFalse(self.apply(replica("x", 10)))
        self.assertEqual(self.node.storage.get("c", "x"), tombstone("x", 20))

    def test_local_write_after_replica_is_newer(self):
        """A node's next write of a uid sorts after a replica it received (even from a clock ahead)."""
        self.assertTrue(self.apply(replica("x", 5000, "theirs")))
        mine = self.successResultOf(self.node.update("c", "x", "mine"))
        self.assertGreater(mine.version, version(5000))

    def test_replicas_route(self):
        """POST /_cluster/replicas takes NDJSON and answers how many were received and applied."""
        member = self.cluster.members["r"]
        body = b"\n".join([replica("x", 20), replica("x", 10), replica("y", 10), b""])
        d = member.http.post(
            member.url + "/_cluster/replicas", data=body, headers={b"content-type": [b"application/x-ndjson"]}
        )
        member.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            json.loads(self.successResultOf(response.content())), {"received": 3, "applied": 2}
        )
        self.assertEqual(self.node.storage.get("c", "x"), replica("x", 20))

    def test_a_peers_batch_is_one_storage_write(self):
        """The replicas of one request to uids not held are stored together: one write (one sync)."""
        member = self.cluster.members["r"]
        writes = []
        storage_write = self.node.storage.write
        self.node.storage.write = lambda items, checkpoints=None: (
            writes.append([item.uid for item in items]) or storage_write(items, checkpoints)
        )
        body = b"\n".join([replica(uid, 10) for uid in ("x", "y", "z")])
        d = member.http.post(member.url + "/_cluster/replicas", data=body)
        member.http.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(writes, [["x", "y", "z"]])

    def test_bad_replica_is_400(self):
        """A replica that is not a record is refused with 400, and the sender sees a PeerError."""
        member = self.cluster.members["r"]
        d = member.http.post(member.url + "/_cluster/replicas", data=b'{"nope": 1}\n')
        member.http.flush()
        self.assertEqual(self.successResultOf(d).code, 400)


class ConvergenceTests(SynchronousTestCase):
    def test_concurrent_writes_converge(self):
        """
        Two nodes that write the same uid while cut off from each other end
        with the same record, the one with the higher version, whichever
        replica arrives first.
        """
        cluster = Cluster(self)
        a = cluster.add("a", peers=["b"])
        b = cluster.add("b", peers=["a"])
        cluster.net.down(a.url)
        cluster.net.down(b.url)
        older_x = a.write("x", "a first")
        older_y = b.write("y", "b first")
        cluster.advance(0.01)
        newer_x = b.write("x", "b later")
        newer_y = a.write("y", "a later")
        self.assertLess(json.loads(older_x)["version"], json.loads(newer_x)["version"])
        cluster.net.up(a.url)
        cluster.net.up(b.url)
        cluster.advance(8.0)
        for node in (a, b):
            self.assertEqual(node.stored("x"), newer_x)
            self.assertEqual(node.stored("y"), newer_y)
        # The first to retry (a) sends its older x, which b refuses; b's
        # older y is never sent: the newer replica a sent took its place in
        # b's feed (the newest per uid), not flagged to pass on.
        self.assertEqual(b.received, [(older_x, False, False), (newer_y, False, True)])
        self.assertEqual(a.received, [(newer_x, False, True)])
        for node in (a, b):
            self.assertEqual([s["backlog"] for s in node.replication.status()], [0])


class BridgeTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)

    def test_bridge_chain(self):
        """
        A bridge sends bridge=1; a receiver of bridge=1 stores and passes the
        record on, with bridge=1 only when it is a bridge itself; a receiver
        without bridge=1 passes nothing on.
        """
        e = self.cluster.add("e")
        d = self.cluster.add("d", peers=["e"])
        c = self.cluster.add("c", peers=["d"])
        b = self.cluster.add("b", peers=["c"], bridge=True)
        a = self.cluster.add("a", peers=["b"], bridge=True)
        data = a.write("x", "through")
        self.assertEqual(
            self.cluster.all_replica_posts(),
            [
                url("b") + "/_cluster/replicas?bridge=1",
                url("c") + "/_cluster/replicas?bridge=1",
                url("d") + "/_cluster/replicas",
            ],
        )
        for node in (b, c, d):
            self.assertEqual(node.stored("x"), data)
        self.assertEqual(e.stored("x"), None)
        self.assertEqual([f for _, f, _ in b.received + c.received + d.received], [True, True, False])

    def test_bridge_receiver_not_bridge(self):
        """A receiver of bridge=1 whose own list has no '*' forwards without bridge=1."""
        c = self.cluster.add("c")
        b = self.cluster.add("b", peers=["c"])
        a = self.cluster.add("a", peers=["b"], bridge=True)
        data = a.write("x", 1)
        self.assertEqual(
            self.cluster.all_replica_posts(),
            [url("b") + "/_cluster/replicas?bridge=1", url("c") + "/_cluster/replicas"],
        )
        self.assertEqual(c.stored("x"), data)
        self.assertEqual(b.stored("x"), data)

    def test_cycle_ends(self):
        """
        A->B->A, both bridges: a write makes two replica requests and stops
        (the replica back at A is not newer), leaving the same record on
        both; an update and a delete do the same.
        """
        b = self.cluster.add("b", peers=["a"], bridge=True)
        a = self.cluster.add("a", peers=["b"], bridge=True)
        data = a.write("x", 1)
        self.cluster.advance(60)
        self.assertEqual(len(self.cluster.all_replica_posts()), 2)
        self.assertEqual(a.stored("x"), data)
        self.assertEqual(b.stored("x"), data)
        self.assertEqual(a.received, [(data, True, False)])

        data = b.write("x", 2)
        self.assertEqual(len(self.cluster.all_replica_posts()), 4)
        b.delete("x")
        self.cluster.advance(60)
        self.assertEqual(len(self.cluster.all_replica_posts()), 6)
        self.assertEqual(a.stored("x"), b.stored("x"))
        self.assertTrue(json.loads(a.stored("x"))["deleted"])
        for node in (a, b):
            self.assertEqual([s["backlog"] for s in node.replication.status()], [0])

    def test_three_node_cycle_ends(self):
        """A->B->C->A, all bridges: one write makes three replica requests and every node holds it."""
        c = self.cluster.add("c", peers=["a"], bridge=True)
        b = self.cluster.add("b", peers=["c"], bridge=True)
        a = self.cluster.add("a", peers=["b"], bridge=True)
        data = a.write("x", 1)
        self.cluster.advance(60)
        self.assertEqual(len(self.cluster.all_replica_posts()), 3)
        for node in (a, b, c):
            self.assertEqual(node.stored("x"), data)


    def test_bridge_forwarding_reads_the_feed(self):
        """
        A replica received with bridge=1 is stored flagged to pass on, so
        it is in the feed the node's replicators read and reaches its
        peers, even one that was down when it arrived; one received
        without bridge=1 is stored but never sent on.
        """
        c = self.cluster.add("c")
        b = self.cluster.add("b", peers=["c"])
        self.cluster.net.down(c.url)

        def post(body, query=""):
            d = b.http.post(
                b.url + "/_cluster/replicas" + query, data=body, headers={b"content-type": [b"application/x-ndjson"]}
            )
            b.http.flush()
            self.assertEqual(self.successResultOf(d).code, 200)

        post(replica("x", 10), "?bridge=1")
        post(replica("y", 10))
        changes, _ = b.storage.changes(0, 10)
        self.assertEqual([(ch.uid, ch.forward) for ch in changes], [("x", True), ("y", False)])
        self.assertEqual([ch.uid for ch in b.storage.changes(0, 10, forwarded_only=True)[0]], ["x"])
        self.assertEqual(b.replication.peers[c.url].backlog, 1)

        self.cluster.net.up(c.url)
        self.cluster.advance(8.0)
        self.assertEqual(c.received, [(replica("x", 10), False, True)])
        self.assertIsNone(c.stored("y"))
        self.assertEqual(b.replication.status()[0]["backlog"], 0)
        self.assertEqual(b.replication.peers[c.url].checkpoint, 2)


class HeldThreads:
    """
    An ``in_thread`` whose calls run when the test says, and whose results
    reach the reactor when the test says, in any order: two storage writes
    that finish in the reverse of the order they were made in.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self):
        """Run every queued call in order; their results and Deferreds, not fired yet."""
        done = []
        for f, args, d in self.calls:
            done.append((f(*args), d))
        self.calls = []
        return done

    def settle(self):
        """Run and fire every call, and those they make, until none is left."""
        while self.calls:
            for result, d in self.run_all():
                d.callback(result)


class OutOfOrderCommitTests(SynchronousTestCase):
    def test_later_batch_committed_first(self):
        """
        Two group commits in flight: the second, stored after the first,
        comes back to the reactor first.  The peer's checkpoint never passes
        a change it has not had (the feed holds both already), and it gets
        both.
        """
        threads = HeldThreads()
        cluster = Cluster(self)
        b = cluster.add("b")
        a = cluster.add("a", peers=["b"], in_thread=threads)
        threads.settle()  # the feed's read at start
        first = a.node.create("c", "x", 1)
        second = a.node.create("c", "y", 2)
        (x_result, x_done), (y_result, y_done) = threads.run_all()  # stored as seq 1, then seq 2
        y_done.callback(y_result)
        self.assertNoResult(first)
        self.assertEqual(a.replication.peers[b.url].checkpoint, 0)
        x_done.callback(x_result)
        threads.settle()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(b.received_uids(), ["x", "y"])
        self.assertEqual(a.replication.peers[b.url].checkpoint, 2)
        self.assertEqual(b.stored("x"), a.stored("x"))


class CheckpointTests(SynchronousTestCase):
    """A restart over the same SQLite data resumes every peer from its saved checkpoint."""

    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b")
        self.c = self.cluster.add("c")
        self.directory = self.mktemp()
        self.a = self.cluster.add("a", peers=["b", "c"], directory=self.directory)

    def restart_a(self, save=False, peers=("b", "c")):
        """
        Stop a (with replication's final save of the checkpoints when
        ``save``, else as after kill -9), close its storage, and start it
        again over the same directory.
        """
        self.a.close(save=save)
        for member in (self.b, self.c):
            del member.received[:]
        self.a = self.cluster.add("a", peers=peers, directory=self.directory)

    def test_restart_resends_only_unacknowledged(self):
        """
        After a restart over the same data, each peer is sent what it had
        not acknowledged, and nothing it had.
        """
        self.cluster.net.down(self.c.url)
        x, y = self.a.write("x", 1), self.a.write("y", 1)
        self.cluster.net.down(self.b.url)
        z = self.a.write("z", 1)
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 2, self.c.url: 0})

        self.cluster.net.up(self.b.url)
        self.cluster.net.up(self.c.url)
        self.restart_a()
        self.assertEqual([d for d, _, _ in self.b.received], [z])
        self.assertEqual([d for d, _, _ in self.c.received], [x, y, z])
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 3, self.c.url: 3})

        # And once everything is acknowledged, a restart sends nothing.
        self.restart_a(save=True)
        self.assertEqual((self.b.received, self.c.received), ([], []))
        self.assertEqual(self.a.write("w", 1), self.b.stored("w"))

    def test_clean_stop_saves_what_was_acknowledged(self):
        """
        A clean stop saves the checkpoints a delivery left waiting for the
        interval: the restarted node resends nothing, and then goes on.
        """
        self.a.write("x", 1)
        self.a.write("y", 1)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 0, self.c.url: 0})
        self.restart_a(save=True)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 2, self.c.url: 2})
        self.assertEqual((self.b.received, self.c.received), ([], []))
        z = self.a.write("z", 1)
        self.assertEqual((self.b.stored("z"), self.c.stored("z")), (z, z))

    def test_crash_before_the_save_resends(self):
        """
        A crash before the acknowledged batches' checkpoints were saved only
        makes the restarted node send those writes again: the peers do not
        apply them twice, and they end holding the same records.
        """
        x = self.a.write("x", 1)
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        y = self.a.write("y", 1)
        self.assertEqual(self.b.received_uids(), ["x", "y"])
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 1, self.c.url: 1})
        self.restart_a()  # no final save: as after kill -9
        for member in (self.b, self.c):
            self.assertEqual(member.received, [(y, False, False)])
            self.assertEqual((member.stored("x"), member.stored("y")), (x, y))
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 2, self.c.url: 2})

    def test_restart_before_any_delivery(self):
        """
        Writes stored before any peer ever acknowledged anything, then a
        crash: the restarted node still sends them (the peers were saved
        at checkpoint 0 when first seen).
        """
        self.cluster.net.down(self.b.url)
        self.cluster.net.down(self.c.url)
        x = self.a.write("x", 1)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 0, self.c.url: 0})
        self.cluster.net.up(self.b.url)
        self.cluster.net.up(self.c.url)
        self.restart_a()
        self.assertEqual([d for d, _, _ in self.b.received], [x])
        self.assertEqual([d for d, _, _ in self.c.received], [x])

    def test_restart_coalesces_what_the_peer_missed(self):
        """
        A peer down across the emitter's restart gets, once back, each uid
        it missed once, at its newest version (the emitter held nothing of
        it in memory; the feed had it), and the versions made after the
        restart sort after those made before.
        """
        self.cluster.net.down(self.c.url)
        for n in range(5):
            self.a.write("x", n)
            self.a.write("y", n)
        before = json.loads(self.a.stored("x"))["version"]
        self.restart_a(save=True)
        self.assertEqual(self.a.replication.peers[self.c.url].checkpoint, 0)
        x = self.a.write("x", "after")
        self.assertGreater(json.loads(x)["version"], before)
        self.cluster.net.up(self.c.url)
        self.cluster.advance(8.0)
        self.assertEqual(self.c.received_uids(), ["y", "x"])
        self.assertEqual((self.c.stored("x"), self.c.stored("y")), (x, self.a.stored("y")))
        self.assertTrue(all(applied for _, _, applied in self.c.received))

    def test_new_peer_at_restart_gets_only_later_writes(self):
        """A peer first listed at a restart is not sent the older writes, only those made after."""
        self.a.write("x", 1)
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        d = self.cluster.add("d")
        self.restart_a(save=True, peers=("b", "c", "d"))
        self.assertEqual(d.received, [])
        self.assertEqual(self.a.storage.checkpoints()[d.url], 1)
        y = self.a.write("y", 1)
        self.assertEqual([data for data, _, _ in d.received], [y])


class SyncTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b")
        self.c = self.cluster.add("c")
        self.a = self.cluster.add("a", peers=["b", "c"])

    def post_sync(self, uid, value):
        d = self.a.http.post(
            self.a.url + "/c/%s?sync=1" % uid, data=json.dumps({"value": value}).encode(), headers=JSON
        )
        self.a.http.flush()
        return d

    def test_sync_all_stored(self):
        """POST ?sync=1 answers once both peers stored the record: stored 2 of 2."""
        response = self.successResultOf(self.post_sync("x", 1))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"2"])
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-expected"), [b"2"])
        body = self.successResultOf(response.content())
        self.assertEqual(self.b.stored("x"), body)
        self.assertEqual(self.c.stored("x"), body)

    def test_sync_peer_down_times_out(self):
        """
        With one peer down, POST ?sync=1 waits for the sync timeout, then
        answers 200 with stored 1 of 2.
        """
        self.cluster.net.down(self.c.url)
        d = self.post_sync("x", 1)
        self.assertNoResult(d)
        self.cluster.advance(4.9)
        self.assertNoResult(d)
        self.cluster.advance(0.1)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-expected"), [b"2"])

    def test_sync_with_storage_in_a_thread(self):
        """
        With storage writes finishing on a later reactor turn (a thread
        pool), POST ?sync=1 with one peer down still waits for the timeout
        and says stored 1 of 2, and with both peers up says 2 of 2 only
        once both hold the record.
        """
        later = LaterThread(self.cluster.clock)
        a = self.cluster.add("a2", peers=["b", "c"], in_thread=later)
        self.cluster.net.down(self.c.url)
        d = a.http.post(a.url + "/c/x?sync=1", data=b'{"value": 1}', headers=JSON)
        for _ in range(10):
            self.cluster.advance(0)
        self.assertNoResult(d)
        self.cluster.advance(5.0)
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"1"])
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-expected"), [b"2"])

        self.cluster.net.up(self.c.url)
        self.cluster.advance(30.0)
        d = a.http.post(a.url + "/c/y?sync=1", data=b'{"value": 1}', headers=JSON)
        for _ in range(10):
            self.cluster.advance(0)
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"2"])
        body = self.successResultOf(response.content())
        self.assertEqual(self.b.stored("y"), body)
        self.assertEqual(self.c.stored("y"), body)

    def test_sync_waits_for_late_peer(self):
        """A sync write fires as soon as the late peer stores it, before the timeout."""
        self.cluster.net.down(self.c.url)
        entry = self.successResultOf(self.a.node.create("c", "x", 1))
        d = self.a.replication.wait_stored(entry.seq, 5.0)
        self.assertNoResult(d)
        self.cluster.net.up(self.c.url)
        self.cluster.advance(1.0)
        self.assertEqual(self.successResultOf(d), (2, 2))
        self.assertEqual(self.c.stored("x"), entry.data)

    def test_sync_newer_version_counts(self):
        """A peer that stored a newer version of the uid counts as holding the one waited for."""
        self.cluster.net.down(self.c.url)
        first = self.successResultOf(self.a.node.create("c", "x", 1))
        d = self.a.replication.wait_stored(first.seq, 5.0)
        self.a.write("x", 2)
        self.cluster.net.up(self.c.url)
        self.cluster.advance(1.0)
        self.assertEqual(self.successResultOf(d), (2, 2))

    def test_sync_pending_newer_version_does_not_count(self):
        """
        A peer with a newer version of the uid still pending (not delivered)
        does not count as holding the version waited for: the wait lasts
        until that newer version is delivered.
        """
        self.cluster.net.down(self.c.url)
        first = self.successResultOf(self.a.node.create("c", "x", 1))
        self.a.write("x", 2)
        d = self.a.replication.wait_stored(first.seq, 5.0)
        self.assertNoResult(d)
        self.assertEqual(self.c.stored("x"), None)
        self.cluster.net.up(self.c.url)
        self.cluster.advance(1.0)
        self.assertEqual(self.successResultOf(d), (2, 2))
        self.assertEqual(self.c.stored("x"), self.a.stored("x"))

    def test_sync_batch_in_flight(self):
        """
        A write in a batch being sent counts only once the peer acknowledges
        that batch; a newer version written meanwhile is waited for until
        its own batch is acknowledged.
        """
        sends = []  # (records, Deferred) of the sends not answered yet

        class HeldClient:
            def send_replicas(self, peer, records, bridge=False, timeout=None):
                d = Deferred()
                sends.append((list(records), d))
                return d

        clock = Clock()
        node = Node(MemoryStorage(), node_id="a", now=clock.seconds)
        replication = Replication(node, HeldClient(), clock, run_inline)
        replication.start(ServerList([url("b")]))
        self.addCleanup(replication.stop)

        first = self.successResultOf(node.create("c", "x", 1))
        waiting_first = replication.wait_stored(first.seq, 5.0)
        second = self.successResultOf(node.update("c", "x", 2))
        waiting_second = replication.wait_stored(second.seq, 5.0)
        self.assertEqual((first.seq, second.seq), (1, 2))
        self.assertEqual([records for records, _ in sends], [[first.data]])
        self.assertNoResult(waiting_first)
        self.assertNoResult(waiting_second)

        sends.pop(0)[1].callback(1)
        self.assertEqual(self.successResultOf(waiting_first), (1, 1))
        self.assertNoResult(waiting_second)
        self.assertEqual([records for records, _ in sends], [[second.data]])
        self.assertEqual(self.successResultOf(replication.wait_stored(first.seq, 5.0)), (1, 1))
        self.assertNoResult(replication.wait_stored(second.seq, 5.0))

        sends.pop(0)[1].callback(1)
        self.assertEqual(self.successResultOf(waiting_second), (1, 1))
        self.assertEqual(self.successResultOf(replication.wait_stored(second.seq, 5.0)), (1, 1))

    def test_unchanged_put_does_not_wait(self):
        """A PUT that changes nothing stores nothing (no seq): sync=1 answers at once, with every peer counted."""
        self.a.write("x", 1)
        self.cluster.net.down(self.c.url)
        d = self.a.http.put(self.a.url + "/c/x?sync=1", data=b'{"value": 1}', headers=JSON)
        self.a.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"2"])

    def test_sync_delete(self):
        """DELETE ?sync=1 answers with the replica counts once the tombstone is on both peers."""
        self.a.write("x", 1)
        d = self.a.http.delete(self.a.url + "/c/x?sync=1")
        self.a.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-stored"), [b"2"])
        self.assertTrue(json.loads(self.b.stored("x"))["deleted"])

    def test_sync_without_peers(self):
        """A node with no peers answers sync=1 at once: stored 0 of 0."""
        lone = self.cluster.add("lone")
        d = lone.http.post(lone.url + "/c/x?sync=1", data=b'{"value": 1}', headers=JSON)
        lone.http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"minstore-replicas-expected"), [b"0"])


class ReconfigureTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b")
        self.c = self.cluster.add("c")
        self.a = self.cluster.add("a", peers=["b"])

    def test_added_peer_gets_later_writes(self):
        """A peer added by reconfigure receives the writes made after, not those before."""
        self.a.write("x", 1)
        change = self.a.replication.reconfigure(ServerList([self.b.url, self.c.url]))
        self.assertEqual(change["added"], [self.c.url])
        self.assertEqual(change["removed"], [])
        self.assertEqual(self.c.received, [])
        y = self.a.write("y", 1)
        self.assertEqual([d for d, _, _ in self.c.received], [y])
        self.assertEqual(self.b.received_uids(), ["x", "y"])
        self.cluster.advance(Replication.CHECKPOINT_INTERVAL)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 2, self.c.url: 2})

    def test_removed_peer_stops(self):
        """A removed peer gets nothing more, its retry is cancelled and its checkpoint dropped."""
        self.cluster.net.down(self.b.url)
        self.a.write("x", 1)
        self.assertEqual(len(self.cluster.clock.getDelayedCalls()), 1)
        change = self.a.replication.reconfigure(ServerList([self.c.url]))
        self.assertEqual((change["added"], change["removed"]), ([self.c.url], [self.b.url]))
        self.assertEqual(self.cluster.clock.getDelayedCalls(), [])
        self.cluster.net.up(self.b.url)
        self.a.write("y", 1)
        self.cluster.advance(100)
        self.assertEqual(self.b.received, [])
        self.assertEqual(self.c.received_uids(), ["y"])
        self.assertEqual(list(self.a.replication.peers), [self.c.url])
        self.assertEqual(self.a.storage.checkpoints(), {self.c.url: 2})

    def test_bridge_change_reported(self):
        """reconfigure says whether the bridge flag changed, and replicas carry bridge=1 from then on."""
        change = self.a.replication.reconfigure(ServerList([self.b.url], bridge=True))
        self.assertEqual((change["added"], change["removed"]), ([], []))
        self.assertTrue(change["bridge"])
        self.assertTrue(change["bridge_changed"])
        self.a.write("x", 1)
        self.assertEqual(self.cluster.all_replica_posts(), [self.b.url + "/_cluster/replicas?bridge=1"])


class ClusterServiceTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b")
        self.c = self.cluster.add("c")
        self.path = self.mktemp()
        self.write_servers("http://b:8001\n")
        from minstore.cluster.servers import read_servers

        self.a = self.cluster.add("a", peers=["b"])
        self.a.servers = read_servers(self.path)
        self.service = ClusterService(self.a.replication, self.a.servers, self.cluster.clock)
        self.events = []
        self.service.log = Logger(observer=self.events.append)

    def write_servers(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def test_reload_applies_changes(self):
        """reload() applies a changed servers.list and reports the added and removed peers."""
        self.write_servers("# peers\n*\nhttp://c:8001\n")
        change = self.service.reload()
        self.assertEqual(change["added"], [self.c.url])
        self.assertEqual(change["removed"], [self.b.url])
        self.assertTrue(change["bridge"])
        self.assertEqual(self.service.servers.peers, (self.c.url,))
        self.assertEqual(list(self.a.replication.peers), [self.c.url])
        self.a.write("x", 1)
        self.assertEqual(self.cluster.all_replica_posts(), [self.c.url + "/_cluster/replicas?bridge=1"])
        self.assertEqual(self.b.received, [])
        [event] = self.events
        self.assertEqual(event["log_level"].name, "info")

    def test_reload_bad_file_keeps_old_list(self):
        """A bad servers.list is logged (naming file and line) and the old peers are kept."""
        self.write_servers("http://c:8001\nnot a url\n")
        self.assertIsNone(self.service.reload())
        self.assertEqual(self.service.servers.peers, (self.b.url,))
        self.assertEqual(list(self.a.replication.peers), [self.b.url])
        [event] = self.events
        self.assertEqual(event["log_level"].name, "error")
        self.assertIn("%s:2" % self.path, event["error"])
        self.a.write("x", 1)
        self.assertEqual(self.b.received_uids(), ["x"])

    def test_reload_missing_file_keeps_old_list(self):
        """A servers.list that disappeared is logged and the old peers are kept."""
        os.remove(self.path)
        self.assertIsNone(self.service.reload())
        self.assertEqual(list(self.a.replication.peers), [self.b.url])
        self.assertEqual(self.events[0]["log_level"].name, "error")

    def test_stop_makes_the_pending_save(self):
        """
        stopService saves the checkpoints a delivery left waiting for the
        interval (a clean restart resends nothing), and no save runs after.
        """
        self.a.write("x", 1)
        self.a.write("y", 1)
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 0})  # saved when first seen
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 2})
        self.assertEqual(self.cluster.clock.getDelayedCalls(), [])

    def test_stop_saves_checkpoints(self):
        """stopService saves every peer's checkpoint and stops retrying."""
        self.cluster.net.down(self.b.url)
        self.a.write("x", 1)
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.a.storage.checkpoints(), {self.b.url: 0})
        self.assertEqual(self.cluster.clock.getDelayedCalls(), [])


class RecordingHTTP:
    """A treq stand-in that records each request and answers with a canned body."""

    def __init__(self, code=200, body=b'{"applied": 2, "received": 2}'):
        self.calls = []
        self.code = code
        self.body = body

    def request(self, method, url, **kwargs):
        self.calls.append((method, url, kwargs))
        response = self

        class Response:
            code = response.code

            def content(self):
                return succeed(response.body)

        return succeed(Response())


class PeerClientTests(SynchronousTestCase):
    def test_send_replicas(self):
        """
        send_replicas POSTs the records as NDJSON to /_cluster/replicas
        (with bridge=1 when asked), names this node, always with a timeout,
        and returns how many the peer applied.
        """
        http = RecordingHTTP()
        client = PeerClient(http, "me", timeout=7.0)
        applied = self.successResultOf(
            ensureDeferred(client.send_replicas(url("b"), [b'{"a":1}', b'{"b":2}'], bridge=True))
        )
        self.assertEqual(applied, 2)
        [(method, target, kwargs)] = http.calls
        self.assertEqual((method, target), ("POST", url("b") + "/_cluster/replicas?bridge=1"))
        self.assertEqual(kwargs["data"], b'{"a":1}\n{"b":2}\n')
        self.assertEqual(kwargs["headers"][b"content-type"], [b"application/x-ndjson"])
        self.assertEqual(kwargs["headers"][b"x-minstore-node"], [b"me"])
        self.assertEqual(kwargs["timeout"], 7.0)

        self.successResultOf(ensureDeferred(client.send_replicas(url("b"), [b"{}"], timeout=2.0)))
        self.assertEqual(http.calls[1][1], url("b") + "/_cluster/replicas")
        self.assertEqual(http.calls[1][2]["timeout"], 2.0)

    def test_send_replicas_error(self):
        """A peer answering anything but 200 fails the send with a PeerError carrying the code."""
        client = PeerClient(RecordingHTTP(code=503, body=b"busy"), "me")
        failure = self.failureResultOf(ensureDeferred(client.send_replicas(url("b"), [b"{}"])), PeerError)
        self.assertEqual(failure.value.code, 503)

    def test_replication_passes_its_timeout(self):
        """Every replica batch is sent with the replication timeout, so a hung peer fails and is retried."""
        clock = Clock()
        http = RecordingHTTP()
        node = Node(MemoryStorage(), node_id="a", now=clock.seconds)
        replication = Replication(
            node, PeerClient(http, "a"), clock, run_inline, timeout=3.5
        )
        replication.start(ServerList([url("b")]))
        self.addCleanup(replication.stop)
        self.successResultOf(node.create("c", "x", 1))
        [(_, _, kwargs)] = http.calls
        self.assertEqual(kwargs["timeout"], 3.5)


class SighupTests(SynchronousTestCase):
    def test_sighup_reloads_on_the_reactor(self):
        """SIGHUP schedules reload() on the reactor thread (signal handlers must not touch the reactor state)."""
        scheduled = []

        class Reactor:
            def callFromThread(self, f, *args):
                scheduled.append((f, args))

        service = ClusterService(object(), ServerList(path="servers.list"), Reactor())
        service._sighup(1, None)
        self.assertEqual(scheduled, [(service.reload, ())])
