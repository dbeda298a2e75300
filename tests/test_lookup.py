"""
Lookups across nodes (DESIGN section 4): a GET or DELETE that misses
locally asks the peers in parallel, following the peer graph with loop
protection and a deadline; the first hit wins, 404 only when every node
reached misses.
"""

import json
from urllib.parse import quote

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from minstore.cluster.lookup import first_hit
from minstore.errors import NotFound, PreconditionFailed
from minstore.testing.fakes import Cluster, url


class FirstHitTests(SynchronousTestCase):
    def test_first_hit_wins(self):
        """The first result that is not None fires the Deferred; later results are ignored."""
        ds = [Deferred() for _ in range(3)]
        hit = first_hit(ds)
        ds[1].callback(None)
        self.assertNoResult(hit)
        ds[2].callback(b"found")
        results = []
        hit.addCallback(results.append)
        ds[0].callback(b"late")
        self.assertEqual(results, [b"found"])

    def test_all_miss(self):
        """None once every Deferred fired None or failed with an error that is not a MinstoreError."""
        ds = [Deferred() for _ in range(3)]
        hit = first_hit(ds)
        ds[0].callback(None)
        ds[1].errback(ConnectionRefusedError("down"))
        self.assertNoResult(hit)
        ds[2].callback(None)
        self.assertIsNone(self.successResultOf(hit))

    def test_no_deferreds(self):
        """No peers to ask: None at once."""
        self.assertIsNone(self.successResultOf(first_hit([])))

    def test_minstore_error_when_nothing_hits(self):
        """A MinstoreError (a 412 from the node holding the record) is passed on when nothing hits."""
        ds = [Deferred(), Deferred()]
        hit = first_hit(ds)
        ds[0].errback(PreconditionFailed(message="no match"))
        self.assertNoResult(hit)
        ds[1].callback(None)
        self.failureResultOf(hit, PreconditionFailed)

    def test_hit_beats_minstore_error(self):
        """A hit wins over a MinstoreError from another peer."""
        hit = first_hit([fail(PreconditionFailed(message="no")), Deferred(), fail(NotFound())])
        self.assertNoResult(hit)
        d = Deferred()
        hit = first_hit([fail(PreconditionFailed(message="no")), d])
        d.callback(b"found")
        self.assertEqual(self.successResultOf(hit), b"found")


class LookupTests(SynchronousTestCase):
    def setUp(self):
        self.cluster = Cluster(self)

    def lookups(self):
        return [(m, u) for m, u in self.cluster.net.requests if "/_cluster/lookup/" in u]

    def test_get_finds_record_on_peer(self):
        """GET on a node that misses answers 200 with the record a peer holds, with its ETag."""
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        data = b.write("x", {"k": "v"})
        response, body = a.request("GET", "/c/x")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, data)
        self.assertEqual(
            response.headers.getRawHeaders(b"etag"), [b'"%s"' % json.loads(data)["version"].encode()]
        )
        self.assertEqual(
            self.lookups(), [("GET", url("b") + "/_cluster/lookup/c/x?visited=a&asked=" + url("b"))]
        )
        # A lookup does not store what it found.
        self.assertIsNone(a.stored("x"))

    def test_get_follows_a_chain(self):
        """A->B->C: GET on A finds a record only C holds, through B."""
        c = self.cluster.add("c")
        self.cluster.add("b", peers=["c"])
        a = self.cluster.add("a", peers=["b"])
        data = c.write("x", 1)
        response, body = a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, data))
        self.assertEqual(
            [u for _, u in self.lookups()],
            [
                url("b") + "/_cluster/lookup/c/x?visited=a&asked=" + url("b"),
                url("c") + "/_cluster/lookup/c/x?visited=a,b&asked=%s,%s" % (url("b"), url("c")),
            ],
        )

    def test_odd_uid_found(self):
        """A uid with a slash, spaces and non-ASCII characters is found on a peer intact."""
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        uid = "dir/é x?&%"
        data = b.write(uid, 1)
        response, body = a.request("GET", "/c/dir%2F%C3%A9%20x%3F%26%25")
        self.assertEqual((response.code, body), (200, data))

    def test_any_peer_may_hold_it(self):
        """With several peers, the one that holds the record answers, whatever its place in the list."""
        self.cluster.add("b")
        self.cluster.add("c")
        d = self.cluster.add("d")
        a = self.cluster.add("a", peers=["b", "c", "d"])
        data = d.write("x", 1)
        response, body = a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, data))

    def test_all_miss_is_404(self):
        """When no node reached holds the uid, GET answers 404 not_found."""
        self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        response, body = a.request("GET", "/c/nobody")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")

    def test_cycle_that_misses_ends(self):
        """
        A->B->C->A where nobody holds the uid: 404, after one request to
        each node (the walk does not come back through A).
        """
        self.cluster.add("c", peers=["a"])
        self.cluster.add("b", peers=["c"])
        a = self.cluster.add("a", peers=["b"])
        response, _ = a.request("GET", "/c/nobody")
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.lookups()), 3)

    def test_full_mesh_that_misses_ends(self):
        """Four nodes all listing each other, all missing: 404 after a bounded number of requests."""
        names = ["a", "b", "c", "d"]
        members = {n: self.cluster.add(n, peers=[p for p in names if p != n]) for n in names}
        response, _ = members["a"].request("GET", "/c/nobody")
        self.assertEqual(response.code, 404)
        # a asks its 3 peers and tells them it does; each of them skips the
        # peers already asked and asks only a (which sees itself on the walk):
        # 2(N-1) requests, not the (N-1)!-fold walk of every path.
        bound = 2 * (len(names) - 1)
        asked = len(self.lookups())
        self.assertGreaterEqual(asked, 3)
        self.assertLessEqual(asked, bound)
        response, _ = members["b"].request("DELETE", "/c/nobody")
        self.assertEqual(response.code, 404)
        self.assertLessEqual(len(self.lookups()), 2 * bound)

    def test_local_never_asks(self):
        """GET ?local=1 and DELETE ?local=1 answer 404 from this node's storage only."""
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        b.write("x", 1)
        self.assertEqual(a.request("GET", "/c/x?local=1")[0].code, 404)
        self.assertEqual(a.request("DELETE", "/c/x?local=1")[0].code, 404)
        self.assertEqual(self.lookups(), [])
        self.assertEqual(json.loads(b.stored("x"))["value"], 1)

    def test_delete_on_the_holder(self):
        """DELETE on a node that misses deletes the record on the node holding it (a tombstone there)."""
        c = self.cluster.add("c")
        b = self.cluster.add("b", peers=["c"])
        a = self.cluster.add("a", peers=["b"])
        data = c.write("x", 1)
        response, body = a.request("DELETE", "/c/x")
        self.assertEqual(response.code, 200)
        answer = json.loads(body)
        self.assertEqual((answer["deleted"], answer["uid"]), (True, "x"))
        self.assertGreater(answer["version"], json.loads(data)["version"])
        self.assertTrue(json.loads(c.stored("x"))["deleted"])
        self.assertIsNone(b.stored("x"))
        self.assertEqual(a.request("GET", "/c/x")[0].code, 404)
        self.assertEqual(a.request("DELETE", "/c/x")[0].code, 404)

    def test_delete_if_match(self):
        """DELETE with an If-Match the holder's version fails is 412 and deletes nothing; a matching one deletes."""
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        data = b.write("x", 1)
        response, body = a.request("DELETE", "/c/x", headers={b"if-match": [b'"nope"']})
        self.assertEqual(response.code, 412)
        self.assertEqual(json.loads(body)["error"], "precondition_failed")
        self.assertEqual(b.stored("x"), data)
        etag = ('"%s"' % json.loads(data)["version"]).encode()
        response, _ = a.request("DELETE", "/c/x", headers={b"if-match": [etag]})
        self.assertEqual(response.code, 200)
        self.assertTrue(json.loads(b.stored("x"))["deleted"])

    def test_deadline(self):
        """A peer that never answers: the lookup gives up at the deadline and answers 404."""
        self.cluster.add("h")
        a = self.cluster.add("a", peers=["h"])
        self.cluster.net.hang(url("h"))
        d = a.http.get(a.url + "/c/x")
        a.http.flush()
        self.assertNoResult(d)
        self.cluster.advance(1.9)
        self.assertNoResult(d)
        self.cluster.advance(0.1)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 404)

    def test_hung_peer_does_not_delay_a_hit(self):
        """One hung peer and one holding the record: the hit is answered at once."""
        self.cluster.add("h")
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["h", "b"])
        self.cluster.net.hang(url("h"))
        data = b.write("x", 1)
        response, body = a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, data))

    def test_down_peer_is_a_miss(self):
        """A peer refusing connections counts as a miss, not an error."""
        b = self.cluster.add("b")
        self.cluster.add("d")
        a = self.cluster.add("a", peers=["d", "b"])
        self.cluster.net.down(url("d"))
        self.assertEqual(a.request("GET", "/c/x")[0].code, 404)
        data = b.write("x", 1)
        response, body = a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, data))

    def test_visited_node_answers_404(self):
        """The lookup route answers 404 on a node already in visited, even when it holds the record."""
        b = self.cluster.add("b")
        b.write("x", 1)
        response, _ = b.request("GET", "/_cluster/lookup/c/x?visited=a,b")
        self.assertEqual(response.code, 404)
        response, body = b.request("GET", "/_cluster/lookup/c/x?visited=a")
        self.assertEqual((response.code, body), (200, b.stored("x")))

    def test_tombstone_beats_older_peer_copy(self):
        """
        A node holding a tombstone does not answer a GET with an older copy
        of the record that a lagging peer still holds: 404.  A copy newer
        than the tombstone is still found.
        """
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["b"])
        a.write("x", 1)
        self.assertIsNotNone(b.stored("x"))
        self.cluster.net.down(url("b"))
        a.delete("x")
        self.cluster.net.up(url("b"))  # back, but a's retry is not due yet
        self.assertFalse(json.loads(b.stored("x")).get("deleted"))
        response, _ = a.request("GET", "/c/x")
        self.assertEqual(response.code, 404)

        # A record made again on another node after the delete is found.
        c = self.cluster.add("c")
        a2 = self.cluster.add("a2", peers=["c"])
        self.cluster.advance(0.01)
        a2.write("y", 1)
        a2.delete("y")
        self.cluster.advance(0.01)
        newer = c.write("y", 2)
        response, body = a2.request("GET", "/c/y")
        self.assertEqual((response.code, body), (200, newer))

    def test_tombstone_on_the_way_beats_older_copy(self):
        """
        A->B->C where B deleted the record and C, lagging, still holds the
        older copy: GET on A is 404, not the deleted record.
        """
        c = self.cluster.add("c")
        b = self.cluster.add("b", peers=["c"])
        a = self.cluster.add("a", peers=["b"])
        old = b.write("x", 1)
        self.assertEqual(c.stored("x"), old)
        self.cluster.net.down(url("c"))
        b.delete("x")
        self.cluster.net.up(url("c"))  # back, but b's retry is not due yet
        self.assertEqual(c.stored("x"), old)
        response, _ = a.request("GET", "/c/x")
        self.assertEqual(response.code, 404)
        # A copy written on C after the delete is found.
        self.cluster.advance(0.01)
        newer = c.write("x", 2)
        response, body = a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, newer))


class MalformedPeerTests(SynchronousTestCase):
    """A peer answering a lookup 200 with something that is not the record asked for."""

    def setUp(self):
        from twisted.web.resource import Resource

        self.cluster = Cluster(self)
        bodies = self.bodies = [b"<html>not json</html>"]

        class Liar(Resource):
            isLeaf = True

            def render(self, request):
                request.setHeader(b"content-type", b"application/json")
                return bodies[0]

        self.cluster.net.add(url("liar"), Liar())

    def test_malformed_answer_is_that_peer_missing(self):
        """
        It counts as that peer missing (404 when nobody else holds it, the
        record when another peer does), is logged, and is counted in /metrics;
        never a 500.
        """
        b = self.cluster.add("b")
        a = self.cluster.add("a", peers=["liar"])
        for body in [b"<html>not json</html>", b"[1, 2]", b'{"version": "1"}',
                     json.dumps({"collection": "c", "uid": "other", "version": "1"}).encode()]:
            self.bodies[0] = body
            response, answer = a.request("GET", "/c/x")
            self.assertEqual((response.code, json.loads(answer)["error"]), (404, "not_found"), body)
        self.assertEqual(a.request("DELETE", "/c/x")[0].code, 404)
        metrics = a.request("GET", "/metrics")[1].decode()
        self.assertIn('minstore_lookup_bad_answers_total{peer="%s"} 5.0' % url("liar"), metrics)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        # Another peer's hit still wins.
        c = self.cluster.add("c", peers=["liar", "b"])
        data = b.write("x", 1)
        response, body = c.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, data))


class NewerThanTests(SynchronousTestCase):
    """
    A lookup counts a peer's answer only when it is newer than what this
    node holds, a tombstone included (DESIGN section 4, issue 10 item 5).
    """

    def setUp(self):
        self.cluster = Cluster(self)
        self.b = self.cluster.add("b")
        self.a = self.cluster.add("a", peers=["b"])
        self.old = self.a.write("x", "old")
        self.assertEqual(self.b.stored("x"), self.old)
        # b misses the delete: down when it is sent, back before a's retry.
        self.cluster.net.down(self.b.url)
        self.deleted = self.a.delete("x")
        self.cluster.net.up(self.b.url)
        self.assertEqual(self.b.stored("x"), self.old)
        self.tombstone_version = json.loads(self.deleted)["version"]

    def lookups(self):
        return [(m, u) for m, u in self.cluster.net.requests if "/_cluster/lookup/" in u]

    def deliver_tombstone(self):
        """Let a's retry bring b the tombstone."""
        self.cluster.advance(8.0)
        self.assertEqual(self.b.stored("x"), self.deleted)

    def test_older_copy_never_brings_a_deleted_record_back(self):
        """
        GET of a uid deleted here, with a peer still holding the older live
        copy: 404; the lookup told the peer the tombstone's version, and the
        peer answered it a miss itself.
        """
        response, body = self.a.request("GET", "/c/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
        [(method, lookup)] = self.lookups()
        self.assertEqual(method, "GET")
        self.assertIn("&newer_than=" + quote(self.tombstone_version, safe=""), lookup)
        # The peer's own answer: a miss against the tombstone, a hit without it.
        path = "/_cluster/lookup/c/x?visited=a&newer_than=" + quote(self.tombstone_version, safe="")
        self.assertEqual(self.b.request("GET", path)[0].code, 404)
        response, body = self.b.request("GET", "/_cluster/lookup/c/x?visited=a")
        self.assertEqual((response.code, body), (200, self.old))
        self.deliver_tombstone()
        self.assertEqual(self.a.request("GET", "/c/x")[0].code, 404)

    def test_asking_node_checks_the_answer_again(self):
        """A peer that ignores newer_than (an older minstore) and answers its older copy is still a miss: 404."""
        answer = self.b.lookups.answer

        def ignoring(collection, uid, visited, method="GET", if_match=None, asked=(), newer_than=None):
            return answer(collection, uid, visited, method, if_match, asked)

        self.b.lookups.answer = ignoring
        self.b.api.cluster.lookups = self.b.lookups
        self.assertEqual(self.a.request("GET", "/c/x")[0].code, 404)
        self.assertEqual(self.a.request("GET", "/c/x?local=1")[0].code, 404)

    def test_delete_not_carried_out_on_an_older_copy(self):
        """
        DELETE of a uid held here as a tombstone, a peer still holding the
        older live copy: 404, and the peer keeps its copy (not deleted with
        its own clock) until the tombstone's replica reaches it; then both
        hold the same tombstone, the one made here.
        """
        response, body = self.a.request("DELETE", "/c/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
        [(method, lookup)] = self.lookups()
        self.assertEqual(method, "DELETE")
        self.assertIn("&newer_than=" + quote(self.tombstone_version, safe=""), lookup)
        self.assertEqual(self.b.stored("x"), self.old)
        self.assertEqual(self.a.stored("x"), self.deleted)
        self.deliver_tombstone()
        self.assertEqual(self.a.stored("x"), self.b.stored("x"))

    def test_delete_on_the_way_is_not_carried_out_further(self):
        """
        A->B->C where B deleted the record and C, lagging, still holds the
        older copy: DELETE on A (which holds nothing) is 404 and C keeps its
        copy (B raised newer_than to its tombstone's version on the walk).
        """
        c = self.cluster.add("c")
        b2 = self.cluster.add("b2", peers=["c"])
        a2 = self.cluster.add("a2", peers=["b2"])
        old = b2.write("y", 1)
        self.assertEqual(c.stored("y"), old)
        self.cluster.net.down(c.url)
        tomb = b2.delete("y")
        self.cluster.net.up(c.url)
        response, _ = a2.request("DELETE", "/c/y")
        self.assertEqual(response.code, 404)
        self.assertEqual(c.stored("y"), old)
        to_c = [u for _, u in self.lookups() if u.startswith(c.url)]
        self.assertEqual(len(to_c), 1)
        self.assertIn("&newer_than=" + quote(json.loads(tomb)["version"], safe=""), to_c[0])
        self.assertIsNone(a2.stored("y"))

    def test_newer_copy_is_served(self):
        """
        A peer holding a copy written after the delete here is served (GET
        200 with it), and a DELETE here is carried out on it (on the peer,
        with a version after its copy's).
        """
        self.cluster.advance(0.01)  # a's retry is still 1 s away
        newer = self.b.write("x", "again")
        self.assertGreater(json.loads(newer)["version"], self.tombstone_version)
        response, body = self.a.request("GET", "/c/x")
        self.assertEqual((response.code, body), (200, newer))
        self.assertIsNone(json.loads(self.a.stored("x")).get("value"))  # a lookup stores nothing
        response, body = self.a.request("DELETE", "/c/x")
        self.assertEqual(response.code, 200)
        self.assertGreater(json.loads(body)["version"], json.loads(newer)["version"])
        self.assertTrue(json.loads(self.b.stored("x"))["deleted"])
        self.assertEqual(json.loads(self.b.stored("x"))["version"], json.loads(body)["version"])
        # The older tombstone's replica, when it comes, changes nothing there.
        self.cluster.advance(8.0)
        self.assertEqual(json.loads(self.b.stored("x"))["version"], json.loads(body)["version"])

    def test_nothing_held_sends_no_newer_than(self):
        """A node that holds nothing of the uid asks without newer_than: any copy counts."""
        data = self.b.write("z", 1)
        response, body = self.a.request("GET", "/c/z")
        self.assertEqual((response.code, body), (200, data))
        self.assertNotIn("newer_than", self.lookups()[-1][1])
