"""
The storage engines: the IStorage contract for each, and what only the
``files`` engine promises (durable files, safe file names).
"""

import json
import os
import threading

from twisted.trial.unittest import SynchronousTestCase

from minstore.storage import BUILTIN, available_engines, make_storage
from minstore.errors import StorageFailed
from minstore.interfaces import WriteItem
from minstore.storage.files import FileStorage, filename_to_uid, uid_to_filename
from minstore.storage.memory import MemoryStorage
from minstore.storage.sqlite import SQLiteStorage, prefix_bound
from minstore.testing import TRICKY_UIDS, DurableStorageContract, StorageContract, record, tombstone, uids_of


def w(collection, uid, data, deleted=False):
    """A WriteItem of stored bytes (the version read from them)."""
    return WriteItem(collection, uid, data, deleted, json.loads(data)["version"], True, None)


class MemoryStorageTests(StorageContract, SynchronousTestCase):
    def make_storage(self):
        storage = MemoryStorage()
        storage.open()
        self.addCleanup(storage.close)
        return storage


class _DurableEngineTests(StorageContract, DurableStorageContract):
    engine = None

    def make_storage(self):
        self.data = os.path.abspath(self.mktemp())
        return self._open()

    def _open(self):
        storage = self.engine(self.data)
        storage.open()
        self.addCleanup(storage.close)
        return storage

    def reopen_storage(self, storage):
        storage.close()
        return self._open()

    def engine_spec(self):
        return ("%s:%s" % (self.engine.__module__, self.engine.__name__), os.path.abspath(self.mktemp()))

    def fill_disk(self, storage):
        # SQLite's own size limit fails a write exactly as a full disk does (SQLITE_FULL).
        pages = storage._writer.execute("PRAGMA page_count").fetchone()[0]
        storage._writer.execute("PRAGMA max_page_count = %d" % (pages + 2)).fetchall()
        return True

    def free_disk(self, storage):
        storage._writer.execute("PRAGMA max_page_count = 1073741823").fetchall()


class SQLiteStorageContractTests(_DurableEngineTests, SynchronousTestCase):
    engine = SQLiteStorage


class FileStorageContractTests(_DurableEngineTests, SynchronousTestCase):
    engine = FileStorage

    def test_purge_removes_the_tombstones_file(self):
        """A purged tombstone's record file is removed; a live record's stays, also after a reopen."""
        storage = self.make_storage()
        storage.write([w("c", "live", record("c", "live", 1)), w("c", "gone", tombstone("c", "gone"), True)])
        gone, live = storage.path_of("c", "gone"), storage.path_of("c", "live")
        self.assertTrue(os.path.exists(gone))
        self.assertEqual(len(storage.purge_tombstones("9", 10, 10, 10)), 1)
        self.assertFalse(os.path.exists(gone))
        storage = self.reopen_storage(storage)
        self.assertFalse(os.path.exists(gone))
        self.assertTrue(os.path.exists(live))


class EngineRegistryTests(SynchronousTestCase):
    def test_builtin_engines(self):
        """``--storage files``, ``sqlite`` and ``memory`` name the three built-in engines."""
        self.assertEqual(BUILTIN, {"files": FileStorage, "sqlite": SQLiteStorage, "memory": MemoryStorage})
        self.assertIs(available_engines()["files"], FileStorage)
        data = self.mktemp()
        storage = make_storage("files", data)
        self.assertIsInstance(storage, FileStorage)
        self.assertEqual(storage.root, os.path.join(os.path.abspath(data), "records"))
        self.assertIsInstance(make_storage("memory", data), MemoryStorage)
        self.assertEqual(make_storage("sqlite", data).path, os.path.join(os.path.abspath(data), "minstore.sqlite3"))

    def test_unknown_engine(self):
        """An unknown engine name raises KeyError naming it."""
        e = self.assertRaises(KeyError, make_storage, "nosuch", self.mktemp())
        self.assertEqual(e.args, ("nosuch",))


class SQLiteDamageTests(SynchronousTestCase):
    def test_foreign_file_refuses_open_with_one_line(self):
        """A database file that is not SQLite's makes open raise StorageFailed naming the file."""
        for engine, name in ((SQLiteStorage, "minstore.sqlite3"), (FileStorage, "catalog.sqlite3")):
            data = os.path.abspath(self.mktemp())
            os.makedirs(data)
            with open(os.path.join(data, name), "wb") as f:
                f.write(b"this is not a database\n" * 100)
            e = self.assertRaises(StorageFailed, engine(data).open)
            self.assertIn(name, str(e))
            self.assertNotIn("\n", str(e))

    def test_prefix_bound(self):
        """The bound of a prefix is above every string starting with it and below the next prefix."""
        self.assertEqual(prefix_bound("ab"), "ac")
        self.assertEqual(prefix_bound("a\U0010ffff"), "b")
        self.assertEqual(prefix_bound("\ud7ff"), "\ue000")
        self.assertIsNone(prefix_bound("\U0010ffff"))


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
        first.write([w("books", uid, data) for uid, data in written.items()])
        film = record("films", "f", {"n": 1})
        dead = tombstone("books", "..")
        first.write([w("films", "f", film), w("books", "..", dead, True)])
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
        first.write([w("books", "a", record("books", "a", 1))])
        last = record("books", "a", 2, version="0000000000009-000000-test")
        first.write([w("books", "a", last)])
        first.close()
        second = self.open()
        self.assertEqual(second.get("books", "a"), last)
        self.assertEqual(second.count(), 1)

    def test_no_temporary_file_left_after_write(self):
        """A completed write leaves exactly one file per uid, no temporary file."""
        storage = self.open()
        storage.write([w("books", u, record("books", u, u)) for u in ["a", "b", "a"]])
        names = sorted(os.listdir(os.path.join(self.data, "records", "books")))
        self.assertEqual(names, ["a", "b"])

    def test_record_files_follow_the_catalog(self):
        """
        Each record has a readable JSON file, written as the write returns;
        a file that a crash left older than the catalog (or lost) is written
        again at the next open.
        """
        storage = self.open()
        data = record("books", "dune", {"title": "Dune"})
        storage.write([w("books", "dune", data), w("books", "gone", record("books", "gone", 1))])
        path = os.path.join(self.data, "records", "books", "dune")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        # As after a crash before the files were synced: one file lost, one stale.
        os.unlink(os.path.join(self.data, "records", "books", "gone"))
        with open(path, "wb") as f:
            f.write(b'{"uid": "dune", "value": "stale')
        storage._writer.execute("DELETE FROM meta WHERE key = 'files_seq'").close()
        second = self.open()
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertTrue(os.path.exists(os.path.join(self.data, "records", "books", "gone")))
        self.assertEqual(second.get("books", "dune"), data)

    def test_a_write_does_not_wait_for_the_files_checkpoint(self):
        """
        The write that crosses checkpoint_bytes returns before the record
        files are synced (its batch is durable in the catalog already); the
        sync runs in a thread of its own, and then the checkpoint is noted.
        """
        from minstore.storage import files

        storage = self.open()
        storage.checkpoint_bytes = 1
        started, release = threading.Event(), threading.Event()

        def slow_syncfs(path):
            started.set()
            release.wait(30)

        self.patch(files, "syncfs", slow_syncfs)
        data = record("books", "a", 1)
        self.assertEqual(storage.write([w("books", "a", data)]), [1])
        self.assertTrue(started.wait(30))
        self.assertEqual(storage._files_seq(), 0)  # not synced yet, and the write has returned
        self.assertEqual(storage.get("books", "a"), data)
        release.set()
        storage._background.join(30)
        self.assertEqual(storage._files_seq(), 1)

    def test_reads_come_from_the_catalog(self):
        """A record file damaged by hand changes nothing that the node serves."""
        storage = self.open()
        data = record("books", "a", 1)
        storage.write([w("books", "a", data)])
        with open(os.path.join(self.data, "records", "books", "a"), "wb") as f:
            f.write(b"garbage")
        self.assertEqual(storage.get("books", "a"), data)
        self.assertEqual(storage.list("books", None, None, 10), [data])

    def test_migrates_the_earlier_layout(self):
        """
        A data directory of the layout before the catalog (record files,
        records.wal, changes/ with checkpoints) opens with every record, the
        log's acknowledged writes applied, and the writes still owed to each
        peer at the end of the feed after that peer's checkpoint.
        """
        books = os.path.join(self.data, "records", "books")
        os.makedirs(books)
        old = {uid: record("books", uid, uid, version="000000000000%d-000000-old" % i) for i, uid in enumerate("abc")}
        for uid, data in old.items():
            with open(os.path.join(books, uid), "wb") as f:
                f.write(data)
        with open(os.path.join(books, "bad"), "wb") as f:
            f.write(b"not json")
        newer_c = record("books", "c", "newer", version="0000000000008-000000-old")
        d = record("books", "d", "in the log only", version="0000000000009-000000-old")
        with open(os.path.join(self.data, "records.wal"), "wb") as f:
            f.write(b"0\tbooks\tc\t" + newer_c + b"\n0\tbooks\td\t" + d + b"\n0\tbooks\te\t{\"torn")
        changes = os.path.join(self.data, "changes")
        os.makedirs(changes)
        with open(os.path.join(changes, "%020d.log" % 1), "wb") as f:
            f.write(b"1 " + old["a"] + b"\n2 " + newer_c + b"\n3 " + d + b"\n")
        with open(os.path.join(changes, "checkpoints.json"), "w") as f:
            json.dump({"http://p:1": 2, "http://q:1": 1}, f)
        with open(os.path.join(self.data, "clock"), "w") as f:
            f.write("99999999999999")

        storage = self.open()
        self.assertEqual(uids_of(storage.list("books", None, None, 10)), ["a", "b", "c", "d"])
        self.assertEqual(storage.get("books", "c"), newer_c)
        self.assertEqual(storage.get("books", "d"), d)
        self.assertEqual(storage.max_version(), "0000000000009-000000-old")
        feed, _ = storage.changes(0, 10, forwarded_only=True)
        self.assertEqual([c.uid for c in feed], ["c", "d"])
        cps = storage.checkpoints()
        self.assertEqual([c.uid for c in storage.changes(cps["http://p:1"], 10, True)[0]], ["d"])
        self.assertEqual([c.uid for c in storage.changes(cps["http://q:1"], 10, True)[0]], ["c", "d"])
        self.assertTrue(os.path.exists(books + "/.damaged-bad"))
        self.assertFalse(os.path.exists(os.path.join(self.data, "records.wal")))
        self.assertFalse(os.path.exists(os.path.join(self.data, "clock")))
        # Opened again: nothing migrated twice.
        storage.close()
        again = self.open()
        self.assertEqual(again.last_seq(), 4)

    def test_hostile_uids_stay_in_collection_directory(self):
        """
        No uid, however hostile (``../../x``, ``/etc/passwd``, ``..``,
        ``.``, 255 bytes, non-ASCII), creates a file or directory anywhere
        but directly inside DATA/records/COLLECTION, and each is read back.
        """
        storage = self.open()
        batch = [w("books", uid, record("books", uid, i)) for i, uid in enumerate(HOSTILE_UIDS)]
        storage.write(batch)
        for _, uid, data, _, _, _, _ in batch:
            self.assertEqual(storage.get("books", uid), data, uid)
        dirs, files = _all_paths(self.base)
        self.assertEqual(dirs, {"data", os.path.join("data", "records"), os.path.join("data", "records", "books")})
        collection_dir = os.path.join("data", "records", "books")
        # Beside the records, only the catalog.
        files = [f for f in files if not os.path.basename(f).startswith("catalog.sqlite3")]
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
        storage.write([w("books", "a", record("books", "a", 1))])
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
        storage.write([w("books", uid, record("books", uid, uid)) for uid in uids])
        names = set(os.listdir(os.path.join(self.data, "records", "books")))
        self.assertIn(short, names)
        hashed = names - {short}
        self.assertEqual(len(hashed), 3)
        for name in hashed:
            self.assertTrue(name.startswith("="))
            self.assertEqual(len(name), 65)
            self.assertIsNone(filename_to_uid(name))
        storage.close()
        for storage in (storage, self.open()):
            for uid in uids:
                self.assertEqual(json.loads(storage.get("books", uid))["uid"], uid)
            self.assertEqual(uids_of(storage.list("books", None, None, 10)), sorted(uids))
            self.assertEqual(storage.count(), 4)

    def test_deleted_long_uid_stays_deleted_after_reopen(self):
        """A tombstone under a hashed name is still a tombstone after a reopen."""
        storage = self.open()
        uid = "\u65e5" * 80
        storage.write([w("books", uid, record("books", uid, 1))])
        storage.write([w("books", uid, tombstone("books", uid), True)])
        second = self.open()
        self.assertEqual(second.count(), 0)
        self.assertEqual(second.list("books", None, None, 10), [])
        self.assertTrue(json.loads(second.get("books", uid))["deleted"])


class FilesOpenOnFullDiskTests(SynchronousTestCase):
    def test_record_files_that_cannot_be_written_do_not_stop_the_open(self):
        """
        At open, a record file that cannot be written again (a full disk)
        is logged and left for the next open: the engine opens and serves
        every record from its catalog.
        """
        data = os.path.abspath(self.mktemp())
        storage = FileStorage(data)
        storage.open()
        record_data = record("books", "a", 1)
        storage.write([w("books", "a", record_data)])
        storage._writer.execute("DELETE FROM meta WHERE key = 'files_seq'").close()
        storage._writer.close()
        storage._writer = None

        reopened = FileStorage(data)

        def full(*args):
            raise OSError(28, "No space left on device")

        reopened._write_record_file = full
        reopened.open()
        self.addCleanup(reopened.close)
        self.assertEqual(reopened.get("books", "a"), record_data)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
