"""
What minstore's own tests use, shipped for the authors of engines and
processes (the modules below import only the standard library, Twisted,
treq and minstore):

  - this module: the conformance suite of storage engines (below);
  - L{minstore.testing.fakes}: L{FakeNetwork<minstore.testing.fakes.FakeNetwork>}
    (a treq-like client that routes each host to an in-memory resource) and
    L{Cluster<minstore.testing.fakes.Cluster>} (real nodes behind their real
    API on one FakeNetwork and one Clock);
  - L{minstore.launcher} (beside this package: standard library only): a
    real ``twistd -n minstore`` child on a loopback port (its command line,
    environment and health wait), used by the integration tests and by
    C{bench/}.

The conformance suite every storage engine passes
(L{minstore.interfaces.IStorage}), shipped with the package so that the
author of an engine runs the same tests as the built-in ones.

L{StorageContract} is a mixin, not a test case: mix it into a trial
C{SynchronousTestCase} and define C{make_storage}, which returns an opened
engine.  A durable engine also mixes in L{DurableStorageContract} and
defines C{reopen_storage(storage)} (close it, open a new one on the same
data) and C{engine_spec()} (how a child process builds the engine, for the
crash tests: ``("package.module:Class", data_dir)``); it may define
C{fill_disk(storage)} and C{free_disk(storage)} to test a full disk::

    from twisted.trial.unittest import SynchronousTestCase
    from minstore.testing import StorageContract

    class MyEngineTests(StorageContract, SynchronousTestCase):
        def make_storage(self):
            storage = MyEngine(self.mktemp())
            storage.open()
            self.addCleanup(storage.close)
            return storage
"""

import json
import signal
import subprocess
import sys
from unittest import SkipTest

from zope.interface.verify import verifyObject

from minstore.errors import StorageFailed
from minstore.interfaces import ABSENT, NEWER, IStorage, WriteItem
from minstore.records import encode_record, make_record, make_tombstone
from minstore.storage.indexes import _MISSING, bounds, encode_key, extract, parse_declarations

#: uids that a careless engine would turn into paths, escapes or collisions.
TRICKY_UIDS = [
    "caf\u00e9",
    "\u65e5\u672c\u8a9e",
    "emoji-\U0001f600",
    "a/b",
    "/etc/passwd",
    "..",
    ".",
    "../../x",
    "100%",
    "%2F",
    "%41",
    "with space",
    " leading",
    "trailing ",
    "a" * 255,
    "\u00e9" * 127,  # 254 bytes of UTF-8
    "=hash-like",
    ".tmp-0",
    "UPPER",
    "upper",
    "tab\there",
    "new\nline",
    "quote'\"",
    "semi;colon--",
]

V1 = "0000000000001-000000-test"
V2 = "0000000000002-000000-test"
V3 = "0000000000003-000000-test"


def record(collection, uid, value, version=V1):
    """The stored bytes of a record, as the node writes them."""
    return encode_record(make_record(collection, uid, value, version, 1.0))


def tombstone(collection, uid, version=V2):
    return encode_record(make_tombstone(collection, uid, version, 2.0))


def item(collection, uid, value="v", version=V1, deleted=False, forward=True, condition=None):
    """A L{WriteItem} of a record (or of a tombstone, with ``deleted``)."""
    data = tombstone(collection, uid, version) if deleted else record(collection, uid, value, version)
    return WriteItem(collection, uid, data, deleted, version, forward, condition)


def uids_of(items):
    return [json.loads(data)["uid"] for data in items]


def found(storage, collection, field, operators=None, after=None, limit=10000):
    """The uids L{IStorage.find} gives for filter operators (``{"eq": 1965}``, ...)."""
    start, stop = bounds(operators or {})
    return [json.loads(data)["uid"] for _, data in storage.find(collection, field, start, stop, after, limit)]


def build_all(storage, step=3):
    """Run L{IStorage.build_indexes} until every declaration is ready; the number of steps."""
    steps = 1
    while storage.build_indexes(step):
        steps += 1
    return steps


def expected_index(storage, collection, field):
    """
    What an index must hold, computed from a full listing in Python: the
    uids of the live records having the field, in (key, uid) order.
    """
    entries, after = [], None
    while True:
        page = storage.list(collection, after, None, 1000)
        for data in page:
            r = json.loads(data)
            value = extract(r, field)
            if value is not _MISSING:
                entries.append((encode_key(value), r["uid"]))
        if len(page) < 1000:
            return [uid for _, uid in sorted(entries)]
        after = json.loads(page[-1])["uid"]


def assert_index_exact(case, storage, collection, field):
    """Every entry of the index, in order, is what a full listing filtered in Python says."""
    case.assertEqual(found(storage, collection, field), expected_index(storage, collection, field), field)


class IndexContract:
    """
    Secondary indexes (L{IStorage.set_indexes}, L{IStorage.find}, the
    build): mixed into L{StorageContract}, so every engine runs them.
    """

    def _indexed(self, specs):
        storage = self.make_storage()
        storage.set_indexes(parse_declarations(specs))
        return storage

    def test_index_declared_on_empty_storage_is_ready(self):
        storage = self._indexed("books:value.year,*:lang")
        self.assertEqual(
            storage.index_states(),
            {
                "books:value.year": {"state": "ready", "seq": 0, "until_seq": 0},
                "*:lang": {"state": "ready", "seq": 0, "until_seq": 0},
            },
        )
        self.assertEqual(found(storage, "books", "value.year"), [])

    def test_index_equality_keeps_types_apart(self):
        """2 and "2" are different values; 2 and 2.0 one value; true is not 1."""
        storage = self._indexed("c:value.n")
        values = {"int": 2, "float": 2.0, "str": "2", "true": True, "one": 1, "null": None, "list": [2], "obj": {"n": 2}}
        storage.write([item("c", uid, {"n": v}) for uid, v in values.items()])
        self.assertEqual(found(storage, "c", "value.n", {"eq": 2}), ["float", "int"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": "2"}), ["str"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": True}), ["true"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": 1}), ["one"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": None}), ["null"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": [2]}), ["list"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": {"n": 2}}), ["obj"])
        self.assertEqual(found(storage, "c", "value.n", {"eq": 3}), [])

    def test_index_total_order_across_types(self):
        """
        null < false < true < numbers < strings < arrays < objects (these two
        by their canonical JSON bytes: ``[1]`` before ``[]``); ties by uid.
        """
        storage = self._indexed("c:value.k")
        ordered = [None, False, True, -1e300, -2, -0.5, 0, 1, 1.5, 10, 2**60, "", "10", "2", "a", "\u00e9", "\U0001f600", [1], [], {"a": 1}, {}]
        storage.write([item("c", "u%02d" % (len(ordered) - i), {"k": v}) for i, v in enumerate(ordered)])
        self.assertEqual(found(storage, "c", "value.k"), ["u%02d" % (len(ordered) - i) for i in range(len(ordered))])
        storage.write([item("c", "b-tie", {"k": 1}), item("c", "a-tie", {"k": 1.0})])
        self.assertEqual(found(storage, "c", "value.k", {"eq": 1}), ["a-tie", "b-tie", "u%02d" % (len(ordered) - 7)])

    def test_index_ranges_combine(self):
        """min_ (>=), max_ (<=), gt_ (>), lt_ (<), alone and together, within and across types."""
        storage = self._indexed("c:value.y")
        storage.write([item("c", "y%d" % y, {"y": y}) for y in range(1960, 1970)] + [item("c", "s", {"y": "1965"})])
        self.assertEqual(found(storage, "c", "value.y", {"min": 1968}), ["y1968", "y1969", "s"])
        self.assertEqual(found(storage, "c", "value.y", {"gt": 1968}), ["y1969", "s"])
        self.assertEqual(found(storage, "c", "value.y", {"max": 1961}), ["y1960", "y1961"])
        self.assertEqual(found(storage, "c", "value.y", {"lt": 1961}), ["y1960"])
        self.assertEqual(found(storage, "c", "value.y", {"min": 1962, "lt": 1965}), ["y1962", "y1963", "y1964"])
        self.assertEqual(found(storage, "c", "value.y", {"gt": 1962, "max": 1965, "min": 1960}), ["y1963", "y1964", "y1965"])
        self.assertEqual(found(storage, "c", "value.y", {"gt": 1965, "lt": 1965}), [])
        self.assertEqual(found(storage, "c", "value.y", {"min": ""}), ["s"])
        self.assertEqual(found(storage, "c", "value.y", {"eq": 1964, "min": 1964}), ["y1964"])

    def test_index_absent_field_has_no_entry(self):
        """A record without the field, or whose path crosses a non-object, is not in the index."""
        storage = self._indexed("c:value.a.b")
        storage.write([
            item("c", "has", {"a": {"b": 1}}),
            item("c", "null", {"a": {"b": None}}),
            item("c", "no-b", {"a": {"c": 1}}),
            item("c", "a-str", {"a": "b"}),
            item("c", "a-list", {"a": [{"b": 1}]}),
            item("c", "scalar", 5),
        ])
        self.assertEqual(found(storage, "c", "value.a.b"), ["null", "has"])

    def test_index_follows_updates_tombstones_and_conditions(self):
        storage = self._indexed("c:value.g")
        storage.write([item("c", "a", {"g": 1}), item("c", "b", {"g": 1})])
        storage.write([item("c", "a", {"g": 2}, V2)])
        self.assertEqual((found(storage, "c", "value.g", {"eq": 1}), found(storage, "c", "value.g", {"eq": 2})), (["b"], ["a"]))
        storage.write([item("c", "b", deleted=True, version=V2)])
        self.assertEqual(found(storage, "c", "value.g"), ["a"])
        storage.write([item("c", "b", {"g": 3}, V3)])
        self.assertEqual(found(storage, "c", "value.g"), ["a", "b"])
        # Conditions that do not hold leave the index alone.
        storage.write([item("c", "a", {"g": 9}, V3, condition=ABSENT), item("c", "b", {"g": 9}, V1, condition=NEWER)])
        self.assertEqual(found(storage, "c", "value.g", {"eq": 9}), [])
        # The field removed by an update: out of the index.
        storage.write([item("c", "a", {"other": 1}, V3)])
        self.assertEqual(found(storage, "c", "value.g"), ["b"])
        # A uid twice in one batch: the last stays.
        storage.write([item("c", "d", {"g": 4}), item("c", "d", {"g": 5}, V2)])
        self.assertEqual(found(storage, "c", "value.g"), ["b", "d"])
        self.assertEqual(found(storage, "c", "value.g", {"eq": 5}), ["d"])
        assert_index_exact(self, storage, "c", "value.g")

    def test_index_star_covers_every_collection_apart(self):
        storage = self._indexed("*:lang,books:value.author.name")
        storage.write([
            item("books", "1", {"author": {"name": "Herbert"}}),
            item("films", "1", {"author": {"name": "Herbert"}}),
        ])
        for c in ("books", "films"):
            storage.write([WriteItem(c, "en", encode_record(dict(make_record(c, "en", "x", V1, 1.0), lang="en")), False, V1)])
        self.assertEqual(found(storage, "books", "lang", {"eq": "en"}), ["en"])
        self.assertEqual(found(storage, "films", "lang", {"eq": "en"}), ["en"])
        self.assertEqual(found(storage, "books", "value.author.name", {"eq": "Herbert"}), ["1"])
        self.assertEqual(found(storage, "films", "value.author.name"), [])

    def test_index_paging_after_a_key_and_uid(self):
        """after (key, uid) resumes strictly after it: each entry once, with equal keys."""
        storage = self._indexed("c:value.g")
        storage.write([item("c", "u%03d" % i, {"g": i % 3}) for i in range(40)])
        start, stop = bounds({"min": 1})
        seen, after = [], None
        while True:
            page = storage.find("c", "value.g", start, stop, after, 7)
            if not page:
                break
            seen += [json.loads(d)["uid"] for _, d in page]
            after = (page[-1][0], json.loads(page[-1][1])["uid"])
        self.assertEqual(seen, found(storage, "c", "value.g", {"min": 1}))
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(len(seen), 26)

    def test_index_built_over_existing_data_with_writes_between_steps(self):
        """
        Declared over records held, an index is building until build_indexes
        has gone through them; writes made in between (new records, updates,
        deletes) are indexed too, and the built index is exact.
        """
        storage = self.make_storage()
        storage.write([item("c", "u%02d" % i, {"g": i % 4}) for i in range(30)])
        storage.write([item("d", "x", {"g": 1})])
        storage.set_indexes(parse_declarations("c:value.g,*:value.g"))
        self.assertEqual(storage.index_states()["c:value.g"], {"state": "building", "seq": 0, "until_seq": 31})
        i = 0
        while storage.build_indexes(4):
            i += 1
            storage.write([
                item("c", "new%02d" % i, {"g": i % 4}),
                item("c", "u%02d" % (i * 3 % 30), {"g": 7}, "%013d-000000-test" % (10 + i)),
                item("c", "u%02d" % (i * 7 % 30), deleted=True, version="%013d-000001-test" % (10 + i)),
                # Rewritten with the same key, not yet reached by the build.
                item("c", "u%02d" % (29 - i), {"g": (29 - i) % 4, "again": i}, "%013d-000002-test" % (10 + i)),
            ])
        self.assertGreater(i, 5)
        self.assertEqual(set(s["state"] for s in storage.index_states().values()), {"ready"})
        assert_index_exact(self, storage, "c", "value.g")
        assert_index_exact(self, storage, "d", "value.g")
        self.assertFalse(storage.build_indexes(4))

    def test_index_dropped_then_declared_again_is_rebuilt(self):
        storage = self._indexed("c:value.g")
        storage.write([item("c", "a", {"g": 1})])
        storage.set_indexes([])
        self.assertEqual(storage.index_states(), {})
        storage.write([item("c", "a", {"g": 2}, V2), item("c", "b", {"g": 1})])
        storage.set_indexes(parse_declarations("c:value.g"))
        self.assertEqual(storage.index_states()["c:value.g"]["state"], "building")
        build_all(storage)
        self.assertEqual(found(storage, "c", "value.g", {"eq": 1}), ["b"])
        assert_index_exact(self, storage, "c", "value.g")

    def test_index_star_dropped_keeps_a_collections_own(self):
        storage = self._indexed("*:value.g,c:value.g")
        storage.write([item("c", "a", {"g": 1}), item("d", "a", {"g": 1})])
        storage.set_indexes(parse_declarations("c:value.g"))
        self.assertEqual(found(storage, "c", "value.g"), ["a"])
        self.assertEqual(found(storage, "d", "value.g"), [])
        self.assertEqual(storage.index_states()["c:value.g"]["state"], "ready")


class StorageContract(IndexContract):
    """
    Tests of the IStorage contract; the concrete class provides
    C{make_storage()}, returning an engine that is already opened.
    """

    def make_storage(self):
        raise NotImplementedError("%s must define make_storage" % (type(self).__name__,))

    def _put(self, storage, collection, uid, value="v", deleted=False, version=V1):
        it = item(collection, uid, value, version, deleted)
        storage.write([it])
        return it.data

    # -- records ----------------------------------------------------------

    def test_provides_interface(self):
        """The engine provides every method and attribute of IStorage."""
        storage = self.make_storage()
        self.assertTrue(verifyObject(IStorage, storage))
        self.assertIsInstance(storage.name, str)

    def test_get_missing(self):
        """Reading a uid never written gives None, in a known and an unknown collection."""
        storage = self.make_storage()
        self.assertIsNone(storage.get("books", "nope"))
        self._put(storage, "books", "one")
        self.assertIsNone(storage.get("books", "nope"))
        self.assertIsNone(storage.get("other", "one"))

    def test_get_many(self):
        """get_many answers each key as get does, in the order given: a key
        twice, a tombstone, a missing uid, several collections, and more
        uids than one statement of a SQL engine takes."""
        storage = self.make_storage()
        a = self._put(storage, "books", "a", "A")
        b = self._put(storage, "films", "a", "B")
        gone = self._put(storage, "books", "gone", deleted=True)
        keys = [("books", "a"), ("films", "nope"), ("films", "a"), ("books", "gone"), ("books", "a"), ("x", "a")]
        self.assertEqual(storage.get_many(keys), [a, None, b, gone, a, None])
        self.assertEqual(storage.get_many([]), [])
        many = [item("big", "u%04d" % i, i) for i in range(1200)]
        storage.write(many)
        keys = [("big", "u%04d" % i) for i in range(1250, -1, -1)]
        self.assertEqual(storage.get_many(keys), [storage.get(*key) for key in keys])
        self.assertEqual(storage.get_many(keys)[-1], many[0].data)
        self.assertEqual(storage.get_many(keys)[:50], [None] * 50)

    def test_write_then_get(self):
        """A written record reads back byte for byte."""
        storage = self.make_storage()
        data = self._put(storage, "books", "dune", {"title": "Dune", "year": 1965})
        self.assertEqual(storage.get("books", "dune"), data)

    def test_overwrite(self):
        """A second write of a uid replaces the first."""
        storage = self.make_storage()
        self._put(storage, "books", "x", "first")
        data = self._put(storage, "books", "x", "second", version=V2)
        self.assertEqual(storage.get("books", "x"), data)
        self.assertEqual(storage.count(), 1)

    def test_same_uid_in_two_collections(self):
        """Collections are separate name spaces."""
        storage = self.make_storage()
        a = self._put(storage, "a", "x", "in a")
        b = self._put(storage, "b", "x", "in b")
        self.assertEqual((storage.get("a", "x"), storage.get("b", "x")), (a, b))

    def test_tombstone_is_read_but_not_listed(self):
        """A tombstone reads back (for version checks) but is neither listed nor counted."""
        storage = self.make_storage()
        self._put(storage, "books", "a")
        self._put(storage, "books", "b")
        data = self._put(storage, "books", "a", deleted=True, version=V2)
        self.assertEqual(storage.get("books", "a"), data)
        self.assertEqual(uids_of(storage.list("books", None, None, 10)), ["b"])
        self.assertEqual(storage.count(), 1)

    def test_tombstone_then_record_again(self):
        """A record written over a tombstone is live again."""
        storage = self.make_storage()
        self._put(storage, "books", "a", deleted=True, version=V2)
        data = self._put(storage, "books", "a", "back", version=V3)
        self.assertEqual(storage.get("books", "a"), data)
        self.assertEqual(uids_of(storage.list("books", None, None, 10)), ["a"])
        self.assertEqual(storage.count(), 1)

    def test_list_in_uid_order(self):
        """A listing is in uid order whatever the write order."""
        storage = self.make_storage()
        for uid in ["m", "a", "z", "b", "\u00e9", "A", "0"]:
            self._put(storage, "c", uid)
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), sorted(["m", "a", "z", "b", "\u00e9", "A", "0"]))

    def test_list_other_collection_and_empty(self):
        storage = self.make_storage()
        self.assertEqual(storage.list("c", None, None, 10), [])
        self._put(storage, "d", "x")
        self.assertEqual(storage.list("c", None, None, 10), [])

    def test_list_limit_after_prefix(self):
        """limit, after and prefix bound a listing, alone and together."""
        storage = self.make_storage()
        for uid in ["a1", "a2", "a3", "b1", "b2", "ab"]:
            self._put(storage, "c", uid)
        self.assertEqual(uids_of(storage.list("c", None, None, 2)), ["a1", "a2"])
        self.assertEqual(uids_of(storage.list("c", "a3", None, 10)), ["ab", "b1", "b2"])
        self.assertEqual(uids_of(storage.list("c", None, "a", 10)), ["a1", "a2", "a3", "ab"])
        self.assertEqual(uids_of(storage.list("c", "a2", "a", 2)), ["a3", "ab"])
        self.assertEqual(uids_of(storage.list("c", None, "b2", 10)), ["b2"])
        self.assertEqual(uids_of(storage.list("c", None, "zz", 10)), [])

    def test_prefix_with_special_characters(self):
        """A prefix is taken literally: no wildcard, no pattern."""
        storage = self.make_storage()
        for uid in ["a%b", "axb", "a_b", "a*c", "a\U0010ffffz", "a\U0010ffff"]:
            self._put(storage, "c", uid)
        self.assertEqual(uids_of(storage.list("c", None, "a%", 10)), ["a%b"])
        self.assertEqual(uids_of(storage.list("c", None, "a_", 10)), ["a_b"])
        self.assertEqual(uids_of(storage.list("c", None, "a\U0010ffff", 10)), ["a\U0010ffff", "a\U0010ffffz"])

    def test_paging_visits_each_record_once(self):
        """Paging with after = the last uid of the page visits every record once."""
        storage = self.make_storage()
        uids = ["u%03d" % i for i in range(53)]
        storage.write([item("c", uid) for uid in uids])
        seen, after = [], None
        while True:
            page = uids_of(storage.list("c", after, None, 10))
            if not page:
                break
            seen += page
            after = page[-1]
        self.assertEqual(seen, uids)

    def test_count_and_collections(self):
        """count() and collections() follow writes and tombstones."""
        storage = self.make_storage()
        self.assertEqual((storage.count(), storage.collections()), (0, []))
        self._put(storage, "b", "x")
        self._put(storage, "a", "x")
        self._put(storage, "a", "y")
        self.assertEqual((storage.count(), storage.collections()), (3, ["a", "b"]))
        self._put(storage, "b", "x", deleted=True, version=V2)
        self.assertEqual((storage.count(), storage.collections()), (2, ["a"]))

    def test_batch_same_uid_twice_keeps_last(self):
        storage = self.make_storage()
        first, last = item("c", "x", "1"), item("c", "x", "2", V2)
        storage.write([first, last])
        self.assertEqual(storage.get("c", "x"), last.data)
        self.assertEqual(storage.count(), 1)

    def test_batch_record_then_tombstone_keeps_tombstone(self):
        storage = self.make_storage()
        storage.write([item("c", "x"), item("c", "x", deleted=True, version=V2)])
        self.assertTrue(json.loads(storage.get("c", "x"))["deleted"])
        self.assertEqual(storage.count(), 0)

    def test_empty_batch(self):
        storage = self.make_storage()
        self.assertEqual(storage.write([]), [])
        self.assertEqual(storage.last_seq(), 0)

    def test_tricky_uids(self):
        """uids that look like paths, escapes or SQL are stored, read and listed as they are."""
        storage = self.make_storage()
        written = {uid: self._put(storage, "c", uid, uid) for uid in TRICKY_UIDS}
        for uid, data in written.items():
            self.assertEqual(storage.get("c", uid), data, uid)
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), sorted(TRICKY_UIDS))

    # -- the sequence and the feed --------------------------------------------

    def test_write_returns_sequence_numbers(self):
        """Each stored item gets the next number of the node's sequence, across batches."""
        storage = self.make_storage()
        self.assertEqual(storage.write([item("c", "a"), item("c", "b")]), [1, 2])
        self.assertEqual(storage.write([item("d", "a")]), [3])
        self.assertEqual(storage.last_seq(), 3)

    def test_changes_newest_per_uid_in_order(self):
        """The feed holds the newest change of each uid, in sequence order."""
        storage = self.make_storage()
        storage.write([item("c", "a"), item("c", "b")])
        storage.write([item("c", "a", "again", V2), item("c", "b", deleted=True, version=V3)])
        changes, scanned = storage.changes(0, 10)
        self.assertEqual(
            [(c.seq, c.collection, c.uid, c.version, c.deleted) for c in changes],
            [(3, "c", "a", V2, False), (4, "c", "b", V3, True)],
        )
        self.assertEqual(changes[0].data, storage.get("c", "a"))
        self.assertEqual(scanned, 4)

    def test_changes_after_and_limit(self):
        """after skips what a reader has; limit cuts the read, and scanned says where."""
        storage = self.make_storage()
        storage.write([item("c", "u%d" % i) for i in range(10)])
        changes, scanned = storage.changes(3, 4)
        self.assertEqual([c.seq for c in changes], [4, 5, 6, 7])
        self.assertEqual(scanned, 7)
        changes, scanned = storage.changes(7, 100)
        self.assertEqual([c.seq for c in changes], [8, 9, 10])
        self.assertEqual(scanned, 10)
        self.assertEqual(storage.changes(10, 5), ([], 10))
        self.assertEqual(storage.count_changes(3), 7)

    def test_changes_forwarded_only(self):
        """forwarded_only leaves out what was stored without forward; scanned still moves past it."""
        storage = self.make_storage()
        storage.write([item("c", "a"), item("c", "b", forward=False), item("c", "c")])
        storage.write([item("c", "d", forward=False)])
        changes, scanned = storage.changes(0, 10, forwarded_only=True)
        self.assertEqual([c.uid for c in changes], ["a", "c"])
        self.assertTrue(all(c.forward for c in changes))
        self.assertEqual(scanned, 4)
        self.assertEqual(storage.count_changes(0, forwarded_only=True), 2)
        self.assertEqual(storage.changes(3, 10, forwarded_only=True), ([], 4))

    def test_changes_of_one_collection(self):
        storage = self.make_storage()
        storage.write([item("a", "1"), item("b", "1"), item("a", "2")])
        changes, _ = storage.changes(0, 10, collection="a")
        self.assertEqual([(c.collection, c.uid) for c in changes], [("a", "1"), ("a", "2")])

    def test_condition_absent(self):
        """ABSENT stores only when no live record is held (a tombstone does not count)."""
        storage = self.make_storage()
        self.assertEqual(storage.write([item("c", "x", "1", condition=ABSENT)]), [1])
        self.assertEqual(storage.write([item("c", "x", "2", V2, condition=ABSENT)]), [None])
        self.assertEqual(json.loads(storage.get("c", "x"))["value"], "1")
        storage.write([item("c", "x", deleted=True, version=V2)])
        self.assertEqual(storage.write([item("c", "x", "3", V3, condition=ABSENT)]), [3])
        self.assertEqual(storage.last_seq(), 3)

    def test_condition_newer(self):
        """NEWER stores only over an older version, record or tombstone, or nothing."""
        storage = self.make_storage()
        self.assertEqual(storage.write([item("c", "x", "2", V2, condition=NEWER)]), [1])
        self.assertEqual(storage.write([item("c", "x", "1", V1, condition=NEWER)]), [None])
        self.assertEqual(storage.write([item("c", "x", "2b", V2, condition=NEWER)]), [None])
        self.assertEqual(storage.write([item("c", "x", deleted=True, version=V3, condition=NEWER)]), [2])
        self.assertEqual(storage.write([item("c", "x", "old", V2, condition=NEWER)]), [None])
        self.assertTrue(json.loads(storage.get("c", "x"))["deleted"])

    def test_condition_in_a_batch_with_others(self):
        """A condition that fails stores nothing for its item only."""
        storage = self.make_storage()
        storage.write([item("c", "x")])
        self.assertEqual(
            storage.write([item("c", "a"), item("c", "x", "no", condition=ABSENT), item("c", "b")]),
            [2, None, 3],
        )
        self.assertEqual(uids_of(storage.list("c", None, None, 10)), ["a", "b", "x"])

    def test_max_version(self):
        """The highest version held, records and tombstones alike, whatever the write order."""
        storage = self.make_storage()
        self.assertIsNone(storage.max_version())
        storage.write([item("c", "x", version=V2)])
        storage.write([item("c", "y", version=V1)])
        self.assertEqual(storage.max_version(), V2)
        storage.write([item("c", "y", deleted=True, version=V3)])
        self.assertEqual(storage.max_version(), V3)

    def test_checkpoints(self):
        """Checkpoints saved alone or with a batch read back; a save replaces them all."""
        storage = self.make_storage()
        self.assertEqual(storage.checkpoints(), {})
        storage.save_checkpoints({"http://b:1": 0, "http://c:1": 0})
        self.assertEqual(storage.checkpoints(), {"http://b:1": 0, "http://c:1": 0})
        storage.write([item("c", "x")], checkpoints={"http://b:1": 1})
        self.assertEqual(storage.checkpoints(), {"http://b:1": 1})


    # -- sync -----------------------------------------------------------------

    def test_scan_versions_in_key_order(self):
        """
        scan_versions gives (collection, uid, version) of records and
        tombstones in (collection, uid) code point order, within the bounds
        (after excluded, upto included, None unbounded), up to the limit.
        """
        storage = self.make_storage()
        uids = ["b", "a", "a\x01", "\u00e9", "\U0001f600", "Z", "a/b"]
        storage.write([item("c", u) for u in uids] + [item("b", "z", version=V2)])
        storage.write([item("c", "a", deleted=True, version=V3)])
        keys = [("b", "z")] + [("c", u) for u in sorted(uids)]
        everything = storage.scan_versions(None, None, 100)
        self.assertEqual([tuple(row[:2]) for row in everything], keys)
        versions = {tuple(row[:2]): row[2] for row in everything}
        self.assertEqual(versions[("c", "a")], V3)
        self.assertEqual(versions[("b", "z")], V2)
        self.assertEqual([tuple(r[:2]) for r in storage.scan_versions(None, None, 2)], keys[:2])
        self.assertEqual([tuple(r[:2]) for r in storage.scan_versions(keys[1], keys[4], 100)], keys[2:5])
        self.assertEqual([tuple(r[:2]) for r in storage.scan_versions(("c", "a"), None, 100)], keys[3:])
        self.assertEqual([tuple(r[:2]) for r in storage.scan_versions(None, ("b", "zz"), 100)], keys[:1])
        self.assertEqual(storage.scan_versions(keys[-1], None, 100), [])

    def test_scan_versions_sees_later_writes(self):
        """A key written after a scan is in the next scan, in its place."""
        storage = self.make_storage()
        storage.write([item("c", "a"), item("c", "c")])
        self.assertEqual(len(storage.scan_versions(None, None, 10)), 2)
        storage.write([item("c", "b", version=V2)])
        self.assertEqual(
            [tuple(r) for r in storage.scan_versions(None, None, 10)],
            [("c", "a", V1), ("c", "b", V2), ("c", "c", V1)],
        )

    # -- tombstone purge ------------------------------------------------------

    def _purge_fixture(self, storage):
        """Seqs 1-6: live a, tombstones b (V1, forwarded), c (V2, not forwarded), d (V3), live e; then f (V1)."""
        storage.write([item("c", "a"), item("c", "b", version=V1, deleted=True)])
        storage.write([item("c", "c", version=V2, deleted=True, forward=False), item("c", "d", version=V3, deleted=True)])
        storage.write([item("c", "e", version=V2), item("c", "f", version=V1, deleted=True, forward=False)])
        storage.scan_versions(None, None, 100)  # an engine that caches its key list must see the purge

    def _held(self, storage):
        return [tuple(r[:2]) for r in storage.scan_versions(None, None, 100)]

    def test_purge_tombstones_by_version_sequence_and_forward(self):
        """
        purge_tombstones removes only tombstones, only below the version,
        within upto_seq (or upto_forwarded_seq for forwarded ones), lowest
        sequence first up to the limit; they leave get, the feed and
        scan_versions; live records and counts stay.
        """
        storage = self.make_storage()
        if getattr(storage, "shared", False):
            raise SkipTest("a shared store purges nothing (test_shared_store_purges_nothing)")
        self._purge_fixture(storage)
        self.assertIsNone(storage.purged_version())
        # Nothing below V1; then only what the sequence bounds allow.
        self.assertEqual(storage.purge_tombstones(V1, 10, 10, 100), [])
        # c (seq 3) is not forwarded: upto_forwarded_seq does not cover it; b (seq 2) is.
        self.assertEqual(storage.purge_tombstones(V3, 1, 3, 100), [("c", "b", V1)])
        self.assertEqual(storage.purged_version(), V1)
        self.assertIsNone(storage.get("c", "b"))
        self.assertIsNotNone(storage.get("c", "c"))
        # The limit, lowest sequence first: c (3) before f (6); d (V3) is not below V3.
        self.assertEqual(storage.purge_tombstones(V3, 10, 0, 1), [("c", "c", V2)])
        self.assertEqual(storage.purged_version(), V2)
        self.assertEqual(storage.purge_tombstones(V3, 10, 0, 100), [("c", "f", V1)])
        self.assertEqual(storage.purged_version(), V2, "never lowered")
        self.assertEqual(self._held(storage), [("c", "a"), ("c", "d"), ("c", "e")])
        changes, _ = storage.changes(0, 100)
        self.assertEqual([(c.uid, c.seq) for c in changes], [("a", 1), ("d", 4), ("e", 5)])
        self.assertEqual(storage.count_changes(0), 3)
        self.assertEqual(storage.count(), 2)
        self.assertEqual(storage.collections(), ["c"])
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), ["a", "e"])
        # The sequence goes on from where it was.
        self.assertEqual(storage.write([item("c", "g")]), [7])

    def test_newer_refused_below_purged_version(self):
        """
        After a purge, a NEWER item of a uid not held is stored only above
        purged_version (it may be an older version of a purged tombstone's
        record); over a held uid NEWER compares with what is held; an
        unconditional write is stored.
        """
        storage = self.make_storage()
        if getattr(storage, "shared", False):
            raise SkipTest("a shared store purges nothing")
        storage.write([item("c", "a", version=V2, deleted=True), item("c", "h", version=V1)])
        self.assertEqual(storage.purge_tombstones(V3, 10, 10, 100), [("c", "a", V2)])
        results = storage.write(
            [
                item("c", "a", version=V1, condition=NEWER),
                item("c", "b", version=V2, condition=NEWER),
                item("c", "z", version=V3, condition=NEWER),
                item("c", "h", version=V2, condition=NEWER),
            ]
        )
        self.assertEqual(results[:2], [None, None])
        self.assertIsNotNone(results[2])
        self.assertIsNotNone(results[3])
        self.assertIsNone(storage.get("c", "a"))
        self.assertIsNotNone(storage.write([item("c", "a", version=V1)])[0])
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), ["a", "h", "z"])

    def test_shared_store_purges_nothing(self):
        """An engine whose store nodes share (shared) removes no tombstone and has no purged_version."""
        storage = self.make_storage()
        if not getattr(storage, "shared", False):
            raise SkipTest("not a shared store")
        self._purge_fixture(storage)
        self.assertEqual(storage.purge_tombstones(V3 + "~", 100, 100, 100), [])
        self.assertIsNone(storage.purged_version())
        self.assertEqual(len(self._held(storage)), 6)


class DurableStorageContract:
    """
    What a durable engine adds to L{StorageContract}: everything survives a
    reopen, a ``kill -9`` in the middle of writes, and a full disk.
    """

    def reopen_storage(self, storage):
        raise NotImplementedError

    def engine_spec(self):
        """``("module:Class", data_dir)``: how a child process builds this engine."""
        raise NotImplementedError

    def fill_disk(self, storage):
        """Make the next write fail as on a full disk (None: not testable)."""
        return None

    def free_disk(self, storage):
        pass

    def test_everything_survives_reopen(self):
        """Records, tombstones, the sequence, the feed, max_version, counts and checkpoints survive a reopen."""
        storage = self.make_storage()
        storage.write([item("c", "a"), item("c", "b", forward=False)], checkpoints={"http://p:1": 1})
        storage.write([item("c", "a", deleted=True, version=V3), item("d", "x", version=V2)])
        before = (storage.changes(0, 10), storage.last_seq(), storage.max_version(), storage.count(), storage.collections())
        storage = self.reopen_storage(storage)
        after = (storage.changes(0, 10), storage.last_seq(), storage.max_version(), storage.count(), storage.collections())
        self.assertEqual(after, before)
        self.assertEqual(storage.checkpoints(), {"http://p:1": 1})
        self.assertEqual(storage.write([item("c", "z")]), [5])

    def test_full_disk_fails_the_batch_and_keeps_nothing(self):
        """
        A write on a full disk raises StorageFailed; nothing of it is read,
        listed, in the feed or back after a reopen, its sequence numbers are
        given to the next batch, and the next batch after space returns is
        durable.
        """
        storage = self.make_storage()
        storage.write([item("c", "before")])
        if self.fill_disk(storage) is None:
            raise self.skipTest("this engine cannot simulate a full disk")
        big = [item("c", "u%d" % i, "x" * 20000) for i in range(50)]
        self.assertRaises(StorageFailed, storage.write, big)
        self.assertIsNone(storage.get("c", "u0"))
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), ["before"])
        self.assertEqual(storage.last_seq(), 1)
        self.assertEqual(storage.count(), 1)
        self.free_disk(storage)
        self.assertEqual(storage.write([item("c", "after")]), [2])
        storage = self.reopen_storage(storage)
        self.assertEqual(uids_of(storage.list("c", None, None, 100)), ["after", "before"])
        self.assertEqual([c.uid for c in storage.changes(0, 10)[0]], ["before", "after"])

    def test_kill_during_writes_keeps_every_acknowledged_item(self):
        """
        A child process writes batches (overwrites included) and says which
        returned; killed with SIGKILL at several moments, the reopened
        engine holds every acknowledged item, each uid's record is a whole
        version that was written (never a mix), and the feed agrees with
        the records.
        """
        module_class, data_dir = self.engine_spec()
        # Killed after 25, 100 and 250 acknowledged batches of 8.
        for round, lines in enumerate((200, 800, 2000)):
            out = self._kill_writer(_CRASH_WRITER, [module_class, data_dir, str(round * 10**6)], data_dir, lines)
            acknowledged = {}
            for line in out.splitlines():
                if line.count(b" ") == 1:
                    uid, n = line.split(b" ")
                    acknowledged[uid.decode()] = int(n)
            storage = self._open_spec(module_class, data_dir)
            try:
                for uid, n in acknowledged.items():
                    data = storage.get("crash", uid)
                    self.assertIsNotNone(data, uid)
                    value = json.loads(data)["value"]
                    # Wholly one version: at least the acknowledged one (a later one may have been durable unacknowledged).
                    self.assertEqual(value["pad"], "p" * 500)
                    self.assertGreaterEqual(value["n"], n)
                changes, _ = storage.changes(0, 100000)
                self.assertEqual(len(changes), len(set((c.collection, c.uid) for c in changes)))
                self.assertEqual(storage.last_seq(), max([c.seq for c in changes] or [0]))
                for c in changes:
                    self.assertEqual(storage.get(c.collection, c.uid), c.data)
            finally:
                storage.close()

    def test_purge_survives_reopen(self):
        """Purged tombstones stay gone after a reopen, and purged_version is kept."""
        storage = self.make_storage()
        if getattr(storage, "shared", False):
            raise SkipTest("a shared store purges nothing")
        storage.write([item("c", "a"), item("c", "b", version=V2, deleted=True)])
        self.assertEqual(len(storage.purge_tombstones(V3, 10, 10, 10)), 1)
        storage = self.reopen_storage(storage)
        self.assertIsNone(storage.get("c", "b"))
        self.assertEqual(storage.purged_version(), V2)
        self.assertEqual([tuple(r[:2]) for r in storage.scan_versions(None, None, 10)], [("c", "a")])
        self.assertEqual(storage.write([item("c", "b", version=V1, condition=NEWER)]), [None])

    def test_index_state_survives_reopen(self):
        """
        A build cut short resumes where it was after a reopen; the indexes
        declared last are kept by writes made before set_indexes is called
        again; an index built stays built.
        """
        storage = self.make_storage()
        storage.write([item("c", "u%02d" % i, {"g": i % 3}) for i in range(20)])
        storage.set_indexes(parse_declarations("c:value.g"))
        self.assertTrue(storage.build_indexes(5))
        storage = self.reopen_storage(storage)
        self.assertEqual(storage.index_states(), {"c:value.g": {"state": "building", "seq": 5, "until_seq": 20}})
        storage.write([item("c", "u00", {"g": 9}, V2), item("c", "u19", deleted=True, version=V2), item("c", "new", {"g": 9})])
        storage.set_indexes(parse_declarations("c:value.g"))
        build_all(storage)
        self.assertEqual(found(storage, "c", "value.g", {"eq": 9}), ["new", "u00"])
        assert_index_exact(self, storage, "c", "value.g")
        storage = self.reopen_storage(storage)
        self.assertEqual(storage.index_states()["c:value.g"]["state"], "ready")
        assert_index_exact(self, storage, "c", "value.g")

    def test_kill_during_writes_and_a_build_keeps_indexes_exact(self):
        """
        A child process writes (updates and deletes included) from two
        threads while it builds an index declared over what it held; killed
        with SIGKILL at several moments, the reopened engine's indexes, once
        any build cut short is finished, hold exactly what a full listing
        filtered in Python says, and a filter on each value agrees.
        """
        module_class, data_dir = self.engine_spec()
        for round, (lines, specs) in enumerate(
            [(20, "crash:value.g"), (40, "crash:value.g,*:value.h"), (80, "crash:value.g,*:value.h,crash:value.k")]
        ):
            self._kill_writer(_CRASH_INDEX_WRITER, [module_class, data_dir, str(round * 10**6), specs], data_dir, lines)
            storage = self._open_spec(module_class, data_dir)
            try:
                storage.set_indexes(parse_declarations(specs))
                build_all(storage, 500)
                for field in ("value.g", "value.h", "value.k")[: round + 1]:
                    assert_index_exact(self, storage, "crash", field)
                for g in [0, 1, 2, "0", "1", "2", None, True]:
                    expected = [
                        json.loads(d)["uid"]
                        for d in storage.list("crash", None, None, 100000)
                        if "g" in json.loads(d)["value"] and encode_key(json.loads(d)["value"]["g"]) == encode_key(g)
                    ]
                    self.assertEqual(sorted(found(storage, "crash", "value.g", {"eq": g})), sorted(expected), g)
            finally:
                storage.close()

    def _kill_writer(self, script, args, data_dir, lines):
        """
        Run a writer child; SIGKILL it once it has printed ``lines`` lines
        (acknowledged batches), so the kill lands while it goes on writing.
        All it printed.
        """
        errors = open(data_dir + ".stderr", "w+b")
        child = subprocess.Popen([sys.executable, "-c", script] + args, stdout=subprocess.PIPE, stderr=errors)
        try:
            out = [child.stdout.readline()]
            errors.seek(0)
            self.assertTrue(out[0], errors.read())
            while len(out) < lines and out[-1]:
                out.append(child.stdout.readline())
            child.send_signal(signal.SIGKILL)
            out.append(child.stdout.read())
        finally:
            child.wait()
            child.stdout.close()
            errors.close()
        return b"".join(out)

    def _open_spec(self, module_class, data_dir):
        storage = _load(module_class)(data_dir)
        storage.open()
        return storage


def _load(module_class):
    module, _, name = module_class.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


#: The child of the crash test: batches of 8 writes over 40 uids, printing
#: "uid n" for each item once its batch's write() has returned.
_CRASH_WRITER = r"""
import sys
from unittest import SkipTest
from minstore.testing import _load
from minstore.interfaces import WriteItem
from minstore.records import encode_record, make_record
storage = _load(sys.argv[1])(sys.argv[2])
storage.open()
n = int(sys.argv[3])
while True:
    batch = []
    for i in range(8):
        n += 1
        uid = "u%d" % (n % 40)
        version = "%013d-000000-crash" % n
        data = encode_record(make_record("crash", uid, {"n": n, "pad": "p" * 500}, version, float(n)))
        batch.append((uid, n, WriteItem("crash", uid, data, False, version, True, None)))
    storage.write([w for _, _, w in batch])
    sys.stdout.write("".join("%s %d\n" % (uid, n) for uid, n, _ in batch))
    sys.stdout.flush()
"""


#: The child of the index crash test: two threads write batches of 6 over
#: 30 uids each (a tombstone now and then; values of several types), while
#: the main thread builds the indexes declared, in small steps.
_CRASH_INDEX_WRITER = r"""
import sys, threading
from minstore.testing import _load
from minstore.interfaces import WriteItem
from minstore.records import encode_record, make_record, make_tombstone
from minstore.storage.indexes import parse_declarations
storage = _load(sys.argv[1])(sys.argv[2])
storage.open()
storage.set_indexes(parse_declarations(sys.argv[4]))
base = int(sys.argv[3])
out = threading.Lock()
def value(n):
    kinds = [n % 3, str(n % 3), None, True, n % 3 + 0.0]
    return {"g": kinds[n % 5], "h": n % 11, "k": {"x": n % 2}, "pad": "p" * 300}
def writer(t):
    n = base + t * 10**5
    while True:
        batch = []
        for i in range(6):
            n += 1
            uid = "t%d-u%d" % (t, n % 30)
            version = "%013d-%06d-crash" % (n, t)
            if n % 13 == 0:
                batch.append(WriteItem("crash", uid, encode_record(make_tombstone("crash", uid, version, float(n))), True, version, True, None))
            else:
                batch.append(WriteItem("crash", uid, encode_record(make_record("crash", uid, value(n), version, float(n))), False, version, True, None))
        storage.write(batch)
        with out:
            sys.stdout.write("%d %d\n" % (t, n))
            sys.stdout.flush()
for t in (1, 2):
    threading.Thread(target=writer, args=(t,), daemon=True).start()
while storage.build_indexes(7):
    pass
threading.Event().wait()  # built: the writers go on until the kill
"""
