"""The files engine's write-ahead log: what makes a write durable before its file is synced."""

import os

from twisted.trial.unittest import SynchronousTestCase

from minstore.records import encode_record, make_record, make_tombstone
from minstore.storage.files import FileStorage, uid_to_filename


def record(uid, value):
    return encode_record(make_record("books", uid, value, "0000000000001-000000-n", 1.0))


class WriteAheadLogTests(SynchronousTestCase):
    def open(self, data_dir):
        storage = FileStorage(data_dir)
        storage.open()
        # A kill -9 is simulated by never closing: end the writer process
        # at the end of the test all the same.
        self.addCleanup(storage._writer.close)
        return storage

    def test_acknowledged_write_rebuilt_from_log(self):
        """
        A write whose record file was lost (the crash came before the file
        system flushed it) is rebuilt from the log when the engine reopens.
        """
        data_dir = self.mktemp()
        storage = self.open(data_dir)
        data = record("dune", "spice")
        storage.write([("books", "dune", data, False)])
        storage.flush()
        # kill -9: no close(); and the record file never reached the disk.
        os.unlink(os.path.join(storage.root, "books", uid_to_filename("dune")))
        again = self.open(data_dir)
        self.assertEqual(again.get("books", "dune"), data)
        self.assertEqual(again.count(), 1)

    def test_torn_first_file_rebuilt_from_log(self):
        """
        A uid's first file is written in place, not renamed into place: a
        crash in the middle leaves it torn, and the log's replay repairs it.
        """
        data_dir = self.mktemp()
        storage = self.open(data_dir)
        data = record("dune", "spice")
        storage.write([("books", "dune", data, False)])
        storage.flush()
        path = os.path.join(storage.root, "books", "dune")
        with open(path, "r+b") as f:
            f.truncate(len(data) // 2)
        again = self.open(data_dir)
        self.assertEqual(again.get("books", "dune"), data)
        self.assertEqual(os.listdir(os.path.join(storage.root, "books")), ["dune"])

    def test_uid_being_created_is_not_read(self):
        """Until its first write returns, a uid reads as absent, whatever is on disk."""
        storage = self.open(self.mktemp())
        directory = os.path.join(storage.root, "books")
        os.makedirs(directory)
        with open(os.path.join(directory, "dune"), "wb") as f:
            f.write(b'{"collection":"bo')  # a first write under way
        self.assertIsNone(storage.get("books", "dune"))
        self.assertEqual(storage.list("books", None, None, 10), [])

    def test_replay_keeps_the_last_write_of_a_uid(self):
        """Several writes of one uid in the log replay to the last one."""
        data_dir = self.mktemp()
        storage = self.open(data_dir)
        first, second = record("dune", 1), record("dune", 2)
        storage.write([("books", "dune", first, False)])
        storage.write([("books", "dune", second, False)])
        storage.flush()
        os.unlink(os.path.join(storage.root, "books", "dune"))
        self.assertEqual(self.open(data_dir).get("books", "dune"), second)

    def test_torn_tail_ignored(self):
        """A half-written last line (never synced, never acknowledged) is skipped."""
        data_dir = self.mktemp()
        storage = self.open(data_dir)
        data = record("dune", "spice")
        storage.write([("books", "dune", data, False)])
        with open(storage.wal_path, "ab") as f:
            f.write(b'0\tbooks\tmessiah\t{"collection":"bo')
        again = self.open(data_dir)
        self.assertEqual(again.get("books", "dune"), data)
        self.assertIsNone(again.get("books", "messiah"))

    def test_log_emptied_at_checkpoint_and_close(self):
        """
        Once the log passes checkpoint_bytes the record files are synced and
        the log emptied; close does the same, and the records stay.
        """
        data_dir = self.mktemp()
        storage = self.open(data_dir)
        storage.checkpoint_bytes = 1000
        for i in range(20):
            storage.write([("books", "u%02d" % i, record("u%02d" % i, "x" * 50), False)])
            self.assertLess(os.path.getsize(storage.wal_path), 1000 + 300)
        storage.close()
        self.assertEqual(os.path.getsize(storage.wal_path), 0)
        again = self.open(data_dir)
        self.assertEqual(again.count(), 20)


class DamagedFileTests(SynchronousTestCase):
    def test_damaged_record_file_set_aside(self):
        """
        A record file damaged outside minstore does not stop the engine from
        opening: it is set aside (never listed) and the other records stay.
        """
        data_dir = self.mktemp()
        storage = FileStorage(data_dir)
        storage.open()
        good = record("dune", "spice")
        storage.write([("books", "dune", good, False), ("books", "bad", record("bad", 1), False)])
        storage.close()
        path = os.path.join(storage.root, "books", "bad")
        with open(path, "wb") as f:
            f.write(b"\x00garbage")
        again = FileStorage(data_dir)
        again.open()
        self.assertEqual(again.get("books", "dune"), good)
        self.assertIsNone(again.get("books", "bad"))
        self.assertEqual(again.list("books", None, None, 10), [good])
        self.assertTrue(os.path.exists(os.path.join(storage.root, "books", ".damaged-bad")))

    def test_set_aside_file_stays_aside(self):
        """Reopening again neither lists nor renames the set-aside file."""
        data_dir = self.mktemp()
        storage = FileStorage(data_dir)
        storage.open()
        storage.write([("books", "bad", record("bad", 1), False)])
        storage.close()
        with open(os.path.join(storage.root, "books", "bad"), "wb") as f:
            f.write(b"{")
        for _ in range(2):
            again = FileStorage(data_dir)
            again.open()
            again.close()
        self.assertEqual(sorted(os.listdir(os.path.join(storage.root, "books"))), [".damaged-bad"])


class IsLiveAfterReopenTests(SynchronousTestCase):
    def test_is_live_after_reopen(self):
        """The files engine knows, from memory, what it held before a restart."""
        data_dir = self.mktemp()
        storage = FileStorage(data_dir)
        storage.open()
        tombstone = encode_record(make_tombstone("books", "b", "0000000000002-000000-n", 2.0))
        storage.write([("books", "a", record("a", 1), False), ("books", "b", tombstone, True)])
        storage.close()
        again = FileStorage(data_dir)
        again.open()
        self.assertIs(again.is_live("books", "a"), True)
        self.assertIs(again.is_live("books", "b"), False)
        self.assertIs(again.is_live("books", "c"), False)
        # A tombstone is held, so a late replica older than it is refused.
        self.assertEqual(
            [again.holds("books", uid) for uid in "abc"], [True, True, False]
        )
