"""
The change log: what this node still has to send to its peers, durable.

Every write a node must pass on (a client's write, or a replica received
from a bridge) is appended with a sequence number, in the same storage call
that stores the record and before the write is acknowledged, so neither a
restart nor ``kill -9`` can lose it.  Each peer has a checkpoint: the
sequence number up to which it has everything (CouchDB's ``_changes`` and
replication checkpoints are the model).  Segments wholly below every peer's
checkpoint are deleted.

The change log is synced before a write is acknowledged; the checkpoints
file is not (except when it names a peer for the first time, see
L{ChangeLog.save_checkpoints}): a checkpoint that is stale, or a file that
is lost, only makes the node resend changes the peer already holds, and
replicas are idempotent.

Files, under ``DATA/changes/``: ``{first_seq:020d}.log`` segments of lines
``SEQ RECORD-JSON``, and ``checkpoints.json``.
"""

import json
import os
import threading

from twisted.logger import Logger

from minstore._util import fsync_dir, sync_data

SEGMENT_BYTES = 8 * 1024 * 1024



class Change:
    """One logged write: its sequence number, key, version and record bytes."""

    __slots__ = ("seq", "key", "version", "data", "time")

    def __init__(self, seq, key, version, data, time):
        self.seq = seq
        self.key = key
        self.version = version
        self.data = data
        self.time = time

    @classmethod
    def from_record(cls, seq, data):
        record = json.loads(data)
        return cls(
            seq,
            (record["collection"], record["uid"]),
            record["version"],
            data,
            float(record.get("timestamp") or 0.0),
        )


class ChangeLog:
    """
    Blocking: ``append`` runs in the node's writer thread, ``open``,
    ``save_checkpoints`` and ``compact`` in the thread pool or at start.
    """

    log = Logger()

    def __init__(self, directory, segment_bytes=SEGMENT_BYTES):
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.last_seq = 0
        self._lock = threading.Lock()
        self._file = None
        self._file_size = 0
        self._segments = []  # first seqs, ascending
        # Checkpoint saves come from the thread pool and, at stop, from the
        # reactor thread: one at a time, never going back (see save_checkpoints).
        self._checkpoint_lock = threading.Lock()
        self._saved = {}  # peer -> the checkpoint last written
        self._durable_peers = set()  # peers that checkpoints.json holds even after a power loss

    def _segment_path(self, first_seq):
        return os.path.join(self.directory, "%020d.log" % first_seq)

    def open(self):
        """Read the checkpoints and every change after the lowest one."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory)
            fsync_dir(os.path.dirname(self.directory))
        self._segments = sorted(
            int(name[:-4]) for name in os.listdir(self.directory) if name.endswith(".log")
        )
        checkpoints = self.read_checkpoints()
        with self._checkpoint_lock:
            self._saved = dict(checkpoints)
            # Every peer in the file was synced when it was first written there.
            self._durable_peers = set(checkpoints)
        floor = min(checkpoints.values()) if checkpoints else None
        changes = []
        for first in self._segments:
            with open(self._segment_path(first), "rb") as f:
                for line in f:
                    seq, _, data = line.rstrip(b"\n").partition(b" ")
                    try:
                        change = Change.from_record(int(seq), data)
                    except (ValueError, KeyError):
                        # A torn last line: written, never synced, never acknowledged.
                        self.log.warn("ignoring a torn change log line in {f}", f=first)
                        continue
                    self.last_seq = max(self.last_seq, change.seq)
                    if floor is None or change.seq > floor:
                        changes.append(change)
        return checkpoints, changes

    def append(self, items):
        """
        Log ``(collection, uid, data, deleted)`` items durably; the list of
        their L{Change}s.
        """
        changes = []
        with self._lock:
            if self._file is None or self._file_size >= self.segment_bytes:
                self._rotate()
            parts = []
            seq = self.last_seq
            for collection, uid, data, deleted in items:
                seq += 1
                change = Change.from_record(seq, data)
                changes.append(change)
                # Joined once: formatting a line per record first copied
                # each record's bytes twice.
                parts += (b"%d " % change.seq, data, b"\n")
            chunk = b"".join(parts)
            try:
                self._file.write(chunk)
                self._file.flush()
                sync_data(self._file.fileno())
            except BaseException:
                # Take the seqs back: the replication hands changes to the
                # peers in seq order, and would wait for these forever.
                try:
                    self._file.seek(self._file_size)
                    self._file.truncate()
                except Exception:
                    self._file = None  # the next append starts a new segment
                raise
            self.last_seq = seq
            self._file_size += len(chunk)
        return changes

    def _rotate(self):
        if self._file is not None:
            self._file.close()
        first = self.last_seq + 1
        # A segment by that name holds no whole change (else last_seq would
        # be past it), only a torn first write: start it afresh, so that the
        # next line is not glued onto the torn bytes and lost on reopen.
        self._file = open(self._segment_path(first), "wb")
        self._file_size = 0
        if first not in self._segments:
            self._segments.append(first)
        fsync_dir(self.directory)

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- checkpoints ----------------------------------------------------

    def _checkpoint_path(self):
        return os.path.join(self.directory, "checkpoints.json")

    def read_checkpoints(self):
        try:
            with open(self._checkpoint_path(), "rb") as f:
                return {k: int(v) for k, v in json.loads(f.read()).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError):
            # Cut short by a crash: start over from the log (replicas are idempotent).
            self.log.warn("unreadable checkpoints.json: resending the whole change log")
            return {}

    def save_checkpoints(self, checkpoints):
        """
        Write ``{peer: seq}`` atomically, then drop the segments no peer needs.

        The file is written aside and renamed over the old one, so it is
        never seen half-written, but it is not synced: after a crash of the
        machine it may be an older version, or empty (read as no
        checkpoints at all).  Either way the node only resends changes
        its peers already hold, which replicas make harmless; segments
        deleted below a checkpoint that was lost held only changes every
        peer had acknowledged.  The one thing an older file must not do is
        miss a peer: at start a peer absent from a non-empty file counts as
        new and is sent only the writes made from then on.  So a save that
        names a peer not yet durably in the file is synced, with the
        directory (once per added peer, not per batch).

        Checkpoints only move forward: a save that finishes after a newer
        one (a thread-pool save overtaken by the final save at stop) keeps
        the newer checkpoints.
        """
        path = self._checkpoint_path()
        with self._checkpoint_lock:
            checkpoints = {
                peer: max(seq, self._saved.get(peer, seq)) for peer, seq in checkpoints.items()
            }
            sync = not self._durable_peers.issuperset(checkpoints)
            with open(path + ".tmp", "wb") as f:
                f.write(json.dumps(checkpoints, sort_keys=True).encode())
                if sync:
                    f.flush()
                    sync_data(f.fileno())
            os.replace(path + ".tmp", path)
            if sync:
                fsync_dir(self.directory)
                self._durable_peers = set(checkpoints)
            else:
                # A peer dropped from this (unsynced) version may be back in
                # a later one: that later one is then synced again.
                self._durable_peers &= set(checkpoints)
            self._saved = checkpoints
        self.compact(min(checkpoints.values()) if checkpoints else self.last_seq)

    def compact(self, floor):
        """Delete the segments whose every change has a seq <= floor."""
        with self._lock:
            current = self._segments[-1] if self._file is not None and self._segments else None
            keep = []
            for i, first in enumerate(self._segments):
                next_first = self._segments[i + 1] if i + 1 < len(self._segments) else None
                if first != current and next_first is not None and next_first - 1 <= floor:
                    os.unlink(self._segment_path(first))
                else:
                    keep.append(first)
            self._segments = keep
