"""
Filters on indexed fields and the changes feed, through the HTTP API
(StubTreq, the memory engine), and a real node that builds an index
declared at a restart.
"""

import json
from urllib.parse import quote

from twisted.trial.unittest import TestCase

from minstore.node import Node
from minstore.storage.indexes import parse_declarations
from minstore.storage.memory import MemoryStorage
from minstore.testing import item
from tests.harness import NodeTestMixin, deferred_test, sleep
from tests.test_api import APITestCase, ManualThreads


class HeldBuild(ManualThreads):
    """Thread calls as in ManualThreads; the index build's steps wait for L{release}."""

    def __init__(self):
        ManualThreads.__init__(self)
        self.held = []

    def __call__(self, f, *args):
        if args and args[0] == "index_build":
            d = ManualThreads.__call__(self, f, *args)
            self.held.append(self.pending.pop())
            return d
        return ManualThreads.__call__(self, f, *args)

    def release(self):
        while self.held:
            self.pending.append(self.held.pop(0))
            self.flush()


def q(value):
    return quote(value, safe="")


class IndexTestCase(APITestCase):
    indexes = "books:value.year,*:lang,books:value.author.name"

    def make_node(self, processes=(), storage=None, indexes=None):
        return Node(
            storage or MemoryStorage(),
            processes,
            node_id="node1",
            now=self.time,
            in_thread=self.threads,
            indexes=parse_declarations(self.indexes if indexes is None else indexes),
        )

    def uids(self, path):
        response = self.get(path)
        self.assertEqual(response.code, 200, response.body)
        return [r["uid"] for r in response.json()["items"]]


class FilterTests(IndexTestCase):
    def fill_years(self):
        for uid, year in [("dune", 1965), ("dune-str", "1965"), ("float", 1965.0), ("old", 1960), ("new", 2001),
                          ("null", None), ("yes", True)]:
            self.post("/books/" + uid, {"year": year})
        self.post("/books/none", {"title": "no year"})
        self.post("/books/scalar", "a string value")

    def test_equal_reads_json_else_a_string(self):
        """1965 is a number (2 and 2.0 one value), "1965" a string, true and null themselves; text that is not JSON a string."""
        self.fill_years()
        self.post("/books/word", {"year": "MCMLXV"})
        self.assertEqual(self.uids("/books/?value.year=1965"), ["dune", "float"])
        self.assertEqual(self.uids("/books/?value.year=" + q('"1965"')), ["dune-str"])
        self.assertEqual(self.uids("/books/?value.year=true"), ["yes"])
        self.assertEqual(self.uids("/books/?value.year=null"), ["null"])
        self.assertEqual(self.uids("/books/?value.year=MCMLXV"), ["word"])
        self.assertEqual(self.uids("/books/?value.year=1966"), [])

    def test_ranges_and_the_order_across_types(self):
        """min_, max_, gt_, lt_ combine on one field; null < booleans < numbers < strings; absent fields are not listed."""
        self.fill_years()
        self.assertEqual(self.uids("/books/?min_value.year=null"), ["null", "yes", "old", "dune", "float", "new", "dune-str"])
        self.assertEqual(self.uids("/books/?min_value.year=1960&max_value.year=1965"), ["old", "dune", "float"])
        self.assertEqual(self.uids("/books/?gt_value.year=1960&lt_value.year=2001"), ["dune", "float"])
        self.assertEqual(self.uids("/books/?gt_value.year=2001"), ["dune-str"])
        self.assertEqual(self.uids("/books/?lt_value.year=0"), ["null", "yes"])

    def test_dotted_paths_and_star(self):
        """A nested path, and a field declared for every collection (*)."""
        self.post("/books/a", {"author": {"name": "Herbert"}})
        self.post("/books/b", {"author": {"name": "Le Guin"}})
        self.post("/books/c", {"author": "Herbert"})
        self.assertEqual(self.uids("/books/?value.author.name=Herbert"), ["a"])
        self.assertEqual(self.uids("/books/?min_value.author.name=I"), ["b"])
        # lang is declared for *, but records here have none (no process): nothing indexed, yet no 400.
        self.assertEqual(self.uids("/films/?lang=en"), [])

    def test_field_not_indexed(self):
        """A field not declared for the collection: 400 field_not_indexed naming what is; never a scan."""
        self.post("/books/a", {"year": 1, "title": "x"})
        document = self.assertError(self.get("/books/?value.title=x"), 400, "field_not_indexed")
        self.assertIn("value.year", document["message"])
        self.assertError(self.get("/films/?value.year=1"), 400, "field_not_indexed")
        self.assertError(self.get("/books/?min_value.title=x"), 400, "field_not_indexed")
        self.assertError(self.get("/books/?value=x"), 400, "field_not_indexed")

    def test_one_field_per_request_and_no_prefix(self):
        self.assertError(self.get("/books/?value.year=1&lang=en"), 400, "bad_parameter")
        self.assertError(self.get("/books/?value.year=1&prefix=a"), 400, "bad_parameter")

    def test_updates_and_deletes_move_and_leave_the_index(self):
        self.post("/books/a", {"year": 1})
        self.post("/books/b", {"year": 1})
        self.put("/books/a", {"year": 2})
        self.delete("/books/b")
        self.assertEqual(self.uids("/books/?value.year=1"), [])
        self.assertEqual(self.uids("/books/?value.year=2"), ["a"])
        self.post("/books/b", {"year": 1})
        self.assertEqual(self.uids("/books/?value.year=1"), ["b"])

    def test_replicas_are_indexed(self):
        """A replica from a peer goes through the same storage write: it is indexed, and its tombstone leaves."""
        d = self.node.apply_replica(item("books", "r", {"year": 7}, "0000000000009-000000-peer").data)
        self.threads.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.uids("/books/?value.year=7"), ["r"])
        d = self.node.apply_replica(item("books", "r", deleted=True, version="0000000000010-000000-peer").data)
        self.threads.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.uids("/books/?value.year=7"), [])

    def test_paging_under_writes_skips_and_repeats_nothing(self):
        """
        Pages of a filtered listing, with records added before and after the
        cursor, others deleted and updated between pages: every matching
        record left alone is seen exactly once, in (value, uid) order.
        """
        for i in range(30):
            self.post("/books/u%02d" % i, {"year": i % 5})
        untouched = set("u%02d" % i for i in range(30) if i % 5 >= 2)
        seen, path, pages = [], "/books/?min_value.year=2&limit=4", 0
        while pages < 30:
            document = self.get(path).json()
            pages += 1
            seen.extend((r["value"]["year"], r["uid"]) for r in document["items"])
            # Writes between pages: new matching records on both sides of the cursor,
            # deletes and updates of records that do not match.
            self.post("/books/n%02d-a" % pages, {"year": 2})
            self.post("/books/n%02d-b" % pages, {"year": 4})
            self.delete("/books/u%02d" % (pages * 5 % 30))  # year 0
            self.put("/books/u%02d" % (pages * 5 % 30 + 1 if pages * 5 % 30 + 1 < 30 else 1), {"year": 1, "again": pages})
            if document["next"] is None:
                break
            path = "/books/?min_value.year=2&limit=4&after=" + q(document["next"])
        uids = [uid for _, uid in seen]
        self.assertEqual(len(uids), len(set(uids)))
        self.assertLessEqual(untouched, set(uids))
        self.assertEqual(seen, sorted(seen))
        self.assertTrue(any(uid.startswith("n") for uid in uids))  # written ahead of the cursor: seen

    def test_cursors_are_checked(self):
        for i in range(3):
            self.post("/books/u%d" % i, {"year": 1, "author": {"name": "x"}})
        filtered = self.get("/books/?value.year=1&limit=1").json()["next"]
        plain = self.get("/books/?limit=1").json()["next"]
        self.assertEqual(len(self.uids("/books/?value.year=1&after=" + q(filtered))), 2)
        self.assertError(self.get("/books/?value.year=1&after=" + q(plain)), 400, "bad_parameter")
        self.assertError(self.get("/books/?after=" + q(filtered)), 400, "bad_parameter")
        self.assertError(self.get("/books/?value.author.name=x&after=" + q(filtered)), 400, "bad_parameter")
        self.assertError(self.get("/books/?value.year=1&after=i.!!"), 400, "bad_parameter")

    def test_status_and_openapi_name_the_indexes(self):
        status = self.get("/_node/status").json()
        self.assertEqual(status["indexes"]["books:value.year"]["state"], "ready")
        self.assertEqual(sorted(status["indexes"]), ["*:lang", "books:value.author.name", "books:value.year"])
        document = self.get("/openapi.json").json()
        listing = document["paths"]["/{collection}/"]["get"]
        self.assertEqual(listing["x-minstore-indexes"], ["books:value.year", "*:lang", "books:value.author.name"])
        names = [p["name"] for p in listing["parameters"]]
        self.assertIn("min_value.year", names)
        self.assertIn("503", listing["responses"])
        self.assertIn("/_changes", document["paths"])


class BuildTests(IndexTestCase):
    def setUp(self):
        IndexTestCase.setUp(self)
        # Records held before the index is declared, then a node that declares it.
        storage = MemoryStorage()
        storage.open()
        storage.write([item("books", "u%02d" % i, {"year": 1900 + i % 3}) for i in range(10)])
        self.threads = HeldBuild()
        self.use_node(self.make_node(storage=storage))

    def test_filters_answer_503_until_built_while_other_reads_and_writes_go_on(self):
        response = self.get("/books/?value.year=1901")
        document = self.assertError(response, 503, "index_building")
        self.assertIn("books:value.year", document["message"])
        self.assertTrue(response.header(b"retry-after").isdigit())
        self.assertEqual(self.get("/_node/status").json()["indexes"]["books:value.year"]["state"], "building")
        # Reads, listings and writes are not held up by the build.
        self.assertEqual(self.get("/books/u01").code, 200)
        self.assertEqual(len(self.get("/books/").json()["items"]), 10)
        self.assertEqual(self.post("/books/new", {"year": 1901}).code, 200)
        self.assertEqual(self.put("/books/u04", {"year": 1999}).code, 200)
        # Every index declared over these records is building.
        self.assertError(self.get("/books/?value.author.name=x"), 503, "index_building")
        self.threads.release()
        self.assertEqual(self.uids("/books/?value.year=1901"), ["new", "u01", "u07"])
        self.assertEqual(self.uids("/books/?value.year=1999"), ["u04"])
        self.assertEqual(self.get("/_node/status").json()["indexes"]["books:value.year"]["state"], "ready")

    def test_stop_waits_for_the_build_step_in_flight(self):
        d = self.node.stop()
        self.assertNoResult(d)  # a step is in flight
        self.threads.release()
        self.successResultOf(d)


class ChangesTests(IndexTestCase):
    def test_changes_newest_per_uid_oldest_first(self):
        self.post("/books/a", 1)
        self.post("/books/b", 2)
        self.post("/films/c", 3)
        self.put("/books/a", 11)
        self.delete("/books/b")
        document = self.get("/_changes").json()
        versions = {uid: self.node.storage.get(c, uid) for c, uid in (("books", "a"), ("books", "b"), ("films", "c"))}
        self.assertEqual(
            document,
            {
                "changes": [
                    {"seq": 3, "collection": "films", "uid": "c", "version": json.loads(versions["c"])["version"], "deleted": False},
                    {"seq": 4, "collection": "books", "uid": "a", "version": json.loads(versions["a"])["version"], "deleted": False},
                    {"seq": 5, "collection": "books", "uid": "b", "version": json.loads(versions["b"])["version"], "deleted": True},
                ],
                "last_seq": 5,
            },
        )

    def test_following_the_feed_with_since_and_limit(self):
        for i in range(5):
            self.post("/books/u%d" % i, i)
        first = self.get("/_changes?limit=2").json()
        self.assertEqual(([c["uid"] for c in first["changes"]], first["last_seq"]), (["u0", "u1"], 2))
        rest = self.get("/_changes?since=2").json()
        self.assertEqual(([c["uid"] for c in rest["changes"]], rest["last_seq"]), (["u2", "u3", "u4"], 5))
        self.assertEqual(self.get("/_changes?since=5").json(), {"changes": [], "last_seq": 5})
        self.put("/books/u0", "again")
        self.assertEqual([c["uid"] for c in self.get("/_changes?since=5").json()["changes"]], ["u0"])

    def test_one_collection(self):
        self.post("/books/a", 1)
        self.post("/films/b", 1)
        self.post("/books/c", 1)
        document = self.get("/_changes?collection=films").json()
        self.assertEqual(([c["uid"] for c in document["changes"]], document["last_seq"]), (["b"], 3))

    def test_bad_parameters(self):
        for query in ["since=-1", "since=abc", "since=1.0", "since=%D9%A1", "since=", "limit=0", "limit=1001",
                      "limit=%EF%BC%95", "colour=red", "collection=_bad", "collection=a%2Fb"]:
            self.assertError(self.get("/_changes?" + query), 400, "bad_parameter" if "collection" not in query else "bad_collection")
        self.assertEqual(self.get("/_changes?limit=1000").code, 200)


class IndexBuildIntegrationTests(NodeTestMixin, TestCase):
    timeout = 120

    @deferred_test
    async def test_restart_with_a_new_index_builds_it_503_then_200(self):
        """
        A node restarted with a new --indexes builds the index in the
        background: its filter answers 503 index_building with Retry-After
        meanwhile, writes go on, then 200 with exactly what a full listing
        filtered by hand says.
        """
        node = await self.start_node(args=["--storage", "sqlite", "--processes", ""])
        for i in range(300):
            code, _, body = await self.call("POST", node.url + "/books/u%03d" % i, json={"value": {"g": i % 7}})
            self.assertEqual(code, 200, body)
        await node.stop()
        node.args += ["--indexes", "books:value.g", "--index-build-rate", "100"]
        await node.restart()
        code, headers, body = await self.call_json("GET", node.url + "/books/?value.g=3")
        self.assertEqual((code, body["error"]), (503, "index_building"), body)
        self.assertTrue(headers["retry-after"].isdigit())
        code, _, _ = await self.call("POST", node.url + "/books/late", json={"value": {"g": 3}})
        self.assertEqual(code, 200)
        for _ in range(100):
            code, headers, body = await self.call_json("GET", node.url + "/books/?value.g=3&limit=1000")
            if code != 503:
                break
            await sleep(0.2)
        self.assertEqual(code, 200, body)
        expected = sorted(["u%03d" % i for i in range(300) if i % 7 == 3] + ["late"])
        self.assertEqual([r["uid"] for r in body["items"]], expected)
        _, _, status = await self.call_json("GET", node.url + "/_node/status")
        self.assertEqual(status["indexes"]["books:value.g"]["state"], "ready")
