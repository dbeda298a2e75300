"""
The ``files`` engine: one file per record under ``DATA/records/COLLECTION/``.

Every write goes to a temporary file that is synced, renamed over the record's
file, and followed by a sync of the directory, so a crash leaves either the
old or the new record and an acknowledged write survives ``kill -9`` and a
power cut.  A batch shares the directory syncs.

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
import threading
from urllib.parse import unquote_to_bytes

from zope.interface import implementer

from minstore.interfaces import IStorage
from minstore.storage._index import KeyIndex

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_NAME = 200
_TMP_PREFIX = ".tmp-"
_sync = getattr(os, "fdatasync", os.fsync)


def uid_to_filename(uid):
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


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IStorage)
class FileStorage:
    name = "files"

    def __init__(self, data_dir):
        self.root = os.path.join(os.path.abspath(data_dir), "records")
        self._index = KeyIndex()
        self._tmp_counter = itertools.count()
        self._dirs_lock = threading.Lock()
        self._dirs = set()

    def open(self):
        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            _fsync_dir(os.path.dirname(self.root))
        for collection in os.listdir(self.root):
            directory = os.path.join(self.root, collection)
            if not os.path.isdir(directory):
                continue
            self._dirs.add(collection)
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name.startswith(_TMP_PREFIX):
                    # A write that never reached its rename: never acknowledged.
                    os.unlink(path)
                    continue
                with open(path, "rb") as f:
                    record = json.loads(f.read())
                self._index.set(collection, record["uid"], not record.get("deleted"))

    def close(self):
        pass

    def _path(self, collection, uid):
        return os.path.join(self.root, collection, uid_to_filename(uid))

    def _directory(self, collection):
        directory = os.path.join(self.root, collection)
        if collection not in self._dirs:
            with self._dirs_lock:
                if collection not in self._dirs:
                    os.makedirs(directory, exist_ok=True)
                    _fsync_dir(self.root)
                    self._dirs.add(collection)
        return directory

    def get(self, collection, uid):
        try:
            with open(self._path(collection, uid), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, batch):
        renames = []
        directories = set()
        for collection, uid, data, deleted in batch:
            directory = self._directory(collection)
            tmp = os.path.join(directory, "%s%d" % (_TMP_PREFIX, next(self._tmp_counter)))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                _sync(fd)
            finally:
                os.close(fd)
            renames.append((tmp, os.path.join(directory, uid_to_filename(uid))))
            directories.add(directory)
        for tmp, final in renames:
            os.replace(tmp, final)
        for directory in directories:
            _fsync_dir(directory)
        for collection, uid, data, deleted in batch:
            self._index.set(collection, uid, not deleted)

    def list(self, collection, after, prefix, limit):
        out = []
        for uid in self._index.page(collection, after, prefix, limit):
            data = self.get(collection, uid)
            # Deleted since the index was read: skip it.
            if data is not None and not json.loads(data).get("deleted"):
                out.append(data)
        return out

    def count(self):
        return self._index.count()

    def collections(self):
        return self._index.collections()
