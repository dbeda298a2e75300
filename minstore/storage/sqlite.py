"""
The ``sqlite`` engine: records, the change feed and the replication
checkpoints in one SQLite database (Python's own ``sqlite3``), one
transaction per batch.

``DATA/minstore.sqlite3`` in WAL mode with ``synchronous=FULL``: a batch is
durable when its COMMIT returns (one sync of the WAL for every write that
arrived together), and a crash or a power cut leaves every item of it either
wholly old or wholly new.  A full disk or an I/O error rolls the batch back.

One table holds every record and tombstone, keyed by its sequence number
(the rowid, so the feed is read in order without an index of its own) and
unique on ``(collection, uid)``: writing a uid again gives its row the next
number, so the rows after a number are exactly the newest change of each
uid written since (CouchDB's by-sequence index).  Listings read the
``(collection, uid)`` index.

Counts (live records per collection), the highest sequence number and the
highest version held are kept in memory, read once at open and updated
after each commit, so the node can ask them on the reactor thread.

On PyPy every cursor is read to its end and closed before the next
statement: an unfinished SELECT makes COMMIT fail there with "SQL
statements in progress".
"""

import os
import sqlite3
import threading

from twisted.logger import Logger
from zope.interface import implementer

from minstore.errors import StorageFailed
from minstore.interfaces import ABSENT, NEWER, Change, IStorage

log = Logger("minstore.storage.sqlite")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    uid TEXT NOT NULL,
    version TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    forward INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (collection, uid)
);
CREATE TABLE IF NOT EXISTS checkpoints (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


def prefix_bound(prefix):
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last == 0xD800:
            last = 0xE000  # surrogates cannot be stored
        if last <= 0x10FFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


def _rows(conn, sql, args=()):
    cursor = conn.execute(sql, args)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _run(conn, sql, args=()):
    conn.execute(sql, args).close()


@implementer(IStorage)
class SQLiteStorage:
    name = "sqlite"
    filename = "minstore.sqlite3"

    def __init__(self, data_dir, path=None):
        self.data_dir = os.path.abspath(data_dir)
        self.path = path or os.path.join(self.data_dir, self.filename)
        self._lock = threading.Lock()  # the one writer connection
        self._local = threading.local()  # a read connection per thread
        self._readers = []
        self._readers_lock = threading.Lock()
        self._writer = None
        self._last_seq = 0
        self._max_version = None
        self._live = {}  # collection -> live records

    # -- connections ------------------------------------------------------

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        _rows(conn, "PRAGMA synchronous=FULL")
        return conn

    def _reader(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _damaged(self, e):
        return StorageFailed("%s: %s (move it aside or restore it from a backup)" % (self.path, e))

    # -- open and close -------------------------------------------------------

    def open(self):
        os.makedirs(self.data_dir, exist_ok=True)
        try:
            conn = self._writer = self._connect()
            mode = _rows(conn, "PRAGMA journal_mode=WAL")[0][0]
            if mode != "wal":
                raise StorageFailed("%s: cannot use WAL mode (%s)" % (self.path, mode))
            conn.executescript(_SCHEMA)
            self._check_schema(conn)
            self._load_counts(conn)
        except sqlite3.DatabaseError as e:
            self._close_all()
            raise self._damaged(e)

    def _check_schema(self, conn):
        rows = _rows(conn, "SELECT value FROM meta WHERE key = 'schema_version'")
        if not rows:
            _run(conn, "INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif rows[0][0] != SCHEMA_VERSION:
            raise StorageFailed(
                "%s: schema version %r, this minstore knows %d" % (self.path, rows[0][0], SCHEMA_VERSION)
            )

    def _load_counts(self, conn):
        self._last_seq = _rows(conn, "SELECT COALESCE(MAX(seq), 0) FROM records")[0][0]
        rows = _rows(conn, "SELECT value FROM meta WHERE key = 'max_version'")
        self._max_version = rows[0][0] if rows else None
        self._live = dict(
            # NOT INDEXED: one pass over the table in rowid order; through the
            # (collection, uid) index it looked each row up apart (1M: 12 s, not 2).
            _rows(conn, "SELECT collection, COUNT(*) FROM records NOT INDEXED WHERE deleted = 0 GROUP BY collection")
        )

    def close(self):
        self._close_all()

    def _close_all(self):
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._local = threading.local()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    # -- reads ------------------------------------------------------------

    def get(self, collection, uid):
        rows = _rows(
            self._reader(), "SELECT data FROM records WHERE collection = ? AND uid = ?", (collection, uid)
        )
        return bytes(rows[0][0]) if rows else None

    def list(self, collection, after, prefix, limit):
        sql = "SELECT data FROM records WHERE collection = ? AND deleted = 0"
        args = [collection]
        if after is not None:
            sql += " AND uid > ?"
            args.append(after)
        if prefix:
            sql += " AND uid >= ?"
            args.append(prefix)
            bound = prefix_bound(prefix)
            if bound is not None:
                sql += " AND uid < ?"
                args.append(bound)
        sql += " ORDER BY uid LIMIT ?"
        args.append(limit)
        return [bytes(row[0]) for row in _rows(self._reader(), sql, args)]

    def changes(self, after, limit, forwarded_only=False, collection=None):
        conn = self._reader()
        sql = "SELECT seq, collection, uid, version, deleted, forward, data FROM records WHERE seq > ?"
        args = [after]
        if forwarded_only:
            sql += " AND forward = 1"
        if collection is not None:
            sql += " AND collection = ?"
            args.append(collection)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        # One read transaction: the highest number and the rows of one snapshot.
        _run(conn, "BEGIN")
        try:
            top = _rows(conn, "SELECT COALESCE(MAX(seq), 0) FROM records")[0][0]
            rows = _rows(conn, sql, args)
        finally:
            _run(conn, "COMMIT")
        changes = [
            Change(seq, c, u, v, bool(d), bool(f), bytes(data)) for seq, c, u, v, d, f, data in rows
        ]
        scanned = changes[-1].seq if len(changes) >= limit else max(top, after)
        return changes, scanned

    def count_changes(self, after, forwarded_only=False):
        sql = "SELECT COUNT(*) FROM records WHERE seq > ?" + (" AND forward = 1" if forwarded_only else "")
        return _rows(self._reader(), sql, (after,))[0][0]

    def checkpoints(self):
        return dict(_rows(self._reader(), "SELECT peer, seq FROM checkpoints"))

    # -- writes -----------------------------------------------------------

    def write(self, batch, checkpoints=None):
        with self._lock:
            return self._write_locked(batch, checkpoints)

    def _write_locked(self, batch, checkpoints):
        conn = self._writer
        seq = self._last_seq
        max_version = self._max_version
        results = []
        existed = []  # per item: whether the uid was held before (record or tombstone)
        live = {}  # collection -> change in live count
        try:
            _run(conn, "BEGIN IMMEDIATE")
            for collection, uid, data, deleted, version, forward, condition in batch:
                held = _rows(
                    conn,
                    "SELECT deleted, version FROM records WHERE collection = ? AND uid = ?",
                    (collection, uid),
                )
                was_live = bool(held) and not held[0][0]
                existed.append(bool(held))
                if condition == ABSENT and was_live:
                    results.append(None)
                    continue
                if condition == NEWER and held and held[0][1] >= version:
                    results.append(None)
                    continue
                seq += 1
                _run(
                    conn,
                    "INSERT OR REPLACE INTO records (seq, collection, uid, version, deleted, forward, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, collection, uid, version, int(bool(deleted)), int(bool(forward)), data),
                )
                delta = (not deleted) - was_live
                if delta:
                    live[collection] = live.get(collection, 0) + delta
                if max_version is None or version > max_version:
                    max_version = version
                results.append(seq)
            if max_version != self._max_version:
                _run(conn, "INSERT OR REPLACE INTO meta VALUES ('max_version', ?)", (max_version,))
            if checkpoints is not None:
                self._replace_checkpoints(conn, checkpoints)
            _run(conn, "COMMIT")
        except BaseException as e:
            try:
                _run(conn, "ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, (sqlite3.Error, OSError)):
                raise StorageFailed("%s: %s" % (self.path, e))
            raise
        self._last_seq = seq
        self._max_version = max_version
        for collection, delta in live.items():
            self._live[collection] = self._live.get(collection, 0) + delta
        self._after_commit(batch, results, existed)
        return results

    def _after_commit(self, batch, results, existed):
        """A subclass's work once the batch is durable, still under the write lock."""

    @staticmethod
    def _replace_checkpoints(conn, checkpoints):
        _run(conn, "DELETE FROM checkpoints")
        for peer, seq in checkpoints.items():
            _run(conn, "INSERT INTO checkpoints VALUES (?, ?)", (peer, seq))

    def save_checkpoints(self, checkpoints):
        with self._lock:
            conn = self._writer
            try:
                _run(conn, "BEGIN IMMEDIATE")
                self._replace_checkpoints(conn, checkpoints)
                _run(conn, "COMMIT")
            except BaseException as e:
                try:
                    _run(conn, "ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.Error):
                    raise StorageFailed("%s: %s" % (self.path, e))
                raise

    # -- memory -----------------------------------------------------------

    def last_seq(self):
        return self._last_seq

    def max_version(self):
        return self._max_version

    def count(self):
        return sum(self._live.values())

    def collections(self):
        return sorted(c for c, n in self._live.items() if n > 0)
