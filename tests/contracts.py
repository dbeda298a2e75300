"""
The contract every storage engine keeps (L{minstore.interfaces.IStorage}).

L{StorageContract} is a mixin, not a test case: a test module runs it
against an engine by mixing it into a C{SynchronousTestCase} and defining
C{make_storage}, which returns an opened engine.
"""

import json

from zope.interface.verify import verifyObject

from minstore.interfaces import IStorage
from minstore.records import encode_record, make_record, make_tombstone

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
]


def record(collection, uid, value, version="0000000000001-000000-test"):
    """The stored bytes of a record, as the node writes them."""
    return encode_record(make_record(collection, uid, value, version, 1.0))


def tombstone(collection, uid, version="0000000000002-000000-test"):
    return encode_record(make_tombstone(collection, uid, version, 2.0))


def uids_of(items):
    return [json.loads(item)["uid"] for item in items]


class StorageContract:
    """
    Tests of the IStorage contract; the concrete class provides
    C{make_storage()}, returning an engine that is already opened.
    """

    def make_storage(self):
        raise NotImplementedError("%s must define make_storage" % (type(self).__name__,))

    def _put(self, storage, collection, uid, value="v", deleted=False):
        data = tombstone(collection, uid) if deleted else record(collection, uid, value)
        storage.write([(collection, uid, data, deleted)])
        return data

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
        self.assertIsNone(storage.get("films", "one"))

    def test_write_then_get(self):
        """A written record is read back as the exact bytes written."""
        storage = self.make_storage()
        data = record("books", "one", {"title": "Dune", "year": 1965, "tags": ["sf"]})
        storage.write([("books", "one", data, False)])
        self.assertEqual(storage.get("books", "one"), data)

    def test_overwrite(self):
        """Writing a uid again replaces its bytes; the count does not change."""
        storage = self.make_storage()
        self._put(storage, "books", "one", "first")
        second = self._put(storage, "books", "one", "second")
        self.assertEqual(storage.get("books", "one"), second)
        self.assertEqual(storage.count(), 1)
        self.assertEqual(storage.list("books", None, None, 10), [second])

    def test_same_uid_in_two_collections(self):
        """One uid in two collections is two independent records."""
        storage = self.make_storage()
        a = self._put(storage, "books", "one", "a book")
        b = self._put(storage, "films", "one", "a film")
        self.assertEqual(storage.get("books", "one"), a)
        self.assertEqual(storage.get("films", "one"), b)
        self.assertEqual(storage.count(), 2)

    def test_tombstone_is_read_but_not_listed(self):
        """
        A tombstone replaces the record: get returns the tombstone's bytes
        (so replication can compare versions), but listings, the count and
        the collections ignore it.
        """
        storage = self.make_storage()
        self._put(storage, "books", "one")
        kept = self._put(storage, "books", "two")
        dead = self._put(storage, "books", "one", deleted=True)
        self.assertEqual(storage.get("books", "one"), dead)
        self.assertTrue(json.loads(storage.get("books", "one"))["deleted"])
        self.assertEqual(storage.list("books", None, None, 10), [kept])
        self.assertEqual(storage.count(), 1)
        self._put(storage, "books", "two", deleted=True)
        self.assertEqual(storage.list("books", None, None, 10), [])
        self.assertEqual(storage.count(), 0)
        self.assertEqual(storage.collections(), [])

    def test_tombstone_then_record_again(self):
        """A record written over a tombstone is live again."""
        storage = self.make_storage()
        self._put(storage, "books", "one")
        self._put(storage, "books", "one", deleted=True)
        again = self._put(storage, "books", "one", "back")
        self.assertEqual(storage.get("books", "one"), again)
        self.assertEqual(storage.list("books", None, None, 10), [again])
        self.assertEqual(storage.count(), 1)

    def test_tombstone_of_never_written_uid(self):
        """A tombstone for a uid that was never live is held but never counted."""
        storage = self.make_storage()
        dead = self._put(storage, "books", "ghost", deleted=True)
        self.assertEqual(storage.get("books", "ghost"), dead)
        self.assertEqual(storage.count(), 0)
        self.assertEqual(storage.collections(), [])
        self.assertEqual(storage.list("books", None, None, 10), [])

    def test_list_in_uid_order(self):
        """A listing gives the records in uid order, whatever the write order."""
        storage = self.make_storage()
        for uid in ["m", "b", "z", "a", "B", "\u00e9", "a1"]:
            self._put(storage, "books", uid)
        self.assertEqual(
            uids_of(storage.list("books", None, None, 100)),
            ["B", "a", "a1", "b", "m", "z", "\u00e9"],
        )

    def test_list_other_collection_and_empty(self):
        """A listing holds only its collection's records; an unknown one is empty."""
        storage = self.make_storage()
        self._put(storage, "books", "a")
        self._put(storage, "films", "b")
        self.assertEqual(uids_of(storage.list("books", None, None, 10)), ["a"])
        self.assertEqual(uids_of(storage.list("films", None, None, 10)), ["b"])
        self.assertEqual(storage.list("songs", None, None, 10), [])

    def test_list_limit(self):
        """A listing gives at most ``limit`` records, the first ones."""
        storage = self.make_storage()
        for uid in "edcba":
            self._put(storage, "books", uid)
        self.assertEqual(uids_of(storage.list("books", None, None, 3)), ["a", "b", "c"])
        self.assertEqual(uids_of(storage.list("books", None, None, 1)), ["a"])
        self.assertEqual(uids_of(storage.list("books", None, None, 5)), list("abcde"))
        self.assertEqual(uids_of(storage.list("books", None, None, 50)), list("abcde"))

    def test_list_after(self):
        """``after`` starts the listing past that uid, whether it exists or not."""
        storage = self.make_storage()
        for uid in ["a", "b", "c", "e"]:
            self._put(storage, "books", uid)
        self.assertEqual(uids_of(storage.list("books", "b", None, 10)), ["c", "e"])
        self.assertEqual(uids_of(storage.list("books", "d", None, 10)), ["e"])
        self.assertEqual(uids_of(storage.list("books", "", None, 10)), ["a", "b", "c", "e"])
        self.assertEqual(storage.list("books", "e", None, 10), [])
        self.assertEqual(storage.list("books", "zzz", None, 10), [])

    def test_list_prefix(self):
        """``prefix`` keeps only the uids that start with it."""
        storage = self.make_storage()
        for uid in ["a", "ab", "abc", "abd", "ac", "b", "ba"]:
            self._put(storage, "books", uid)
        self.assertEqual(uids_of(storage.list("books", None, "ab", 10)), ["ab", "abc", "abd"])
        self.assertEqual(uids_of(storage.list("books", None, "b", 10)), ["b", "ba"])
        self.assertEqual(uids_of(storage.list("books", None, "ab", 2)), ["ab", "abc"])
        self.assertEqual(storage.list("books", None, "x", 10), [])
        self.assertEqual(storage.list("books", None, "abcd", 10), [])

    def test_list_prefix_and_after(self):
        """``prefix`` and ``after`` together: past the cursor, inside the prefix."""
        storage = self.make_storage()
        for uid in ["a", "ab", "abc", "abd", "abe", "ac", "b"]:
            self._put(storage, "books", uid)
        self.assertEqual(uids_of(storage.list("books", "abc", "ab", 10)), ["abd", "abe"])
        self.assertEqual(uids_of(storage.list("books", "abc", "ab", 1)), ["abd"])
        # A cursor before the prefix starts at the prefix.
        self.assertEqual(uids_of(storage.list("books", "a", "ab", 10)), ["ab", "abc", "abd", "abe"])
        # A cursor past the prefix ends the listing.
        self.assertEqual(storage.list("books", "ac", "ab", 10), [])

    def test_paging_visits_each_record_once(self):
        """Paging with the last uid of each page as ``after`` visits all 250 records once."""
        storage = self.make_storage()
        expected = sorted("r%04d" % (i * 7919 % 250) for i in range(250))
        storage.write([("books", uid, record("books", uid, uid), False) for uid in reversed(expected)])
        seen = []
        after = None
        pages = 0
        while pages < 20:  # bounded: a cursor that does not advance must fail, not hang
            page = uids_of(storage.list("books", after, None, 30))
            pages += 1
            if not page:
                break
            seen.extend(page)
            after = page[-1]
        self.assertEqual(seen, expected)
        self.assertEqual(len(set(seen)), 250)
        self.assertEqual(pages, 10)  # 8 full pages, one of 10, one empty

    def test_is_live(self):
        """
        is_live() answers from memory: True for a live record, False for a
        missing or deleted one (or None, "cannot tell", for an engine that
        does not know without reading).
        """
        storage = self.make_storage()
        answers = {None, False}
        self.assertIn(storage.is_live("books", "a"), answers)
        self._put(storage, "books", "a")
        self.assertIn(storage.is_live("books", "a"), {None, True})
        self.assertIn(storage.is_live("films", "a"), answers)
        self._put(storage, "books", "a", deleted=True)
        self.assertIn(storage.is_live("books", "a"), answers)

    def test_holds(self):
        """
        holds() answers from memory whether a record or a tombstone is held:
        False only for a uid never written (None: "cannot tell").
        """
        storage = self.make_storage()
        self.assertIn(storage.holds("books", "a"), {None, False})
        self._put(storage, "books", "a")
        self.assertIn(storage.holds("books", "a"), {None, True})
        self.assertIn(storage.holds("films", "a"), {None, False})
        self._put(storage, "books", "a", deleted=True)
        self.assertIn(storage.holds("books", "a"), {None, True})
        self._put(storage, "books", "a")
        self.assertIn(storage.holds("books", "a"), {None, True})

    def test_count(self):
        """count() is the number of live records across collections."""
        storage = self.make_storage()
        self.assertEqual(storage.count(), 0)
        self._put(storage, "books", "a")
        self._put(storage, "books", "b")
        self._put(storage, "films", "a")
        self.assertEqual(storage.count(), 3)
        self._put(storage, "books", "a", "again")
        self.assertEqual(storage.count(), 3)
        self._put(storage, "films", "a", deleted=True)
        self.assertEqual(storage.count(), 2)

    def test_collections(self):
        """collections() names, sorted, each collection that holds a live record."""
        storage = self.make_storage()
        self.assertEqual(list(storage.collections()), [])
        self._put(storage, "films", "a")
        self._put(storage, "books", "a")
        self._put(storage, "books.v2", "a")
        self.assertEqual(list(storage.collections()), ["books", "books.v2", "films"])
        self._put(storage, "films", "a", deleted=True)
        self.assertEqual(list(storage.collections()), ["books", "books.v2"])

    def test_batch(self):
        """Every item of a batch is stored, records and tombstones alike."""
        storage = self.make_storage()
        self._put(storage, "books", "c")
        a, b = record("books", "a", 1), record("films", "b", 2)
        dead = tombstone("books", "c")
        storage.write([("books", "a", a, False), ("films", "b", b, False), ("books", "c", dead, True)])
        self.assertEqual(storage.get("books", "a"), a)
        self.assertEqual(storage.get("films", "b"), b)
        self.assertEqual(storage.get("books", "c"), dead)
        self.assertEqual(storage.count(), 2)

    def test_empty_batch(self):
        """An empty batch stores nothing and does not fail."""
        storage = self.make_storage()
        storage.write([])
        self.assertEqual(storage.count(), 0)

    def test_batch_same_uid_twice_keeps_last(self):
        """A batch that holds one uid twice leaves the later item stored."""
        storage = self.make_storage()
        first = record("books", "a", "first")
        last = record("books", "a", "last", version="0000000000002-000000-test")
        storage.write([("books", "a", first, False), ("books", "a", last, False)])
        self.assertEqual(storage.get("books", "a"), last)
        self.assertEqual(storage.list("books", None, None, 10), [last])
        self.assertEqual(storage.count(), 1)

    def test_batch_record_then_tombstone_keeps_tombstone(self):
        """A batch writing a uid then its tombstone leaves it deleted."""
        storage = self.make_storage()
        live = record("books", "a", "x")
        dead = tombstone("books", "a")
        storage.write([("books", "a", live, False), ("books", "a", dead, True)])
        self.assertEqual(storage.get("books", "a"), dead)
        self.assertEqual(storage.count(), 0)
        self.assertEqual(storage.list("books", None, None, 10), [])

    def test_batch_tombstone_then_record_keeps_record(self):
        """A batch writing a tombstone then a record of one uid leaves it live."""
        storage = self.make_storage()
        self._put(storage, "books", "a")
        dead = tombstone("books", "a")
        live = record("books", "a", "back", version="0000000000003-000000-test")
        storage.write([("books", "a", dead, True), ("books", "a", live, False)])
        self.assertEqual(storage.get("books", "a"), live)
        self.assertEqual(storage.count(), 1)
        self.assertEqual(storage.list("books", None, None, 10), [live])

    def test_tricky_uids(self):
        """
        Unicode uids, and uids holding ``/``, ``..``, ``%``, spaces or 255
        bytes, are each stored, read and listed as themselves, none
        overwriting another.
        """
        storage = self.make_storage()
        written = {}
        for i, uid in enumerate(TRICKY_UIDS):
            written[uid] = self._put(storage, "books", uid, i)
        for uid, data in written.items():
            self.assertEqual(storage.get("books", uid), data, uid)
        self.assertEqual(storage.count(), len(TRICKY_UIDS))
        self.assertEqual(uids_of(storage.list("books", None, None, 1000)), sorted(TRICKY_UIDS))
        self.assertEqual(storage.list("books", None, None, 1000), [written[u] for u in sorted(TRICKY_UIDS)])

    def test_uid_of_255_bytes(self):
        """A uid of exactly 255 bytes of UTF-8 (multi-byte characters) round-trips."""
        storage = self.make_storage()
        uid = "\u20ac" * 85  # 3 bytes each
        self.assertEqual(len(uid.encode("utf-8")), 255)
        data = self._put(storage, "books", uid, "euro")
        self.assertEqual(storage.get("books", uid), data)
        self.assertIsNone(storage.get("books", uid[:-1]))
        self.assertEqual(uids_of(storage.list("books", None, "\u20ac\u20ac", 10)), [uid])

    def test_prefix_with_special_characters(self):
        """A prefix is matched on the uid itself, not on any encoded form."""
        storage = self.make_storage()
        for uid in ["a/b", "a/c", "a%2Fb", "a b", "ab"]:
            self._put(storage, "books", uid)
        self.assertEqual(uids_of(storage.list("books", None, "a/", 10)), ["a/b", "a/c"])
        self.assertEqual(uids_of(storage.list("books", None, "a%", 10)), ["a%2Fb"])
        self.assertEqual(uids_of(storage.list("books", None, "a ", 10)), ["a b"])
