"""
The cache strategy (DESIGN section 4, L{minstore.cache}): the byte-bounded
LRU, freshness on a L{Clock}, and a front bouncing requests to two real
dependant nodes (memory storage) reached over in-memory HTTP.
"""

import json

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from minstore.api import RecordAPI
from minstore.cache import STALE_WARNING, CacheFront
from minstore.cluster.peers import PeerClient
from minstore.lru import ByteLRU
from minstore.node import Node
from minstore.storage.memory import MemoryStorage
from minstore.testing.fakes import Cluster, url

A = url("a")
B = url("b")
FRONT = "http://127.0.0.1:9000"


class ByteLRUTests(SynchronousTestCase):
    def test_bytes_are_the_stored_lengths(self):
        """The size of the cache is the sum of the lengths of the bytes held."""
        lru = ByteLRU(100)
        lru.put("a", b"x" * 10)
        lru.put("b", b"y" * 25)
        self.assertEqual((len(lru), lru.bytes), (2, 35))
        lru.put("a", b"z" * 3)  # replacing counts the new bytes only
        self.assertEqual((len(lru), lru.bytes), (2, 28))
        lru.pop("b")
        self.assertEqual((len(lru), lru.bytes), (1, 3))

    def test_least_recently_used_goes_first(self):
        """A new entry that does not fit evicts the least recently used ones."""
        lru = ByteLRU(30)
        for key in "abc":
            lru.put(key, b"-" * 10)
        lru.get("a")  # a is now the most recently used
        lru.put("d", b"-" * 10)
        self.assertNotIn("b", lru)
        self.assertIn("a", lru)
        self.assertEqual((lru.bytes, lru.evictions), (30, 1))
        lru.put("e", b"-" * 25)
        self.assertEqual(sorted(k for k in "acde" if k in lru), ["e"])
        self.assertEqual((lru.bytes, lru.evictions), (25, 4))

    def test_larger_than_the_bound_is_not_kept(self):
        """An entry larger than the whole cache is not stored and evicts nothing."""
        lru = ByteLRU(10)
        lru.put("a", b"12345")
        lru.put("b", b"x" * 11)
        self.assertNotIn("b", lru)
        self.assertEqual((len(lru), lru.bytes, lru.evictions), (1, 5, 0))


class Stamp:
    """A process leaving a mark unique to each run, to see who processed."""

    name = "stamp"

    def __init__(self, node_id):
        self.node_id = node_id
        self.runs = 0

    def __call__(self, record):
        self.runs += 1
        record["stamp"] = "%s-%d" % (self.node_id, self.runs)
        return record


class FrontTestsMixin:
    """
    A front (cache=1) and two dependants, A and B, each a real node with
    its own replication, listing each other: they mirror each other.
    """

    #: Whether A and B list each other (their replication mirrors writes).
    mirror = True
    ttl = 60.0
    timeout = 5.0
    stale_if_error = 0.0
    size = 1024 * 1024

    def setUp(self):
        self.cluster = Cluster(self)
        self.clock = self.cluster.clock
        self.net = self.cluster.net
        self.nodes = {}
        self.stamps = {}
        for name, other in (("a", "b"), ("b", "a")):
            stamp = self.stamps[url(name)] = Stamp(name)
            member = self.cluster.add(name, peers=[other] if self.mirror else [], processes=[stamp])
            self.nodes[url(name)] = member.node
        self.dependants = [A, B]
        self.front_node = Node(MemoryStorage(), node_id="front")
        self.front_node.open()
        self.front = CacheFront(
            PeerClient(self.net, "front"),
            lambda: self.dependants,
            self.clock,
            size=self.size,
            ttl=self.ttl,
            timeout=self.timeout,
            stale_if_error=self.stale_if_error,
        )
        self.front.attach(self.front_node)
        self.api = RecordAPI(self.front_node, front=self.front)
        self.http = StubTreq(self.api.resource())

    # -- helpers -----------------------------------------------------------

    def call(self, method, path, advance=None, **kwargs):
        """``(code, headers, body)`` of a request to the front."""
        d = self.http.request(method, FRONT + path, **kwargs)
        self.http.flush()
        for _ in range(3):  # the dependants' replication, between themselves
            self.clock.advance(0)
            self.net.flush()
            self.http.flush()
        if advance is not None:
            self.clock.advance(advance)
            self.net.flush()
            self.http.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, response.headers, body

    def get(self, path, **kwargs):
        return self.call("GET", path, **kwargs)

    def stored(self, url, collection="books", uid="1"):
        """The record a dependant holds (a dict), or None."""
        entry = self.successResultOf(self.nodes[url].read(collection, uid))
        return None if entry is None else json.loads(entry.data)

    def write_directly(self, url, method, path, value):
        http = self.net.stubs[url]
        d = http.request(method, url + path, json={"value": value})
        http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(response.content()))

    def requests(self):
        """Requests sent by the front (not between the dependants)."""
        return len([u for _, u in self.net.requests if "/_cluster/" not in u])


class FrontWriteTests(FrontTestsMixin, SynchronousTestCase):
    def test_post_same_record_on_every_dependant(self):
        """
        A POST through the front is processed by one dependant only, and
        both dependants end with the same record, field by field (the
        dependant's replication); with sync=1, once both hold it.
        """
        code, headers, body = self.call("POST", "/books/1?cache=1&sync=1", json={"value": "hello"})
        self.assertEqual(code, 200)
        answered = json.loads(body)
        a, b = self.stored(A), self.stored(B)
        self.assertEqual(sorted(a), sorted(b))
        for field in a:
            self.assertEqual(a[field], b[field], field)
        self.assertEqual(a, answered)
        self.assertEqual(a["stamp"], "a-1")
        self.assertEqual(self.stamps[B].runs, 0)
        self.assertEqual(headers.getRawHeaders("etag"), ['"%s"' % a["version"]])
        self.assertEqual(headers.getRawHeaders("minstore-replicas-stored"), ["1"])
        self.assertEqual(headers.getRawHeaders("minstore-replicas-expected"), ["1"])
        self.assertEqual(self.front_node.storage.count(), 0)
        # The front only routes: one request per write, to one dependant.
        self.assertEqual([(m, u.split("?")[0]) for m, u in self.net.requests if u.startswith(FRONT) is False
                          and "/_cluster/" not in u], [("POST", A + "/books/1")])

    def test_post_generated_uid(self):
        """POST /{collection}/ through the front: a generated uid, held by both."""
        code, _, body = self.call("POST", "/books/?cache=1", json={"value": "x"})
        self.assertEqual(code, 200)
        uid = json.loads(body)["uid"]
        self.assertEqual(self.stored(A, uid=uid), self.stored(B, uid=uid))

    def test_post_then_get_is_a_hit(self):
        """The record a write stored is in the cache: the GET asks nobody."""
        _, _, posted = self.call("POST", "/books/1?cache=1", json={"value": "hello"})
        before = self.requests()
        code, headers, body = self.get("/books/1?cache=1")
        self.assertEqual((code, body), (200, posted))
        self.assertEqual(self.requests(), before)
        self.assertEqual(self.front.hits, 1)

    def test_put_updates_every_dependant_and_the_cache(self):
        """A PUT through the front replaces the record everywhere and in the cache."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.get("/books/1?cache=1")
        code, _, body = self.call("PUT", "/books/1?cache=1", json={"value": "two"})
        self.assertEqual(code, 200)
        self.assertEqual(self.stored(A), self.stored(B))
        self.assertEqual(self.stored(B)["value"], "two")
        before = self.requests()
        self.assertEqual(self.get("/books/1?cache=1")[2], body)
        self.assertEqual(self.requests(), before)

    def test_errors_pass_through(self):
        """400, 404 and 412 from the dependant come back unchanged."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        direct = self.net.stubs[A]
        code, _, body = self.call("POST", "/books/1?cache=1", json={"value": "again"})
        self.assertEqual(code, 400)
        self.assertEqual(json.loads(body)["error"], "record_exists")

        code, _, body = self.call("PUT", "/books/2?cache=1", json={"value": "x"})
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")

        d = direct.put(A + "/books/1", json={"value": "x"}, headers={"if-match": '"nope"'})
        expected = self.successResultOf(self.successResultOf(d).content())
        code, _, body = self.call(
            "PUT", "/books/1?cache=1", json={"value": "x"}, headers={"if-match": '"nope"'}
        )
        self.assertEqual((code, body), (412, expected))
        self.assertEqual(self.stored(A)["value"], "one")

    def test_put_with_matching_if_match(self):
        """If-Match goes to the dependant: the current version lets a PUT through."""
        _, headers, _ = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        etag = headers.getRawHeaders("etag")[0]
        code, _, _ = self.call("PUT", "/books/1?cache=1", json={"value": "two"}, headers={"if-match": etag})
        self.assertEqual(code, 200)
        self.assertEqual(self.stored(B)["value"], "two")

    def test_delete_reaches_every_dependant_and_forgets(self):
        """A DELETE through the front deletes on both and forgets the uid."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        code, _, body = self.call("DELETE", "/books/1?cache=1")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["deleted"], True)
        self.assertTrue(self.stored(A)["deleted"])
        self.assertTrue(self.stored(B)["deleted"])
        self.assertNotIn(("books", "1"), self.front.lru)
        self.assertEqual(self.get("/books/1?cache=1")[0], 404)
        self.assertEqual(self.call("DELETE", "/books/1?cache=1")[0], 404)

    def test_delete_if_match_412(self):
        """A DELETE whose If-Match fails is 412, and nothing is deleted."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        code, _, body = self.call("DELETE", "/books/1?cache=1", headers={"if-match": '"old"'})
        self.assertEqual(code, 412)
        self.assertEqual(json.loads(body)["error"], "precondition_failed")
        self.assertNotIn("deleted", self.stored(A))

    def test_bad_names_are_400_without_asking(self):
        """A bad collection name is refused by the front itself."""
        code, _, body = self.call("POST", "/_x/1?cache=1", json={"value": "one"})
        self.assertEqual((code, json.loads(body)["error"]), (400, "bad_collection"))
        code, _, body = self.get("/b%20ad/1?cache=1")
        self.assertEqual((code, json.loads(body)["error"]), (400, "bad_collection"))
        self.assertEqual(self.requests(), 0)

    def test_first_dependant_down_the_next_processes(self):
        """
        When the first dependant does not answer, the next one processes the
        write; the one that was down gets the record once it is back, from
        the other dependant's durable replication: a new front (a restart)
        in between loses nothing, as the front holds nothing undelivered.
        """
        self.net.down(A)
        code, _, body = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["stamp"], "b-1")
        self.assertIsNone(self.stored(A))
        self.assertEqual([p["backlog"] for p in self.cluster.members["b"].replication.status()], [1])
        self.front = CacheFront(PeerClient(self.net, "front"), lambda: self.dependants, self.clock)
        self.clock.advance(1)  # still down: retried later
        self.net.up(A)
        for _ in range(10):
            self.cluster.advance(30)
        self.assertEqual(self.stored(A), self.stored(B))

    def test_delete_while_one_is_down(self):
        """A dependant that misses a DELETE gets the tombstone once back."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(B)
        self.assertEqual(self.call("DELETE", "/books/1?cache=1")[0], 200)
        self.assertNotIn("deleted", self.stored(B))
        self.net.up(B)
        for _ in range(10):
            self.cluster.advance(30)
        self.assertTrue(self.stored(B)["deleted"])
        self.assertEqual(self.stored(B)["version"], self.stored(A)["version"])

    def test_no_answer_is_502(self):
        """No dependant answering a write or a delete: 502 with a JSON error."""
        self.net.down(A)
        self.net.down(B)
        for method in ("POST", "PUT", "DELETE"):
            code, headers, body = self.call(method, "/books/1?cache=1", json={"value": "x"})
            self.assertEqual(code, 502, method)
            self.assertEqual(json.loads(body)["error"], "bad_gateway")
            self.assertIn(A, json.loads(body)["message"])

    def test_timeout_is_502(self):
        """Dependants that never answer: 502 once --cache-timeout has passed."""
        self.net.hang(A)
        self.net.hang(B)
        d = self.http.request("GET", FRONT + "/books/1?cache=1")
        self.http.flush()
        self.clock.advance(self.front.hedge)  # the second dependant is asked too
        self.clock.advance(self.timeout - self.front.hedge - 0.01)
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(self.front.hedge + 0.02)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 502)

    def test_no_dependants_is_400(self):
        """
        cache=1 on a node whose servers.list is empty is the client's error,
        not a server's: 400 no_dependants, for every method and for listings.
        """
        self.dependants = []
        for method, path in [("GET", "/books/1"), ("POST", "/books/1"), ("PUT", "/books/1"),
                             ("DELETE", "/books/1"), ("GET", "/books/"), ("POST", "/books/")]:
            code, _, body = self.call(method, path + "?cache=1", json={"value": 1})
            self.assertEqual((code, json.loads(body)["error"]), (400, "no_dependants"), (method, path))
            self.assertIn("servers.list", json.loads(body)["message"])
        self.assertEqual(self.front.errors, 0)

    def test_no_front_is_400(self):
        """A node built without a front answers cache=1 with 400 no_dependants too."""
        self.http = StubTreq(RecordAPI(self.front_node).resource())
        code, _, body = self.get("/books/1?cache=1")
        self.assertEqual((code, json.loads(body)["error"]), (400, "no_dependants"))


class FrontReadTests(FrontTestsMixin, SynchronousTestCase):
    # Reads are the front's own: dependants that do not mirror each other
    # show which one answered.
    mirror = False

    def test_dependants_are_read_each_time(self):
        """A new servers.list (SIGHUP) is used from the next request on."""
        self.write_directly(B, "POST", "/books/1", "one")
        self.dependants = [A]
        self.assertEqual(self.get("/books/1?cache=1")[0], 404)
        self.dependants = [A, B]
        self.assertEqual(self.get("/books/1?cache=1")[0], 200)

    def test_miss_then_hit(self):
        """The first GET asks the dependants, the next one is a hit."""
        record = self.write_directly(A, "POST", "/books/1", "one")
        code, headers, body = self.get("/books/1?cache=1")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), record)
        self.assertEqual(headers.getRawHeaders("etag"), ['"%s"' % record["version"]])
        self.assertEqual(self.requests(), 1)  # the first dependant had it
        self.assertEqual(self.get("/books/1?cache=1")[2], body)
        self.assertEqual(self.requests(), 1)
        self.assertEqual((self.front.hits, self.front.misses), (1, 1))

    def test_found_on_one_dependant_only(self):
        """404 only when every dependant said 404: one holding it is enough."""
        record = self.write_directly(B, "POST", "/books/1", "one")
        code, _, body = self.get("/books/1?cache=1")
        self.assertEqual((code, json.loads(body)), (200, record))

    def test_reads_take_turns(self):
        """Misses ask one dependant first, each in turn, to spread the load."""
        for uid in "123":
            self.write_directly(A, "POST", "/books/" + uid, uid)
            self.write_directly(B, "POST", "/books/" + uid, uid)
        for uid in "123":
            self.assertEqual(self.get("/books/%s?cache=1" % uid)[0], 200)
        self.assertEqual(len(self.net.requests_to(A)), 2)
        self.assertEqual(len(self.net.requests_to(B)), 1)

    def test_slow_dependant_is_hedged(self):
        """A first dependant that does not answer: the others are asked after the hedge delay."""
        record = self.write_directly(B, "POST", "/books/1", "one")
        self.net.hang(A)
        code, _, body = self.get("/books/1?cache=1", advance=self.front.hedge)
        self.assertEqual((code, json.loads(body)), (200, record))
        self.clock.advance(self.timeout)  # A's request times out, quietly

    def test_404_is_not_cached(self):
        """A GET every dependant answers 404 is not cached as a record."""
        code, _, body = self.get("/books/1?cache=1")
        self.assertEqual(code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
        self.assertEqual(len(self.front.lru), 0)
        self.write_directly(A, "POST", "/books/1", "one")
        self.assertEqual(self.get("/books/1?cache=1")[0], 200)

    def test_hit_with_if_none_match(self):
        """A client's matching If-None-Match on a hit: 304 from the cache."""
        _, headers, _ = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        etag = headers.getRawHeaders("etag")[0]
        before = self.requests()
        code, headers, body = self.get("/books/1?cache=1", headers={"if-none-match": etag})
        self.assertEqual((code, body), (304, b""))
        self.assertEqual(headers.getRawHeaders("etag"), [etag])
        self.assertEqual(self.requests(), before)

    def test_fresh_served_while_dependants_down(self):
        """A fresh entry is served while every dependant is down."""
        _, _, posted = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(A)
        self.net.down(B)
        self.clock.advance(self.ttl - 1)
        self.assertEqual(self.get("/books/1?cache=1")[:3:2], (200, posted))

    def test_stale_revalidated_with_304(self):
        """
        A stale entry is revalidated with If-None-Match; the 304 renews it
        for another ttl.
        """
        _, headers, posted = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        etag = headers.getRawHeaders("etag")[0]
        self.clock.advance(self.ttl)
        before = len(self.net.requests)
        code, _, body = self.get("/books/1?cache=1")
        self.assertEqual((code, body), (200, posted))
        self.assertEqual(self.front.revalidations, 1)
        self.assertEqual(self.front.not_modified, 1)
        self.assertEqual(len(self.net.requests), before + 1)
        # The dependant was asked with the entry's ETag: it said 304.
        said_304 = [
            self.nodes[url].metrics.requests.labels("record", "GET", "304")._value.get() for url in (A, B)
        ]
        self.assertEqual(sum(said_304), 1)
        self.clock.advance(self.ttl - 1)
        self.get("/books/1?cache=1")
        self.assertEqual(len(self.net.requests), before + 1)
        self.assertTrue(etag)

    def test_stale_revalidated_to_a_new_version(self):
        """A record changed behind the front's back is seen once the entry is stale."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        newer = self.write_directly(A, "PUT", "/books/1", "two")
        self.assertEqual(json.loads(self.get("/books/1?cache=1")[2])["value"], "one")
        self.clock.advance(self.ttl)
        code, headers, body = self.get("/books/1?cache=1")
        self.assertEqual(json.loads(body)["value"], "two")
        self.assertEqual(headers.getRawHeaders("etag")[0], '"%s"' % newer["version"])
        self.assertEqual(json.loads(self.get("/books/1?cache=1")[2])["value"], "two")

    def test_stale_and_deleted_behind_the_front(self):
        """A stale entry whose record is gone everywhere: 404, forgotten."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        http = self.net.stubs[A]
        d = http.delete(A + "/books/1")
        http.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.clock.advance(self.ttl)
        self.assertEqual(self.get("/books/1?cache=1")[0], 404)
        self.assertEqual(len(self.front.lru), 0)

    def test_stale_and_down_is_502_by_default(self):
        """Without --cache-stale-if-error a stale entry is not served when nobody answers."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(A)
        self.net.down(B)
        self.clock.advance(self.ttl)
        code, _, body = self.get("/books/1?cache=1")
        self.assertEqual(code, 502)
        self.assertEqual(json.loads(body)["error"], "bad_gateway")

    def test_concurrent_misses_share_one_round(self):
        """Two GETs of one uid while the dependants are slow: one request each."""
        self.net.hang(A)
        self.net.hang(B)
        d1 = self.http.request("GET", FRONT + "/books/1?cache=1")
        d2 = self.http.request("GET", FRONT + "/books/1?cache=1")
        self.http.flush()
        self.assertEqual(len(self.net.requests), 1)
        self.clock.advance(self.front.hedge)
        self.assertEqual(len(self.net.requests), 2)
        self.clock.advance(self.timeout)
        self.http.flush()
        self.assertEqual([self.successResultOf(d).code for d in (d1, d2)], [502, 502])

    def test_hit_is_answered_at_once(self):
        """A hit is answered within the request's rendering: no dependant asked, no Deferred."""
        from twisted.web.test.requesthelper import DummyRequest

        _, _, posted = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        before = self.requests()
        request = DummyRequest([b"books", b"1"])
        request.path, request.uri, request.args = b"/books/1", b"/books/1?cache=1", {b"cache": [b"1"]}
        request.code = 200  # twisted.web's Request has its code from the start (DummyRequest: responseCode)
        self.assertEqual(self.api.resource().render(request), posted)
        self.assertEqual(self.requests(), before)


class StaleIfErrorTests(FrontTestsMixin, SynchronousTestCase):
    stale_if_error = 30.0

    def test_stale_served_with_a_warning(self):
        """
        While every dependant is down, a stale entry is served with a
        Warning for --cache-stale-if-error seconds past its freshness.
        """
        _, _, posted = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(A)
        self.net.down(B)
        self.clock.advance(self.ttl + 29)
        code, headers, body = self.get("/books/1?cache=1")
        self.assertEqual((code, body), (200, posted))
        self.assertEqual(headers.getRawHeaders("warning"), [STALE_WARNING.decode()])
        self.assertEqual(self.front.stale_served, 1)
        self.clock.advance(1)
        self.assertEqual(self.get("/books/1?cache=1")[0], 502)

    def test_fresh_again_without_warning(self):
        """Once a dependant answers again, the entry is renewed and no Warning is sent."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(A)
        self.net.down(B)
        self.clock.advance(self.ttl + 1)
        self.assertTrue(self.get("/books/1?cache=1")[1].hasHeader("warning"))
        self.net.up(B)
        code, headers, _ = self.get("/books/1?cache=1")
        self.assertEqual(code, 200)
        self.assertFalse(headers.hasHeader("warning"))


class SmallCacheTests(FrontTestsMixin, SynchronousTestCase):
    size = 1000

    def test_bounded_in_bytes_of_the_stored_json(self):
        """
        The cache counts the bytes of the records' JSON as stored and
        served, and evicts the least recently used to stay within its size.
        """
        bodies = {}
        for i in range(10):
            _, _, body = self.call("POST", "/books/%d?cache=1" % i, json={"value": "v" * 100})
            bodies[str(i)] = body
        status = self.front.status()
        held = [uid for uid in bodies if ("books", uid) in self.front.lru]
        self.assertEqual(status["bytes"], sum(len(bodies[uid]) for uid in held))
        self.assertLessEqual(status["bytes"], self.size)
        self.assertEqual(status["entries"], len(held))
        self.assertEqual(status["evictions"], 10 - len(held))
        self.assertGreater(status["evictions"], 0)
        self.assertEqual(held, [str(i) for i in range(10 - len(held), 10)])


class FrontStatusTests(FrontTestsMixin, SynchronousTestCase):
    mirror = False

    def test_status_and_metrics(self):
        """/_node/status and /metrics show entries, bytes, hits, misses, revalidations, evictions."""
        self.write_directly(A, "POST", "/books/1", "one")
        _, _, body = self.get("/books/1?cache=1")
        self.get("/books/1?cache=1")
        self.clock.advance(self.ttl)
        self.get("/books/1?cache=1")
        code, _, status = self.get("/_node/status")
        cache = json.loads(status)["cache"]
        self.assertEqual(
            {k: cache[k] for k in ("entries", "bytes", "hits", "misses", "revalidations", "evictions")},
            {"entries": 1, "bytes": len(body), "hits": 1, "misses": 1, "revalidations": 1, "evictions": 0},
        )
        self.assertEqual([d["url"] for d in cache["dependants"]], [A, B])
        self.assertEqual([d["state"] for d in cache["dependants"]], ["up", "up"])
        _, _, metrics = self.get("/metrics")
        for line in (
            "minstore_cache_entries 1.0",
            "minstore_cache_bytes %d.0" % len(body),
            "minstore_cache_hits_total 1.0",
            "minstore_cache_misses_total 1.0",
            "minstore_cache_revalidations_total 1.0",
            "minstore_cache_evictions_total 0.0",
        ):
            self.assertIn(line, metrics.decode().splitlines())


class CacheOptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        from minstore.tap import Options

        options = Options()
        options.parseOptions(["--data", self.mktemp()] + list(argv))
        return options

    def test_defaults(self):
        """64 MiB, 60 s of freshness, 5 s per dependant, no stale-if-error."""
        options = self.parse()
        self.assertEqual(
            [options[k] for k in ("cache-size", "cache-ttl", "cache-timeout", "cache-stale-if-error")],
            [64 * 1024 * 1024, 60.0, 5.0, 0.0],
        )

    def test_values(self):
        options = self.parse("--cache-size", "1000", "--cache-ttl", "0", "--cache-stale-if-error", "30")
        self.assertEqual((options["cache-size"], options["cache-ttl"], options["cache-stale-if-error"]), (1000, 0.0, 30.0))

    def test_bad_values_stop_the_start(self):
        """A bad cache option: one line on stderr and exit status 2."""
        import io
        import sys

        for argv in (["--cache-size", "0"], ["--cache-ttl", "-1"], ["--cache-timeout", "0"], ["--cache-stale-if-error", "x"]):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            with self.assertRaises(SystemExit) as raised:
                self.parse(*argv)
            self.assertEqual(raised.exception.code, 2)
            self.assertIn(argv[0], err.getvalue())


class FrontIssue12Tests(FrontTestsMixin, SynchronousTestCase):
    """The cache front's defects of issue 12."""

    stale_if_error = 30.0

    def test_failed_delete_keeps_the_entry(self):
        """A DELETE no dependant answered (502) does not evict: later GETs are served stale, not 502."""
        _, _, posted = self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.net.down(A)
        self.net.down(B)
        self.assertEqual(self.call("DELETE", "/books/1?cache=1")[0], 502)
        self.clock.advance(self.ttl + 1)
        code, headers, body = self.get("/books/1?cache=1")
        self.assertEqual((code, body), (200, posted))
        self.assertTrue(headers.hasHeader("warning"))

    def test_502_says_what_happened(self):
        """Refused connections are reported as such, not as a timeout."""
        self.net.down(A)
        self.net.down(B)
        for method in ("GET", "POST", "DELETE"):
            code, _, body = self.call(method, "/books/1?cache=1", json={"value": 1})
            message = json.loads(body)["message"]
            self.assertEqual(code, 502)
            self.assertIn("%s: connection refused" % A, message)
            self.assertIn("%s: connection refused" % B, message)
            self.assertNotIn("within", message)

    def test_status_shows_what_the_front_last_saw(self):
        """/_node/status shows dependants down once they failed to answer, with the error."""
        self.assertEqual([d["state"] for d in self.front.status()["dependants"]], ["unknown", "unknown"])
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.assertEqual(self.front.status()["dependants"][0]["state"], "up")
        self.net.down(A)
        self.net.down(B)
        self.clock.advance(self.ttl)
        self.get("/books/1?cache=1")
        _, _, status = self.get("/_node/status")
        dependants = json.loads(status)["cache"]["dependants"]
        self.assertEqual([(d["url"], d["state"], d["last_error"]) for d in dependants],
                         [(A, "down", "connection refused"), (B, "down", "connection refused")])

    def test_listings_are_a_dependants(self):
        """GET /{collection}/?cache=1 and the collections of GET /?cache=1 come from a dependant."""
        self.call("POST", "/books/1?cache=1", json={"value": "one"})
        self.call("POST", "/books/2?cache=1", json={"value": "two"})
        code, _, body = self.get("/books/?cache=1&limit=1")
        page = json.loads(body)
        self.assertEqual((code, [r["uid"] for r in page["items"]]), (200, ["1"]))
        code, _, body = self.get("/books/?cache=1&after=" + page["next"])
        self.assertEqual([r["uid"] for r in json.loads(body)["items"]], ["2"])
        code, _, body = self.get("/?cache=1", headers={"accept": "application/json"})
        self.assertEqual((code, json.loads(body)["collections"]), (200, ["books"]))
        self.assertEqual(self.get("/", headers={"accept": "application/json"})[2].count(b"books"), 0)
        self.net.down(A)
        self.assertEqual(self.get("/books/?cache=1")[0], 200)  # the next dependant
        self.net.down(B)
        self.assertEqual(self.get("/books/?cache=1")[0], 502)
