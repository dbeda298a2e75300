"""
Spreading across real nodes (DESIGN section 4): mirroring, bridges, cycles,
durable replication through a receiver's outage and an emitter's kill -9,
lookups across the peer graph, sync=1 and SIGHUP.

Every node is a ``twistd -n minstore`` child on a loopback port
(L{tests.harness}); every wait polls with a deadline, so a missing replica
fails the test instead of hanging it.
"""

import json
import re

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.harness import NodeTestMixin, deferred_test, sleep

ENGLISH = "The quick brown fox jumps over the lazy dog near the river bank"
FRENCH = "Le renard brun saute par-dessus le chien paresseux au bord de la riviere"

#: How long a replica may take to arrive before a test fails.
DEADLINE = 15.0


class SpreadingTestCase(NodeTestMixin, TestCase):
    timeout = 120

    # -- helpers --------------------------------------------------------

    def make_nodes(self, n, processed=(), node_args=None, **kwargs):
        """
        L{make_cluster}, with no processes (quicker to start) on the nodes not
        in ``processed``, and every node stopped at once at cleanup.
        """
        node_args = dict(node_args or {})
        for i in range(n):
            if i not in processed:
                node_args[i] = ["--processes", ""] + list(node_args.get(i, ()))
        nodes = self.make_cluster(n, node_args=node_args, **kwargs)
        self.addCleanup(self.stop_all, nodes)
        return nodes

    async def start_nodes_of(self, n, **kwargs):
        """L{make_nodes}, every node started."""
        return await self.start_nodes(self.make_nodes(n, **kwargs))

    async def stop_all(self, nodes):
        """Stop every running node concurrently (the harness's cleanup then has nothing to do)."""
        await gatherResults([ensureDeferred(self._stop_at_cleanup(node)) for node in nodes])

    async def eventually(self, check, timeout=DEADLINE, interval=0.05, what="a condition"):
        """Call the coroutine function ``check`` until it returns a true value, with a deadline."""
        deadline = reactor.seconds() + timeout
        while True:
            result = await check()
            if result:
                return result
            if reactor.seconds() >= deadline:
                self.fail("%s did not happen within %.0fs" % (what, timeout))
            await sleep(interval)

    async def local(self, node, collection, uid):
        """``(code, body)`` of ``GET ?local=1`` on one node."""
        code, _, body = await self.call(
            "GET", "%s/%s/%s?local=1" % (node.url, collection, uid), timeout=5.0
        )
        return code, body

    async def wait_local(self, node, collection, uid, expected, timeout=DEADLINE):
        """
        Wait until ``node`` holds exactly the record bytes ``expected`` (or,
        with ``expected`` None, holds no live record) in its own storage.
        """

        async def check():
            code, body = await self.local(node, collection, uid)
            if expected is None:
                return code == 404
            return code == 200 and body == expected

        await self.eventually(
            check, timeout, what="%s/%s on %s becoming %r" % (collection, uid, node.name, expected)
        )

    async def post(self, node, collection, uid, value, query=""):
        code, headers, body = await self.call(
            "POST", "%s/%s/%s%s" % (node.url, collection, uid, query), json={"value": value}
        )
        self.assertEqual(code, 200, body)
        return body, headers

    async def put(self, node, collection, uid, value):
        code, _, body = await self.call(
            "PUT", "%s/%s/%s" % (node.url, collection, uid), json={"value": value}
        )
        self.assertEqual(code, 200, body)
        return body

    async def status(self, node):
        code, _, body = await self.call_json("GET", node.url + "/_node/status", timeout=5.0)
        self.assertEqual(code, 200, body)
        return body

    async def peer_status(self, node, peer):
        for entry in (await self.status(node))["peers"]:
            if entry["url"] == peer.url:
                return entry
        self.fail("%s does not list %s in /_node/status: %r" % (node.name, peer.url, await self.status(node)))

    async def wait_quiet(self, nodes, settle=0.3, timeout=DEADLINE):
        """
        Wait until every node shows backlog 0 for every peer and the total of
        replicas sent stays the same over ``settle`` seconds; that total.
        """
        deadline = reactor.seconds() + timeout
        previous = None
        while True:
            statuses = [await self.status(n) for n in nodes]
            backlog = sum(p["backlog"] for s in statuses for p in s["peers"])
            sent = sum(p["sent"] for s in statuses for p in s["peers"])
            if backlog == 0 and sent == previous:
                return sent
            previous = sent if backlog == 0 else None
            if reactor.seconds() >= deadline:
                self.fail(
                    "replication did not end within %.0fs: backlog %d, sent %d: %r"
                    % (timeout, backlog, sent, statuses)
                )
            await sleep(settle)

    async def listing(self, node, collection):
        """Every live record of a collection held by ``node``, by uid (parsed JSON)."""
        code, _, body = await self.call_json(
            "GET", "%s/%s/?limit=1000" % (node.url, collection), timeout=10.0
        )
        self.assertEqual(code, 200, body)
        self.assertIsNone(body["next"])
        return {item["uid"]: item for item in body["items"]}

    async def write_many(self, node, collection, uids, at_once=20):
        """POST one record per uid, ``at_once`` in flight; the acknowledged records by uid."""
        acknowledged = {}
        uids = list(uids)
        for start in range(0, len(uids), at_once):
            chunk = uids[start : start + at_once]
            bodies = await gatherResults(
                [
                    ensureDeferred(self.post(node, collection, uid, "%s %s" % (ENGLISH, uid)))
                    for uid in chunk
                ]
            )
            for uid, (body, _) in zip(chunk, bodies):
                acknowledged[uid] = json.loads(body)
        return acknowledged

    async def cluster_requests(self, node):
        """How many ``/_cluster/`` requests ``node`` has answered (its /metrics)."""
        code, _, body = await self.call("GET", node.url + "/metrics", timeout=5.0)
        self.assertEqual(code, 200)
        total = 0.0
        for line in body.decode("utf-8").splitlines():
            if line.startswith("minstore_http_requests_total{") and 'route="cluster"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


class MirrorTests(SpreadingTestCase):
    @deferred_test
    async def test_mirror(self):
        """
        On a mirror A->(B, C), POST, PUT and DELETE on A reach B and C; the
        records are the same bytes on all three, and B and C (which run no
        processes) keep A's ``lang`` and version: receivers never re-process.
        ``sync=1`` answers once both receivers hold the write, with
        ``Minstore-Replicas-Stored: 2``.
        """
        a, b, c = await self.start_nodes_of(3, peers={0: [1, 2], 1: [], 2: []}, processed=[0])
        self.assertEqual((await self.status(a))["processes"], ["lang", "schema"])
        self.assertEqual((await self.status(b))["processes"], [])
        self.assertEqual((await self.status(c))["processes"], [])

        body, _ = await self.post(a, "books", "b1", ENGLISH)
        record = json.loads(body)
        self.assertEqual(record["lang"], "en")
        self.assertEqual(await self.local(a, "books", "b1"), (200, body))
        for receiver in (b, c):
            await self.wait_local(receiver, "books", "b1", body)
            copy = json.loads((await self.local(receiver, "books", "b1"))[1])
            self.assertEqual((copy["lang"], copy["version"]), ("en", record["version"]))

        updated = await self.put(a, "books", "b1", FRENCH)
        self.assertEqual(json.loads(updated)["lang"], "fr")
        self.assertGreater(json.loads(updated)["version"], record["version"])
        for receiver in (b, c):
            await self.wait_local(receiver, "books", "b1", updated)

        # A record written on a receiver itself gets no lang: it runs no process.
        own, _ = await self.post(b, "books", "b-own", ENGLISH)
        self.assertNotIn("lang", json.loads(own))

        code, _, deleted = await self.call("DELETE", a.url + "/books/b1")
        self.assertEqual(code, 200, deleted)
        for node in (a, b, c):
            await self.wait_local(node, "books", "b1", None)
        # A's own GET (asking its peers too) agrees: nobody holds it.
        code, _, _ = await self.call("GET", a.url + "/books/b1")
        self.assertEqual(code, 404)

        # sync=1: answered once both receivers hold the write, so they hold it at once.
        body, headers = await self.post(a, "books", "s1", ENGLISH, query="?sync=1")
        self.assertEqual(headers.get("Minstore-Replicas-Stored"), "2")
        self.assertEqual(headers.get("Minstore-Replicas-Expected"), "2")
        for receiver in (b, c):
            self.assertEqual(await self.local(receiver, "books", "s1"), (200, body))

        code, headers, updated = await self.call("PUT", a.url + "/books/s1?sync=1", json={"value": FRENCH})
        self.assertEqual(code, 200, updated)
        self.assertEqual(headers.get("Minstore-Replicas-Stored"), "2")
        for receiver in (b, c):
            self.assertEqual(await self.local(receiver, "books", "s1"), (200, updated))

        code, headers, _ = await self.call("DELETE", a.url + "/books/s1?sync=1")
        self.assertEqual(code, 200)
        self.assertEqual(headers.get("Minstore-Replicas-Stored"), "2")
        for receiver in (b, c):
            self.assertEqual((await self.local(receiver, "books", "s1"))[0], 404)


class BridgeTests(SpreadingTestCase):
    @deferred_test
    async def test_bridge_chain(self):
        """
        On A(*)->B(*)->C, writes on A (POST, PUT, DELETE) reach C through B,
        as the same bytes.
        """
        a, b, c = await self.start_nodes_of(
            3, peers={0: [1], 1: [2], 2: []}, bridges=[0, 1], processed=[0]
        )
        body, _ = await self.post(a, "books", "chain", ENGLISH)
        self.assertEqual(json.loads(body)["lang"], "en")
        # Neither B nor C runs a process: C has A's record, lang and all.
        await self.wait_local(c, "books", "chain", body)
        await self.wait_local(b, "books", "chain", body)
        updated = await self.put(a, "books", "chain", FRENCH)
        await self.wait_local(c, "books", "chain", updated)
        code, _, _ = await self.call("DELETE", a.url + "/books/chain")
        self.assertEqual(code, 200)
        await self.wait_local(c, "books", "chain", None)

    @deferred_test
    async def test_non_bridge_receiver_does_not_pass_on(self):
        """
        On A->B->C with no bridge, B stores A's write but does not pass it
        on: C never gets it, and B sends C nothing.
        """
        a, b, c = await self.start_nodes_of(3, peers={0: [1], 1: [2], 2: []})
        body, _ = await self.post(a, "books", "kept", ENGLISH)
        await self.wait_local(b, "books", "kept", body)
        await self.wait_quiet([a, b])
        self.assertEqual((await self.peer_status(b, c))["sent"], 0)
        self.assertEqual((await self.local(c, "books", "kept"))[0], 404)
        # B's own client writes are still mirrored to C.
        own, _ = await self.post(b, "books", "from-b", ENGLISH)
        await self.wait_local(c, "books", "from-b", own)
        self.assertEqual((await self.local(c, "books", "kept"))[0], 404)

    @deferred_test
    async def test_bridge_flag_only_from_a_bridge(self):
        """
        On A(*)->B->C->D, B gets A's write with bridge=1 and passes it on to
        C, without bridge=1 (B's list has no ``*``): C stores it and stops.
        """
        a, b, c, d = await self.start_nodes_of(4, peers={0: [1], 1: [2], 2: [3], 3: []}, bridges=[0])
        body, _ = await self.post(a, "books", "hop", ENGLISH)
        await self.wait_local(c, "books", "hop", body)
        self.assertEqual(await self.local(b, "books", "hop"), (200, body))
        await self.wait_quiet([a, b, c])
        self.assertEqual((await self.peer_status(c, d))["sent"], 0)
        self.assertEqual((await self.local(d, "books", "hop"))[0], 404)

    @deferred_test
    async def test_cycles_end(self):
        """
        On the bridge cycles A->B->A and A->B->C->A, writes (including
        concurrent PUTs of one uid on two nodes) end: every backlog drains,
        the count of replicas sent stops growing, and every node holds the
        same record.
        """
        nodes = await self.start_nodes_of(
            5,
            peers={0: [1], 1: [0], 2: [3], 3: [4], 4: [2]},
            bridges=[0, 1, 2, 3, 4],
        )
        two, three = nodes[:2], nodes[2:]
        for cycle in (two, three):
            body, _ = await self.post(cycle[0], "books", "loop", ENGLISH)
            for node in cycle:
                await self.wait_local(node, "books", "loop", body)
            sent = await self.wait_quiet(cycle)
            # Each node passes one write on once: it ends after one lap.
            self.assertEqual(sent, len(cycle))

            # Two writers of one uid at once: last writer wins everywhere.
            await gatherResults(
                [
                    ensureDeferred(self.put(cycle[0], "books", "loop", "%s %d" % (FRENCH, 0))),
                    ensureDeferred(self.put(cycle[1], "books", "loop", "%s %d" % (FRENCH, 1))),
                ]
            )
            await self.wait_quiet(cycle)
            copies = [await self.local(node, "books", "loop") for node in cycle]
            self.assertEqual(copies[0][0], 200)
            self.assertEqual(len(set(copies)), 1, copies)

            code, _, _ = await self.call("DELETE", cycle[-1].url + "/books/loop")
            self.assertEqual(code, 200)
            await self.wait_quiet(cycle)
            for node in cycle:
                self.assertEqual((await self.local(node, "books", "loop"))[0], 404)


class DurabilityTests(SpreadingTestCase):
    @deferred_test
    async def test_receiver_down_gets_every_write_back(self):
        """
        With B stopped, 100 writes on A wait in A's backlog (B retrying or
        down in /_node/status); once B is back on its port and data dir,
        every one of them arrives.
        """
        a, b = await self.start_nodes_of(2, peers={0: [1], 1: []}, node_args={0: ["--retry-max", "1"]})
        first, _ = await self.post(a, "books", "before", ENGLISH)
        await self.wait_local(b, "books", "before", first)

        await b.stop()
        self.assertFalse(b.running)
        written = await self.write_many(a, "down", ["r%03d" % i for i in range(100)])

        async def waiting():
            peer = await self.peer_status(a, b)
            return peer["backlog"] > 0 and peer["state"] in ("retrying", "down") and peer
        peer = await self.eventually(waiting, what="B's backlog showing on A")
        self.assertGreater(peer["backlog"], 0)

        await b.restart()

        async def caught_up():
            return len(await self.listing(b, "down")) == 100
        await self.eventually(caught_up, what="B holding all 100 writes")
        self.assertEqual(await self.listing(b, "down"), written)
        self.assertEqual(await self.listing(a, "down"), written)
        await self.wait_quiet([a])
        peer = await self.peer_status(a, b)
        self.assertEqual((peer["backlog"], peer["state"]), (0, "up"))

    @deferred_test
    async def test_emitter_killed_loses_no_acknowledged_write(self):
        """
        Writes acknowledged by A while its receiver B is down reach B after
        A is killed with SIGKILL and restarted: first on a fresh A that never
        delivered anything, then on an A that had delivered before.
        """
        a, b = self.make_nodes(2, peers={0: [1], 1: []}, node_args={0: ["--retry-max", "1"]})
        await a.start()  # B not started: nothing can be delivered

        written = await self.write_many(a, "killed", ["first-%02d" % i for i in range(40)])
        for i in range(5):  # in order per uid: the last version wins
            written["first-00"] = json.loads(await self.put(a, "killed", "first-00", "v%d" % i))
        await a.kill9()
        self.assertEqual(a.exit_signal, 9)

        await a.restart()
        await b.start()

        async def caught_up(expected):
            return await self.listing(b, "killed") == expected

        await self.eventually(lambda: caught_up(written), what="B holding the 40 writes of the first run")
        await self.wait_quiet([a])

        # Again, after A has delivered and saved checkpoints.
        await b.stop()
        more = await self.write_many(a, "killed", ["second-%02d" % i for i in range(40)])
        written.update(more)
        written["first-01"] = json.loads(await self.put(a, "killed", "first-01", "changed"))
        await a.kill9()
        await a.restart()
        await b.restart()
        await self.eventually(lambda: caught_up(written), what="B holding the writes of the second run")
        self.assertEqual(await self.listing(a, "killed"), written)


class LookupTests(SpreadingTestCase):
    @deferred_test
    async def test_lookups_follow_the_peer_graph(self):
        """
        With A->B->C and a record only C holds, GET on A finds it through B,
        DELETE on A deletes it on C; a uid nobody holds is 404 on A; and
        ``GET ?local=1`` on A is 404 without asking any peer.
        """
        a, b, c = await self.start_nodes_of(3, peers={0: [1], 1: [2], 2: []})
        body, _ = await self.post(c, "books", "far", ENGLISH)
        for node in (a, b):
            self.assertEqual((await self.local(node, "books", "far"))[0], 404)

        asked = await self.cluster_requests(b)
        code, _, _ = await self.call("GET", a.url + "/books/far?local=1")
        self.assertEqual(code, 404)
        self.assertEqual(await self.cluster_requests(b), asked)

        code, headers, found = await self.call("GET", a.url + "/books/far")
        self.assertEqual(code, 200, found)
        self.assertEqual(found, body)
        self.assertEqual(headers.get("etag"), '"%s"' % json.loads(body)["version"])
        self.assertGreater(await self.cluster_requests(b), asked)

        code, _, missing = await self.call_json("GET", a.url + "/books/nobody")
        self.assertEqual(code, 404, missing)
        self.assertEqual(missing["error"], "not_found")

        code, _, deleted = await self.call_json("DELETE", a.url + "/books/far")
        self.assertEqual(code, 200, deleted)
        self.assertEqual(deleted["uid"], "far")
        self.assertEqual((await self.local(c, "books", "far"))[0], 404)
        code, _, _ = await self.call("GET", a.url + "/books/far")
        self.assertEqual(code, 404)
        code, _, _ = await self.call("DELETE", a.url + "/books/far")
        self.assertEqual(code, 404)
        code, _, _ = await self.call("DELETE", a.url + "/books/nobody")
        self.assertEqual(code, 404)


class ReloadTests(SpreadingTestCase):
    @deferred_test
    async def test_sighup_rereads_servers_list(self):
        """
        After A's servers.list gains C and A gets SIGHUP, A's new writes
        reach C and A's log names the peer added; after B is dropped the
        same way, B gets no new write.
        """
        a, b, c = await self.start_nodes_of(3, peers={0: [1], 1: [], 2: []})
        before, _ = await self.post(a, "books", "before", ENGLISH)
        await self.wait_local(b, "books", "before", before)

        a.set_servers([b, c])
        self.assertTrue(a.hup())

        async def reloaded():
            return c.url in (await self.status(a))["servers"]["peers"]
        await self.eventually(reloaded, what="A taking C as a peer")
        log = [line for line in a.output_lines() if "SIGHUP" in line]
        self.assertTrue(any("added [%s]" % c.url in line for line in log), a.output())

        after, headers = await self.post(a, "books", "after", ENGLISH, query="?sync=1")
        self.assertEqual(headers.get("Minstore-Replicas-Stored"), "2")
        for receiver in (b, c):
            await self.wait_local(receiver, "books", "after", after)

        a.set_servers([c])
        self.assertTrue(a.hup())

        async def dropped():
            return b.url not in (await self.status(a))["servers"]["peers"]
        await self.eventually(dropped, what="A dropping B")
        self.assertTrue(
            any(re.search(r"SIGHUP.*removed \[%s\]" % re.escape(b.url), line) for line in a.output_lines()),
            a.output(),
        )
        last, _ = await self.post(a, "books", "last", ENGLISH)
        await self.wait_local(c, "books", "last", last)
        await self.wait_quiet([a])
        self.assertEqual((await self.local(b, "books", "last"))[0], 404)
