"""
The ``files`` engine: one JSON file per record under
``DATA/records/COLLECTION/``, which an operator can read, kept on the same
contract as the ``sqlite`` engine by a SQLite catalog beside them.

The catalog (``DATA/catalog.sqlite3``, the L{SQLiteStorage} schema) holds
every record's bytes, its sequence number and the replication checkpoints,
and is what makes a batch durable: one transaction, one sync of its WAL.
Reads, listings and the change feed come from it.  The record files are
written from the storage thread right after each commit (a new uid's file
in place, an existing one through a temporary file renamed over it, so an
operator reading it sees the old or the new record), and made durable in
bulk at a checkpoint: one ``syncfs`` of the data directory's file system
once ``checkpoint_bytes`` have been written, and at close, after which the
catalog records the sequence number the files are durable up to.  At open,
the files of the changes after that number are written again, so after a
crash each file holds its record's last acknowledged version.

Why a catalog rather than a log of our own: the catalog is the write-ahead
log, the change feed, the checkpoints file and the index in one durable
step (no second log, no second sync), it starts in constant time at any
size (no file is read at open), and it is the same code as the ``sqlite``
engine, which the conformance suite tests once for both.  The price is each
record's bytes twice on disk.

File names are derived from uids so that no uid can leave the collection's
directory or collide with another uid: bytes outside ``[A-Za-z0-9_-]`` are
written as ``%XX`` (so ``.``, ``/`` and ``..`` can never appear), and a name
that would be longer than 200 characters becomes ``=`` and the SHA-256 of
the uid (``=`` never appears in the first form).  Temporary files start with
``.``, which no record's file name does.

A data directory of the earlier layout (record files made durable by
``records.wal``, and a change log under ``changes/``) is migrated into the
catalog at open: see L{minstore.storage.migrate}.
"""

import ctypes
import ctypes.util
import hashlib
import itertools
import os
import re
import sqlite3
import threading
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from zope.interface import implementer

from minstore._util import fsync_dir
from minstore.interfaces import IStorage
from minstore.storage.sqlite import SQLiteStorage, _rows, _run

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
    """The uid of a file name, or None when only the file's content has it (a hashed name)."""
    if name.startswith("="):
        return None
    return unquote_to_bytes(name).decode("utf-8")


def write_file(path, data):
    """
    Make ``data`` the whole content of ``path``, written in place (no sync:
    see the checkpoints).  Not with O_TRUNC: on ext4, a file truncated to
    nothing and written again is flushed at its close (``auto_da_alloc``),
    which made overwriting a file ten times dearer (272 against 23 µs); the
    file is cut to the data's length after the write instead.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _syncfs_function():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]

    def call(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno), path)
        finally:
            os.close(fd)

    return call


#: Sync the one file system holding a path (Linux's syncfs), or None.
syncfs = _syncfs_function()


@implementer(IStorage)
class FileStorage(SQLiteStorage):
    name = "files"
    filename = "catalog.sqlite3"

    #: Bytes of record files written after which they are synced in bulk.
    checkpoint_bytes = 16 * 1024 * 1024

    def __init__(self, data_dir, path=None):
        SQLiteStorage.__init__(self, data_dir, path)
        self.root = os.path.join(self.data_dir, "records")
        self._tmp_counter = itertools.count()
        self._dirs = set()
        self._unsynced = []  # paths written since the last checkpoint (without syncfs)
        self._unsynced_bytes = 0
        self._checkpointing = threading.Lock()
        self._background = None  # the thread of the checkpoint under way, if any
        self._files_broken = False  # a file write failed: rewrite from the catalog at the next open

    # -- open and close -------------------------------------------------------

    def open(self):
        from minstore.storage import migrate

        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            fsync_dir(self.data_dir)
        SQLiteStorage.open(self)
        if not _rows(self._writer, "SELECT 1 FROM meta WHERE key = 'layout'"):
            # Set in the migration's own transaction: a migration cut short runs again.
            if migrate.has_old_layout(self.data_dir):
                migrate.migrate_files_layout(self)
            else:
                _run(self._writer, "INSERT INTO meta VALUES ('layout', 'catalog')")
        self._rewrite_files_after(self._files_seq())

    def _files_seq(self):
        rows = _rows(self._writer, "SELECT value FROM meta WHERE key = 'files_seq'")
        return rows[0][0] if rows else 0

    def _rewrite_files_after(self, seq):
        """Write the files of every change after ``seq`` again (after a crash: they may be older)."""
        written = 0
        try:
            while True:
                changes, scanned = self.changes(seq, 1000)
                for change in changes:
                    self._write_record_file(change.collection, change.uid, change.data, True)
                    written += 1
                if not changes:
                    break
                seq = scanned
        except OSError as e:
            # The catalog holds every record, and the node serves from it: a
            # full disk must not keep it from starting.  Tried again next start.
            log.error("could not write the record files again ({error}); the catalog has them, the files are written at the next start", error=e)
            self._files_broken = True
            return
        if written:
            log.info("wrote {n} record files again from the catalog (changes after the last checkpoint)", n=written)
        self.checkpoint()

    def close(self):
        background = self._background
        if background is not None:
            background.join()
        if self._writer is not None:
            self.checkpoint()
        SQLiteStorage.close(self)

    # -- record files -----------------------------------------------------------

    def path_of(self, collection, uid):
        """The record file of a uid (which may not exist)."""
        return os.path.join(self.root, collection, uid_to_filename(uid))

    def _directory(self, collection):
        directory = os.path.join(self.root, collection)
        if collection not in self._dirs:
            os.makedirs(directory, exist_ok=True)
            self._dirs.add(collection)
        return directory

    def _write_record_file(self, collection, uid, data, exists):
        directory = self._directory(collection)
        path = os.path.join(directory, uid_to_filename(uid))
        if exists:
            tmp = os.path.join(directory, "%s%d" % (_TMP_PREFIX, next(self._tmp_counter)))
            write_file(tmp, data)
            os.replace(tmp, path)
        else:
            write_file(path, data)
        self._unsynced_bytes += len(data)
        if syncfs is None:
            self._unsynced.append(path)

    def _after_commit(self, batch, results, existed):
        # Durable in the catalog already: a file that cannot be written now
        # (a full disk) is written again at the next open.
        try:
            for (collection, uid, data, _, _, _, _), seq, held in zip(batch, results, existed):
                if seq is not None:
                    self._write_record_file(collection, uid, data, held)
        except OSError as e:
            log.error("could not write a record file ({error}); the catalog has it, the file is written at the next start", error=e)
            self._files_broken = True

    def _after_purge(self, removed):
        # Gone from the catalog already: a file left by a crash here is a
        # tombstone's, which nothing reads (the catalog is what is served).
        for collection, uid, _ in removed:
            try:
                os.remove(self.path_of(collection, uid))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn("could not remove the purged tombstone's file of {collection}/{uid}: {error}", collection=collection, uid=uid, error=e)

    def write(self, batch, checkpoints=None):
        results = SQLiteStorage.write(self, batch, checkpoints)
        if self._unsynced_bytes >= self.checkpoint_bytes:
            self._checkpoint_in_background()
        return results

    def _checkpoint_in_background(self):
        """
        Sync the record files in a thread of their own, not in the write
        that crossed ``checkpoint_bytes``: the batch is durable already (the
        catalog), and a syncfs of 16 MB of record files takes 0.5-1 s, which
        that batch's writers used to wait (POST p99 near 1 s).
        """
        with self._lock:
            background = self._background
            if background is not None and background.is_alive():
                return
            self._background = threading.Thread(target=self.checkpoint, name="minstore-files-checkpoint", daemon=True)
            self._background.start()

    def checkpoint(self):
        """Make every record file written so far durable, and say so in the catalog."""
        if not self._checkpointing.acquire(blocking=False):
            return  # another thread is at it
        try:
            with self._lock:
                seq = self._last_seq  # every file up to here is written
                paths, self._unsynced = self._unsynced, []
                self._unsynced_bytes = 0
                if self._files_broken:
                    return  # leave files_seq where it is: the next open writes them again
            if syncfs is not None:
                syncfs(self.root)
            else:
                for path in paths:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except FileNotFoundError:
                        continue
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for directory in set(os.path.dirname(p) for p in paths):
                    fsync_dir(directory)
            with self._lock:
                if self._writer is None:
                    return
                try:
                    _run(self._writer, "INSERT OR REPLACE INTO meta VALUES ('files_seq', ?)", (seq,))
                except sqlite3.Error as e:
                    log.warn("could not note the record files' checkpoint: {error}", error=e)
        finally:
            self._checkpointing.release()
