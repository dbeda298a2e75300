"""
The ``files`` engine: one file per record under ``DATA/records/COLLECTION/``,
made durable through a write-ahead log.

A batch of writes is appended to ``DATA/records.wal`` and synced once (group
commit: one fdatasync for every write that arrived together).  The batch is
durable from there, and the write returns: a child process
(L{minstore.storage.filewriter}) writes the record files, and until it has,
reads of those uids are answered from memory.  The record files themselves
are synced in bulk at a checkpoint (when the log passes
``checkpoint_bytes``, and at close), once the child has written every file,
after which the log is emptied.  After a crash, ``open`` replays the log:
every acknowledged write survives ``kill -9`` and a power cut, and each
record is wholly old or wholly new.

Without the child (it could not start, or died), the engine writes the files
itself: each record to a temporary file renamed over the record's file, so a
reader sees either the old or the new record, never a mix; the first file of
a uid in place (a rename costs as much as the write), since nobody reads it
before the write returns: reads go by the in-memory index.

Syncing each record file, its rename and its directory costs three syncs per
write (about 3 ms each on the disks we measured); the log makes it one sync
per batch.

File names are derived from uids so that no uid can leave the collection's
directory or collide with another uid: bytes outside ``[A-Za-z0-9_-]`` are
written as ``%XX`` (so ``.``, ``/`` and ``..`` can never appear), and a name
that would be longer than 200 characters becomes ``=`` and the SHA-256 of
the uid (``=`` never appears in the first form).  Temporary files start with
``.``, which no record's file name does.
"""

import hashlib
import itertools
import json
import os
import re
import threading
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from zope.interface import implementer

from minstore._util import fsync_dir, sync_data
from minstore.interfaces import IStorage
from minstore.storage._index import KeyIndex
from minstore.storage.filewriter import FileWriter, write_file as _write_file

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_NAME = 200
_TMP_PREFIX = ".tmp-"
log = Logger("minstore.storage.files")


_ALREADY_SAFE = re.compile(r"[A-Za-z0-9_-]{1,%d}" % _MAX_NAME, re.ASCII)


def uid_to_filename(uid):
    if _ALREADY_SAFE.fullmatch(uid):
        return uid  # what the general case gives, without a loop per character
    raw = uid.encode("utf-8")
    name = "".join(chr(b) if b in _SAFE else "%%%02X" % b for b in raw)
    if len(name) > _MAX_NAME:
        name = "=" + hashlib.sha256(raw).hexdigest()
    return name


def filename_to_uid(name):
    """The uid of a file name, or None when only the file's content has it."""
    if name.startswith("="):
        return None
    return unquote_to_bytes(name).decode("utf-8")


def _is_json(data):
    """Whether a log line's record is whole (a torn one may still end with a nested ``}``)."""
    try:
        json.loads(data)
    except ValueError:
        return False
    return True



@implementer(IStorage)
class FileStorage:
    name = "files"

    #: Bytes of log after which the record files are synced and the log emptied.
    checkpoint_bytes = 16 * 1024 * 1024

    def __init__(self, data_dir, writer_process=True):
        data_dir = os.path.abspath(data_dir)
        #: Whether a child process writes the record files (see the module's doc).
        self.writer_process = writer_process
        self.root = os.path.join(data_dir, "records")
        self.wal_path = os.path.join(data_dir, "records.wal")
        self._index = KeyIndex()
        self._tmp_counter = itertools.count()
        self._lock = threading.Lock()
        self._dirs = set()
        self._wal = None
        self._wal_bytes = 0
        self._writer = FileWriter(self.root, self._write_here)

    def open(self):
        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            fsync_dir(os.path.dirname(self.root))
        self._replay()
        for collection in os.listdir(self.root):
            directory = os.path.join(self.root, collection)
            if not os.path.isdir(directory):
                continue
            self._dirs.add(collection)
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name.startswith("."):
                    if name.startswith(_TMP_PREFIX):
                        # A write that never reached its rename (the log has it).
                        os.unlink(path)
                    continue  # no record's file name starts with "."
                with open(path, "rb") as f:
                    content = f.read()
                try:
                    record = json.loads(content)
                    uid, deleted = record["uid"], bool(record.get("deleted"))
                except (ValueError, KeyError, TypeError):
                    # Damaged outside minstore (every write of ours is atomic):
                    # keep the node up, set the file aside, say so.
                    os.replace(path, os.path.join(directory, ".damaged-" + name))
                    log.error("set aside damaged record file {path}", path=path)
                    continue
                self._index.set(collection, uid, not deleted)
        self._wal = open(self.wal_path, "ab")
        if self.writer_process:
            self._writer.start()

    def _replay(self):
        """Apply what the log holds: writes acknowledged since the last checkpoint."""
        try:
            with open(self.wal_path, "rb") as f:
                log = f.read()
        except FileNotFoundError:
            return
        for line in log.split(b"\n"):
            parts = line.split(b"\t", 3)
            if len(parts) != 4 or not parts[3].endswith(b"}") or not _is_json(parts[3]):
                continue  # the torn tail of a batch never synced, never acknowledged
            deleted, collection, filename, data = parts
            self._apply(collection.decode("utf-8"), filename.decode("utf-8"), data)
        self._checkpoint_files()
        with open(self.wal_path, "wb") as f:
            f.flush()
            os.fsync(f.fileno())

    def close(self):
        with self._lock:
            if self._wal is not None:
                self._writer.close()
                self._checkpoint()
                self._wal.close()
                self._wal = None

    def _path(self, collection, uid):
        return os.path.join(self.root, collection, uid_to_filename(uid))

    def _directory(self, collection):
        directory = os.path.join(self.root, collection)
        if collection not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(collection)
        return directory

    def get(self, collection, uid):
        if not self._index.holds(collection, uid):
            # Never written, or its first write is not finished (see _create):
            # the index, built from every file at open, is the authority.
            return None
        pending = self._writer.get(collection, uid)
        if pending is not None:
            return pending  # its file is not written yet
        try:
            with open(self._path(collection, uid), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _apply(self, collection, filename, data):
        """Write one record file: a temporary file renamed over it."""
        directory = self._directory(collection)
        tmp = os.path.join(directory, "%s%d" % (_TMP_PREFIX, next(self._tmp_counter)))
        _write_file(tmp, data)
        os.replace(tmp, os.path.join(directory, filename))

    def _create(self, collection, filename, data):
        """
        Write the first file of a uid in place: no temporary file, no rename.
        Nobody reads it half-written: get() and list() skip a uid the index
        does not hold yet, and after a crash the log's replay rewrites it.
        """
        _write_file(os.path.join(self._directory(collection), filename), data)

    def write(self, batch):
        chunk = b"".join(
            b"%d\t%s\t%s\t%s\n"
            % (int(deleted), collection.encode("utf-8"), uid_to_filename(uid).encode("ascii"), data)
            for collection, uid, data, deleted in batch
        )
        with self._lock:
            self._wal.write(chunk)
            self._wal.flush()
            sync_data(self._wal.fileno())
            # Durable from here on: the files below can be rebuilt from the log.
            for collection, _, _, _ in batch:
                self._directory(collection)
            if not self._writer.send(chunk, batch):
                for collection, uid, data, deleted in batch:
                    if self._index.holds(collection, uid):
                        self._apply(collection, uid_to_filename(uid), data)
                    else:
                        self._create(collection, uid_to_filename(uid), data)
            self._wal_bytes += len(chunk)
            if self._wal_bytes >= self.checkpoint_bytes:
                self._checkpoint()
        for collection, uid, data, deleted in batch:
            self._index.set(collection, uid, not deleted)

    def _write_here(self, collection, uid, data):
        """Write a record file in this process (the child's work, when it is gone)."""
        self._apply(collection, uid_to_filename(uid), data)

    def flush(self):
        """Return once every record file written so far is on disk (not synced)."""
        with self._lock:
            self._writer.flush()

    def _checkpoint_files(self):
        # One sync of the file system makes every record file and rename
        # written so far durable, far cheaper than a sync per file.
        os.sync()

    def _checkpoint(self):
        """Sync the record files, then empty the log (called under the lock)."""
        self._writer.flush()
        self._checkpoint_files()
        self._wal.truncate(0)
        self._wal.seek(0)
        self._wal.flush()
        os.fsync(self._wal.fileno())
        self._wal_bytes = 0

    def list(self, collection, after, prefix, limit):
        out = []
        for uid in self._index.page(collection, after, prefix, limit):
            data = self.get(collection, uid)
            # Deleted since the index was read: skip it.
            if data is not None and not json.loads(data).get("deleted"):
                out.append(data)
        return out

    def is_live(self, collection, uid):
        return self._index.is_live(collection, uid)

    def holds(self, collection, uid):
        return self._index.holds(collection, uid)

    def count(self):
        return self._index.count()

    def collections(self):
        return self._index.collections()
