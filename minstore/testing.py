"""
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
import os
import signal
import subprocess
import sys
import time

from zope.interface.verify import verifyObject

from minstore.errors import StorageFailed
from minstore.interfaces import ABSENT, NEWER, IStorage, WriteItem
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


class StorageContract:
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
        uids = ["b", "a", "a\x00", "\u00e9", "\U0001f600", "Z", "a/b"]
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
        for round, delay in enumerate((0.15, 0.3, 0.5)):
            errors = open(data_dir + ".stderr", "w+b")
            child = subprocess.Popen(
                [sys.executable, "-c", _CRASH_WRITER, module_class, data_dir, str(round * 10**6)],
                stdout=subprocess.PIPE,
                stderr=errors,
            )
            try:
                # Wait until it has written something, then let it run on a bit.
                first = child.stdout.readline()
                errors.seek(0)
                self.assertTrue(first, errors.read())
                time.sleep(delay)
                child.send_signal(signal.SIGKILL)
                out = first + child.stdout.read()
            finally:
                child.wait()
                child.stdout.close()
                errors.close()
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
