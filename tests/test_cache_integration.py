"""
The cache strategy with real nodes: fronts (``cache=1``, memory storage)
whose servers.list names two dependants, which list each other (they
mirror each other; the front only routes).
"""

import json

from twisted.trial.unittest import TestCase

from tests.harness import NodeTestMixin, deferred_test, sleep

COMPARED = ("uid", "collection", "value", "version", "timestamp", "check_sum", "size", "lang")


class CacheIntegrationTests(NodeTestMixin, TestCase):
    timeout = 120

    async def held(self, node, uid, collection="books"):
        """``(code, record or error)`` a dependant holds itself."""
        code, _, body = await self.call_json("GET", "%s/%s/%s?local=1" % (node.url, collection, uid))
        return code, body

    async def cache_status(self, front):
        _, _, status = await self.call_json("GET", front.url + "/_node/status")
        return status["cache"]

    def assertSameRecord(self, a, b):
        self.assertEqual(sorted(a), sorted(b))
        for field in a:
            self.assertEqual(a[field], b[field], field)

    @deferred_test
    async def test_writes_and_reads_through_the_front(self):
        """
        POST, GET, PUT and DELETE through a front: both dependants hold the
        same record, processed once; GETs are served from the cache.
        """
        front, a, b = await self.start_cluster(
            3, peers={0: [1, 2], 1: [2], 2: [1]}, node_args={0: ["--storage", "memory"]}
        )
        text = "Le petit chat dort sur le canapé du salon depuis ce matin"
        code, headers, posted = await self.call_json(
            "POST", front.url + "/books/b1?cache=1&sync=1", json={"value": text}
        )
        self.assertEqual(code, 200, posted)
        self.assertEqual(posted["lang"], "fr")
        self.assertEqual(headers["etag"], '"%s"' % posted["version"])
        (code_a, on_a), (code_b, on_b) = [await self.held(n, "b1") for n in (a, b)]
        self.assertEqual((code_a, code_b), (200, 200))
        self.assertSameRecord(on_a, on_b)
        self.assertEqual(on_a, posted)
        for field in COMPARED:
            self.assertIn(field, on_a)
        self.assertEqual((await self.call_json("GET", front.url + "/_node/status"))[2]["records"], 0)

        before = await self.cache_status(front)
        code, headers, got = await self.call_json("GET", front.url + "/books/b1?cache=1")
        self.assertEqual((code, got), (200, posted))
        code, _, body = await self.call(
            "GET", front.url + "/books/b1?cache=1", headers={"if-none-match": headers["etag"]}
        )
        self.assertEqual((code, body), (304, b""))
        after = await self.cache_status(front)
        self.assertEqual(after["hits"], before["hits"] + 2)
        self.assertEqual(after["misses"], before["misses"])
        self.assertEqual(after["bytes"], len(json.dumps(posted, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()))

        # A record written on a dependant directly: a miss, then a hit.
        await self.call_json("POST", a.url + "/books/b2", json={"value": "direct"})
        code, _, got = await self.call_json("GET", front.url + "/books/b2?cache=1")
        self.assertEqual((code, got["value"]), (200, "direct"))
        self.assertEqual((await self.cache_status(front))["misses"], after["misses"] + 1)
        code, _, missing = await self.call_json("GET", front.url + "/books/nope?cache=1")
        self.assertEqual((code, missing["error"]), (404, "not_found"))

        code, _, put = await self.call_json(
            "PUT", front.url + "/books/b1?cache=1&sync=1", json={"value": "The cat sleeps on the sofa all morning long"}
        )
        self.assertEqual((code, put["lang"]), (200, "en"))
        (_, on_a), (_, on_b) = [await self.held(n, "b1") for n in (a, b)]
        self.assertSameRecord(on_a, on_b)
        self.assertEqual(on_a, put)
        self.assertEqual((await self.call_json("GET", front.url + "/books/b1?cache=1"))[2], put)

        code, _, body = await self.call_json(
            "PUT", front.url + "/books/b1?cache=1", json={"value": "x"}, headers={"if-match": '"old"'}
        )
        self.assertEqual((code, body["error"]), (412, "precondition_failed"))
        code, _, body = await self.call_json("POST", front.url + "/books/b1?cache=1", json={"value": "x"})
        self.assertEqual((code, body["error"]), (400, "record_exists"))

        code, _, deleted = await self.call_json("DELETE", front.url + "/books/b1?cache=1&sync=1")
        self.assertEqual((code, deleted["deleted"]), (200, True))
        self.assertEqual([(await self.held(n, "b1"))[0] for n in (a, b)], [404, 404])
        self.assertEqual((await self.call("GET", front.url + "/books/b1?cache=1"))[0], 404)

    @deferred_test
    async def test_dependants_stopped(self):
        """
        A dependant down during a write gets the record once back, from
        the other dependant, even though the front restarted in between;
        with every dependant down, fresh entries are served, stale ones
        only within --cache-stale-if-error (with a Warning), the rest is 502.
        """
        front, quick, a, b = await self.start_cluster(
            4,
            peers={0: [2, 3], 1: [2, 3], 2: [3], 3: [2]},
            node_args={
                0: ["--storage", "memory", "--cache-timeout", "2"],
                1: ["--storage", "memory", "--cache-ttl", "1", "--cache-stale-if-error", "60"],
                # A sync=1 write waits for the other dependant less than the front waits.
                2: ["--sync-timeout", "1"],
                3: ["--sync-timeout", "1"],
            },
        )
        # A dependant's first write paid for getting lang's model ready,
        # which on a busy machine took more than the front's 2 s: the cause
        # of this test's 502 in 1 run of 3.  Warm the dependants first.
        for i, node in enumerate((a, b)):
            code, _, body = await self.call_json("POST", node.url + "/warm/%d" % i, json={"value": "warm up"})
            self.assertEqual(code, 200, body)
        code, _, r1 = await self.call_json("POST", front.url + "/books/r1?cache=1", json={"value": "one"})
        self.assertEqual(code, 200, r1)
        self.assertEqual((await self.call_json("GET", quick.url + "/books/r1?cache=1"))[2], r1)

        await a.stop()
        code, headers, r2 = await self.call_json("POST", front.url + "/books/r2?cache=1&sync=1", json={"value": "two"})
        self.assertEqual(code, 200, r2)
        self.assertEqual((headers["minstore-replicas-stored"], headers["minstore-replicas-expected"]), ("0", "1"))
        _, _, status = await self.call_json("GET", b.url + "/_node/status")
        self.assertEqual([(p["url"], p["backlog"]) for p in status["peers"]], [(a.url, 1)])
        # The front holds nothing undelivered: a restart loses nothing.
        await front.stop()
        await front.start()
        await a.start()
        for _ in range(100):
            code, on_a = await self.held(a, "r2")
            if code == 200:
                break
            await sleep(0.1)
        self.assertEqual(on_a, (await self.held(b, "r2"))[1])
        self.assertEqual(on_a, r2)

        # The restarted front's cache started cold: r1 is cached again.
        self.assertEqual((await self.call_json("GET", front.url + "/books/r1?cache=1"))[2], r1)
        await a.stop()
        await b.stop()
        code, _, got = await self.call_json("GET", front.url + "/books/r1?cache=1")
        self.assertEqual((code, got), (200, r1))
        for method, path in (("GET", "/books/r9?cache=1"), ("PUT", "/books/r1?cache=1"), ("DELETE", "/books/r1?cache=1")):
            code, headers, body = await self.call_json(method, front.url + path, json={"value": "x"})
            self.assertEqual((code, body["error"]), (502, "bad_gateway"), method)
            self.assertTrue(headers["content-type"].startswith("application/json"))

        await sleep(1.2)  # r1 is stale on the quick front
        code, headers, got = await self.call_json("GET", quick.url + "/books/r1?cache=1")
        self.assertEqual((code, got), (200, r1))
        self.assertIn("Revalidation Failed", headers["warning"])
        status = await self.cache_status(quick)
        self.assertEqual((status["revalidations"], status["stale_served"]), (1, 1))
