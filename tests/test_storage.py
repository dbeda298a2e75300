"""
The storage engines: the IStorage contract for each, and what only the
``files`` engine promises (durable files, safe file names).
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from minstore.storage import BUILTIN, available_engines, make_storage
from minstore.storage.files import FileStorage, filename_to_uid, uid_to_filename
from minstore.storage.memory import MemoryStorage
from tests.contracts import TRICKY_UIDS, StorageContract, record, tombstone, uids_of


class MemoryStorageTests(StorageContract, SynchronousTestCase):
    def make_storage(self):
        storage = MemoryStorage()
        storage.open()
        self.addCleanup(storage.close)
        return storage


class FileStorageContractTests(StorageContract, SynchronousTestCase):
    def make_storage(self):
        storage = FileStorage(self.mktemp())
        storage.open()
        self.addCleanup(storage.close)
        return storage


class EngineRegistryTests(SynchronousTestCase):
    def test_builtin_engines(self):
        """``--storage files`` and ``--storage memory`` name the two built-in engines."""
        self.assertEqual(BUILTIN, {"files": FileStorage, "memory": MemoryStorage})
        self.assertIs(available_engines()["files"], FileStorage)
        data = self.mktemp()
        storage = make_storage("files", data)
        self.assertIsInstance(storage, FileStorage)
        self.assertEqual(storage.root, os.path.join(os.path.abspath(data), "records"))
        self.assertIsInstance(make_storage("memory", data), MemoryStorage)

    def test_unknown_engine(self):
        """An unknown engine name raises KeyError naming it."""
        e = self.assertRaises(KeyError, make_storage, "nosuch", self.mktemp())
        self.assertEqual(e.args, ("nosuch",))


def _all_paths(top):
    """Every directory and file under ``top``, relative to it."""
    dirs, files = set(), set()
    for root, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(root, top)
        for d in dirnames:
            dirs.add(os.path.normpath(os.path.join(rel, d)))
        for f in filenames:
            files.add(os.path.normpath(os.path.join(rel, f)))
    return dirs, files


HOSTILE_UIDS = [
    "../../x",
    "../x",
    "/etc/passwd",
    "..",
    ".",
    "a" * 255,
    "\u00e9t\u00e9/../../\u65e5\u672c",
    "x/../../../../tmp/evil",
    "\\..\\..\\win",
    "nul\x00byte",
    "./.",
    ".tmp-7",
]


class FileStorageTests(SynchronousTestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.data = os.path.join(self.base, "data")
        os.makedirs(self.data)

    def open(self):
        storage = FileStorage(self.data)
        storage.open()
        self.addCleanup(storage.close)
        return storage

    def test_open_creates_records_dir(self):
        """Opening over an empty data directory creates DATA/records and holds nothing."""
        storage = self.open()
        self.assertTrue(os.path.isdir(os.path.join(self.data, "records")))
        self.assertEqual(storage.count(), 0)
        self.assertEqual(storage.collections(), [])

    def test_open_missing_data_dir(self):
        """A data directory that does not exist yet is created at open."""
        storage = FileStorage(os.path.join(self.base, "new", "deeper"))
        storage.open()
        self.assertTrue(os.path.isdir(os.path.join(self.base, "new", "deeper", "records")))
        self.assertEqual(storage.count(), 0)

    def test_records_survive_reopen(self):
        """
        Records and tombstones written through one engine are read, listed
        and counted by a new engine opened over the same directory.
        """
        first = self.open()
        written = {}
        for uid in TRICKY_UIDS:
            written[uid] = record("books", uid, uid)
        first.write([("books", uid, data, False) for uid, data in written.items()])
        film = record("films", "f", {"n": 1})
        dead = tombstone("books", "..")
        first.write([("films", "f", film, False), ("books", "..", dead, True)])
        first.close()

        second = self.open()
        live = sorted(u for u in TRICKY_UIDS if u != "..")
        for uid in live:
            self.assertEqual(second.get("books", uid), written[uid], uid)
        self.assertEqual(second.get("books", ".."), dead)
        self.assertEqual(second.get("films", "f"), film)
        self.assertEqual(uids_of(second.list("books", None, None, 1000)), live)
        self.assertEqual(second.count(), len(live) + 1)
        self.assertEqual(second.collections(), ["books", "films"])

    def test_reopen_after_overwrite(self):
        """After a reopen the last write of a uid is the one read."""
        first = self.open()
        first.write([("books", "a", record("books", "a", 1), False)])
        last = record("books", "a", 2, version="0000000000009-000000-test")
        first.write([("books", "a", last, False)])
        second = self.open()
        self.assertEqual(second.get("books", "a"), last)
        self.assertEqual(second.count(), 1)

    def test_no_temporary_file_left_after_write(self):
        """A completed write leaves exactly one file per uid, no temporary file."""
        storage = self.open()
        storage.write([("books", u, record("books", u, u), False) for u in ["a", "b", "a"]])
        storage.flush()
        names = sorted(os.listdir(os.path.join(self.data, "records", "books")))
        self.assertEqual(names, ["a", "b"])

    def test_stray_temporary_files_removed_at_open(self):
        """
        ``.tmp-*`` files left by a write that never reached its rename are
        removed at open and never listed, counted or read as records.
        """
        storage = self.open()
        kept = record("books", "kept", 1)
        storage.write([("books", "kept", kept, False)])
        directory = os.path.join(self.data, "records", "books")
        orphan = os.path.join(directory, ".tmp-0")
        with open(orphan, "wb") as f:
            f.write(record("books", "orphan", 2))
        half = os.path.join(directory, ".tmp-99")
        with open(half, "wb") as f:
            f.write(b'{"uid": "trunc')  # a torn write: not even JSON

        second = self.open()
        self.assertFalse(os.path.exists(orphan))
        self.assertFalse(os.path.exists(half))
        self.assertEqual(os.listdir(directory), ["kept"])
        self.assertEqual(second.list("books", None, None, 10), [kept])
        self.assertEqual(second.count(), 1)
        self.assertIsNone(second.get("books", "orphan"))

    def test_torn_log_tail_not_applied(self):
        """
        After a crash in the middle of an unacknowledged write (its log
        line torn, even right after a ``}`` of a nested value), the engine
        opens and every acknowledged record reads as it was.
        """
        storage = self.open()
        kept = record("books", "a", {"x": {"y": 1}})
        storage.write([("books", "a", kept, False)])
        newer = record("books", "a", {"x": {"y": 2}, "z": 3}, version="0000000000005-000000-test")
        torn = newer[: newer.index(b"}") + 1]  # cut right after the inner object
        self.assertFalse(torn.endswith(b"}}"))
        # kill -9 while the next batch was being appended: no close().
        with open(os.path.join(self.data, "records.wal"), "ab") as f:
            f.write(b"0\tbooks\ta\t" + torn)
        second = self.open()
        self.assertEqual(second.get("books", "a"), kept)
        self.assertEqual(second.list("books", None, None, 10), [kept])
        self.assertEqual(second.count(), 1)

    def test_hostile_uids_stay_in_collection_directory(self):
        """
        No uid, however hostile (``../../x``, ``/etc/passwd``, ``..``,
        ``.``, 255 bytes, non-ASCII), creates a file or directory anywhere
        but directly inside DATA/records/COLLECTION, and each is read back.
        """
        storage = self.open()
        batch = [("books", uid, record("books", uid, i), False) for i, uid in enumerate(HOSTILE_UIDS)]
        storage.write(batch)
        storage.flush()  # the writer process has written every file
        for _, uid, data, _ in batch:
            self.assertEqual(storage.get("books", uid), data, uid)
        dirs, files = _all_paths(self.base)
        self.assertEqual(dirs, {"data", os.path.join("data", "records"), os.path.join("data", "records", "books")})
        collection_dir = os.path.join("data", "records", "books")
        # Beside the records, only the engine's write-ahead log.
        files = [f for f in files if f != os.path.join("data", "records.wal")]
        self.assertEqual(len(files), len(HOSTILE_UIDS))
        for f in files:
            self.assertEqual(os.path.dirname(f), collection_dir)
            name = os.path.basename(f)
            self.assertNotIn(name, (".", ".."))
            self.assertFalse(name.startswith("."), name)
        self.assertEqual(uids_of(storage.list("books", None, None, 100)), sorted(HOSTILE_UIDS))
        # And nothing was read from outside either.
        self.assertIsNone(storage.get("books", "../records/books/" + uid_to_filename("..")))

    def test_hostile_uid_is_not_a_path_for_reading(self):
        """A uid naming an existing file outside the collection reads as missing."""
        storage = self.open()
        storage.write([("books", "a", record("books", "a", 1), False)])
        secret = os.path.join(self.data, "secret")
        with open(secret, "wb") as f:
            f.write(b"{}")
        self.assertIsNone(storage.get("books", "../../secret"))
        self.assertIsNone(storage.get("books", secret))
        self.assertIsNone(storage.get("books", "../books/a"))

    def test_filename_round_trip(self):
        """Every short uid's file name turns back into the same uid."""
        for uid in TRICKY_UIDS + HOSTILE_UIDS + ["plain", "A-Z_09", "%", "%%25", "-", "_"]:
            name = uid_to_filename(uid)
            if name.startswith("="):
                self.assertIsNone(filename_to_uid(name))
            else:
                self.assertEqual(filename_to_uid(name), uid, repr(uid))

    def test_filenames_are_safe(self):
        """A file name holds no ``/``, is never ``.``/``..``, never starts with ``.``, fits 255 bytes."""
        for uid in TRICKY_UIDS + HOSTILE_UIDS:
            name = uid_to_filename(uid)
            self.assertNotIn("/", name)
            self.assertNotIn("\\", name)
            self.assertNotIn("\x00", name)
            self.assertFalse(name.startswith("."), repr(uid))
            self.assertLessEqual(len(name.encode("utf-8")), 255)
            self.assertTrue(set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%="), name)

    def test_filenames_are_injective(self):
        """Distinct uids never map to the same file name, encoded or hashed."""
        uids = set(TRICKY_UIDS + HOSTILE_UIDS)
        uids.update(["%41", "A", "%2541", "a%", "a%25", "a/", "a%2F", "a%2f", "=", "=a", "%3D"])
        # Names the encoding maps to themselves, and their encoded forms.
        for uid in list(uids):
            uids.add(uid_to_filename(uid))
        # Long uids that differ only at their end hash apart.
        uids.update(["x" * 250 + "a", "x" * 250 + "b", "\u00e9" * 100, "\u00e9" * 99 + "e"])
        names = {}
        for uid in uids:
            name = uid_to_filename(uid)
            self.assertNotIn(name, names, "%r and %r share %r" % (uid, names.get(name), name))
            names[name] = uid
        self.assertEqual(len(names), len(uids))

    def test_long_uid_gets_hashed_name(self):
        """
        A uid whose encoded name would pass 200 characters is stored under
        ``=`` plus its SHA-256, and still round-trips through get, list
        and a reopen.
        """
        storage = self.open()
        long_ascii = "k" * 201
        long_encoded = "/" * 67  # 201 characters once encoded
        long_unicode = "\u00e9" * 127
        short = "k" * 200
        uids = [long_ascii, long_encoded, long_unicode, short]
        storage.write([("books", uid, record("books", uid, uid), False) for uid in uids])
        storage.flush()
        names = set(os.listdir(os.path.join(self.data, "records", "books")))
        self.assertIn(short, names)
        hashed = names - {short}
        self.assertEqual(len(hashed), 3)
        for name in hashed:
            self.assertTrue(name.startswith("="))
            self.assertEqual(len(name), 65)
            self.assertIsNone(filename_to_uid(name))
        for storage in (storage, self.open()):
            for uid in uids:
                self.assertEqual(json.loads(storage.get("books", uid))["uid"], uid)
            self.assertEqual(uids_of(storage.list("books", None, None, 10)), sorted(uids))
            self.assertEqual(storage.count(), 4)

    def test_deleted_long_uid_stays_deleted_after_reopen(self):
        """A tombstone under a hashed name is still a tombstone after a reopen."""
        storage = self.open()
        uid = "\u65e5" * 80
        storage.write([("books", uid, record("books", uid, 1), False)])
        storage.write([("books", uid, tombstone("books", uid), True)])
        second = self.open()
        self.assertEqual(second.count(), 0)
        self.assertEqual(second.list("books", None, None, 10), [])
        self.assertTrue(json.loads(second.get("books", uid))["deleted"])
