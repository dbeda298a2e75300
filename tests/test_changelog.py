"""
The durable change log of L{minstore.cluster.changelog}: sequence numbers,
reopening after a stop or a crash, segment rotation and compaction, and
the peers' checkpoints.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from minstore.cluster.changelog import ChangeLog
from minstore.records import encode_record, make_record, make_tombstone

T0 = 1_700_000_000.0


def item(uid, n=0, collection="c", deleted=False):
    """A ``(collection, uid, data, deleted)`` item as the node logs it."""
    version = "%013d-%06d-a" % (int(T0 * 1000) + n, 0)
    if deleted:
        data = encode_record(make_tombstone(collection, uid, version, T0 + n))
    else:
        data = encode_record(make_record(collection, uid, {"n": n}, version, T0 + n))
    return (collection, uid, data, deleted)


def segments(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".log"))


class ChangeLogTests(SynchronousTestCase):
    def open_log(self, directory=None, **kwargs):
        directory = directory or self.mktemp()
        log = ChangeLog(directory, **kwargs)
        checkpoints, changes = log.open()
        self.addCleanup(log.close)
        return log, checkpoints, changes

    def test_fresh_log(self):
        """A new log creates its directory and has no checkpoints, no changes, last_seq 0."""
        directory = self.mktemp()
        log, checkpoints, changes = self.open_log(directory)
        self.assertTrue(os.path.isdir(directory))
        self.assertEqual((checkpoints, changes, log.last_seq), ({}, [], 0))

    def test_append_assigns_increasing_seqs(self):
        """append numbers the changes 1, 2, 3... across calls, each carrying its key, version and bytes."""
        log, _, _ = self.open_log()
        first = log.append([item("x", 1), item("y", 2)])
        second = log.append([item("z", 3, deleted=True)])
        self.assertEqual([c.seq for c in first + second], [1, 2, 3])
        self.assertEqual(log.last_seq, 3)
        self.assertEqual([c.key for c in first + second], [("c", "x"), ("c", "y"), ("c", "z")])
        self.assertEqual(second[0].data, item("z", 3, deleted=True)[2])
        self.assertEqual(first[0].version, json.loads(item("x", 1)[2])["version"])
        self.assertEqual(first[1].time, T0 + 2)

    def test_failed_append_takes_its_seqs_back(self):
        """
        An append whose sync fails raises and leaves neither seqs nor lines
        behind: the replication hands changes on in seq order and would
        otherwise wait for the lost ones forever.
        """
        from minstore.cluster import changelog as module

        directory = self.mktemp()
        log, _, _ = self.open_log(directory)
        log.append([item("x", 1)])

        def broken(fd):
            raise OSError(5, "Input/output error")

        self.patch(module, "sync_data", broken)
        self.assertRaises(OSError, log.append, [item("y", 2), item("z", 3)])
        self.assertEqual(log.last_seq, 1)
        self.patch(module, "sync_data", lambda fd: None)
        again = log.append([item("w", 4)])
        self.assertEqual([c.seq for c in again], [2])
        log.close()
        _, _, changes = self.open_log(directory)
        self.assertEqual([(c.seq, c.key[1]) for c in changes], [(1, "x"), (2, "w")])

    def test_reopen_returns_changes_after_lowest_checkpoint(self):
        """
        A reopened log returns its checkpoints and every change after the
        lowest one, and numbering continues after the last seq.
        """
        directory = self.mktemp()
        log = ChangeLog(directory)
        log.open()
        log.append([item("u%d" % n, n) for n in range(1, 6)])
        log.save_checkpoints({"http://b:1": 4, "http://c:1": 2})
        log.close()

        log, checkpoints, changes = self.open_log(directory)
        self.assertEqual(checkpoints, {"http://b:1": 4, "http://c:1": 2})
        self.assertEqual([c.seq for c in changes], [3, 4, 5])
        self.assertEqual([c.data for c in changes], [item("u%d" % n, n)[2] for n in (3, 4, 5)])
        self.assertEqual(log.last_seq, 5)
        self.assertEqual([c.seq for c in log.append([item("u6", 6)])], [6])
        log.close()

        _, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [3, 4, 5, 6])

    def test_reopen_without_checkpoints_returns_everything(self):
        """With no checkpoints.json (never saved), a reopened log returns every change."""
        directory = self.mktemp()
        log = ChangeLog(directory)
        log.open()
        log.append([item("a", 1), item("b", 2)])
        log.close()
        log, checkpoints, changes = self.open_log(directory)
        self.assertEqual(checkpoints, {})
        self.assertEqual([c.seq for c in changes], [1, 2])

    def test_torn_last_line_ignored(self):
        """
        A last line cut short by a crash (no newline, not JSON) is ignored on
        open: the changes before it are returned and numbering continues
        from the last whole change.
        """
        directory = self.mktemp()
        log = ChangeLog(directory)
        log.open()
        log.append([item("a", 1), item("b", 2), item("c", 3)])
        log.close()
        [last] = segments(directory)
        with open(os.path.join(directory, last), "ab") as f:
            f.write(b'4 {"collection":"c","uid":"d","ver')

        log, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [1, 2, 3])
        self.assertEqual(log.last_seq, 3)
        self.assertEqual([c.seq for c in log.append([item("d", 4)])], [4])
        log.close()
        _, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [1, 2, 3, 4])
        self.assertEqual(changes[-1].data, item("d", 4)[2])

    def test_torn_first_line_of_new_segment(self):
        """
        A crash during the first write to a freshly rotated segment leaves a
        segment holding only a torn line; the next change appended after
        reopening is still read back whole (it is not glued onto the torn
        bytes).
        """
        directory = self.mktemp()
        log = ChangeLog(directory)
        log.open()
        log.append([item("a", 1), item("b", 2)])
        log.close()
        with open(os.path.join(directory, "%020d.log" % 3), "wb") as f:
            f.write(b'3 {"collection":"c","ui')

        log, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [1, 2])
        self.assertEqual([c.seq for c in log.append([item("c", 3)])], [3])
        log.close()
        log, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [1, 2, 3])
        self.assertEqual(changes[-1].data, item("c", 3)[2])
        self.assertEqual(log.last_seq, 3)

    def test_garbage_line_ignored(self):
        """A line of bytes that is no change at all (not even a number) is skipped."""
        directory = self.mktemp()
        log = ChangeLog(directory)
        log.open()
        log.append([item("a", 1)])
        log.close()
        [last] = segments(directory)
        with open(os.path.join(directory, last), "ab") as f:
            f.write(b"\x00\xff\xfegarbage")
        log, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [1])
        self.assertEqual(log.last_seq, 1)

    def test_rotation_and_compaction(self):
        """
        With a small segment_bytes every append starts a new segment;
        saving checkpoints deletes the segments wholly at or below the
        lowest checkpoint, keeps the others, and never deletes the segment
        being written, so last_seq survives a reopen.
        """
        directory = self.mktemp()
        log, _, _ = self.open_log(directory, segment_bytes=1)
        for n in range(1, 6):
            log.append([item("u%d" % n, n)])
        self.assertEqual(segments(directory), ["%020d.log" % n for n in range(1, 6)])

        log.save_checkpoints({"http://b:1": 5, "http://c:1": 3})
        self.assertEqual(segments(directory), ["%020d.log" % n for n in (4, 5)])

        log.save_checkpoints({"http://b:1": 5, "http://c:1": 5})
        self.assertEqual(segments(directory), ["%020d.log" % 5])
        log.close()

        log, checkpoints, changes = self.open_log(directory, segment_bytes=1)
        self.assertEqual(checkpoints, {"http://b:1": 5, "http://c:1": 5})
        self.assertEqual(changes, [])
        self.assertEqual(log.last_seq, 5)
        self.assertEqual([c.seq for c in log.append([item("u6", 6)])], [6])

    def test_compaction_keeps_segment_a_peer_needs(self):
        """A segment holding one change a peer still lacks is kept, with all of its changes."""
        directory = self.mktemp()
        log, _, _ = self.open_log(directory, segment_bytes=1)
        log.append([item("a", 1), item("b", 2)])
        log.append([item("c", 3), item("d", 4)])
        log.append([item("e", 5)])
        self.assertEqual(segments(directory), ["%020d.log" % n for n in (1, 3, 5)])
        log.save_checkpoints({"http://b:1": 5, "http://c:1": 3})
        self.assertEqual(segments(directory), ["%020d.log" % n for n in (3, 5)])
        log.close()
        _, _, changes = self.open_log(directory)
        self.assertEqual([c.seq for c in changes], [4, 5])

    def test_checkpoints_written_atomically(self):
        """save_checkpoints writes checkpoints.json as JSON and leaves no temporary file."""
        directory = self.mktemp()
        log, _, _ = self.open_log(directory)
        log.append([item("a", 1)])
        log.save_checkpoints({"http://b:1": 1})
        self.assertEqual(log.read_checkpoints(), {"http://b:1": 1})
        with open(os.path.join(directory, "checkpoints.json"), "rb") as f:
            self.assertEqual(json.loads(f.read()), {"http://b:1": 1})
        self.assertEqual(sorted(os.listdir(directory)), ["%020d.log" % 1, "checkpoints.json"])

    def test_unreadable_checkpoints(self):
        """
        A checkpoints.json that is cut short, not an object, or holds a
        non-number reads as {}: every change in the log is returned again.
        """
        for garbage in (b'{"http://b:1": 1', b"[1, 2]", b'{"http://b:1": "x"}', b""):
            directory = self.mktemp()
            log = ChangeLog(directory)
            log.open()
            log.append([item("a", 1), item("b", 2)])
            log.save_checkpoints({"http://b:1": 2})
            log.close()
            with open(os.path.join(directory, "checkpoints.json"), "wb") as f:
                f.write(garbage)
            log, checkpoints, changes = self.open_log(directory)
            self.assertEqual(checkpoints, {}, garbage)
            self.assertEqual([c.seq for c in changes], [1, 2], garbage)
            self.assertEqual(log.last_seq, 2)

    def test_checkpoints_synced_only_for_new_peers(self):
        """
        save_checkpoints does not sync the file (a stale or lost one only
        means resending), except when it names a peer that the file on disk
        may not hold yet (a restart would take that peer for a new one):
        the first save, an added peer, a peer added back after a removal.
        A reopened log knows which peers its file holds.
        """
        import minstore.cluster.changelog as changelog

        synced = []
        self.patch(changelog, "sync_data", lambda fd: synced.append("file"))
        self.patch(changelog, "fsync_dir", lambda path: synced.append("dir"))
        directory = self.mktemp()
        log, _, _ = self.open_log(directory)
        log.append([item("a", 1), item("b", 2)])

        def save(checkpoints):
            del synced[:]
            log.save_checkpoints(checkpoints)
            self.assertEqual(log.read_checkpoints(), checkpoints)
            self.assertNotIn("checkpoints.json.tmp", os.listdir(directory))
            return bool(synced)

        b, c = "http://b:1", "http://c:1"
        self.assertTrue(save({b: 0}))
        self.assertEqual(synced, ["file", "dir"])
        self.assertFalse(save({b: 1}))
        self.assertFalse(save({b: 2}))
        self.assertTrue(save({b: 2, c: 2}))
        self.assertFalse(save({b: 2, c: 2}))
        self.assertFalse(save({c: 2}))
        self.assertTrue(save({b: 2, c: 2}))
        log.close()

        log, _, _ = self.open_log(directory)
        self.assertFalse(save({b: 2, c: 2}))
        self.assertTrue(save({b: 2, c: 2, "http://d:1": 2}))

    def test_checkpoints_never_go_back(self):
        """
        A save with older checkpoints than the last one written (a save
        overtaken by the final one at stop) keeps the newer ones, and
        compacts with them; a peer left out is dropped.
        """
        directory = self.mktemp()
        log, _, _ = self.open_log(directory, segment_bytes=1)
        for n in range(1, 5):
            log.append([item("u%d" % n, n)])
        log.save_checkpoints({"http://b:1": 4, "http://c:1": 2})
        self.assertEqual(segments(directory), ["%020d.log" % n for n in (3, 4)])
        log.save_checkpoints({"http://b:1": 2, "http://c:1": 1})
        self.assertEqual(log.read_checkpoints(), {"http://b:1": 4, "http://c:1": 2})
        self.assertEqual(segments(directory), ["%020d.log" % n for n in (3, 4)])
        log.save_checkpoints({"http://b:1": 4})
        self.assertEqual(log.read_checkpoints(), {"http://b:1": 4})
        self.assertEqual(segments(directory), ["%020d.log" % 4])
        log.close()
        log, checkpoints, _ = self.open_log(directory)
        log.save_checkpoints({"http://b:1": 1})
        self.assertEqual(log.read_checkpoints(), {"http://b:1": 4})
