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

Secondary indexes (L{minstore.storage.indexes}): a table ``idx`` keyed by
``(collection, field, key, uid)``, ``key`` the sortable bytes of the field's
value, so a filtered listing is one range of its primary key joined to the
records; ``idx_state`` says which declarations exist and how far the build
of each is.  A write keeps the entries of every declared index in the
batch's transaction (the old entry out, the new one in); a build indexes
the records held from before a declaration in steps, each a transaction of
its own under the write lock, and records how far it went in that same
transaction.

Counts (live records per collection, also kept in a table updated in each
batch's transaction), the highest sequence number and the highest version
held are kept in memory, read once at open and updated after each commit,
so the node can ask them on the reactor thread, and opening takes the same
time at any size.

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
from minstore.storage.indexes import Declaration, fields_by_collection, find_queries, record_keys

log = Logger("minstore.storage.sqlite")

#: 2: the index tables (a database of version 1 is upgraded at open; a
#: minstore that knows only 1 refuses a 2, whose indexes it would not keep).
SCHEMA_VERSION = 2

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
-- The tombstones, for their purge (minstore.cluster.purge): a partial index
-- that writes of live records never touch.
CREATE INDEX IF NOT EXISTS tombstones ON records (seq) WHERE deleted = 1;
-- A collection's changes in sequence order (/_changes?collection=, an index
-- build on one collection): without it SQLite reads them through the
-- (collection, uid) index and sorts the whole collection, 0.1 s a request at
-- 200,000 records and a build quadratic in the collection's size.
CREATE INDEX IF NOT EXISTS records_collection_seq ON records (collection, seq);
CREATE TABLE IF NOT EXISTS checkpoints (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS live_counts (collection TEXT PRIMARY KEY, live INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx (
    collection TEXT NOT NULL,
    field TEXT NOT NULL,
    key BLOB NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (collection, field, key, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idx_state (
    spec TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    field TEXT NOT NULL,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL,
    until_seq INTEGER NOT NULL
);
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


#: Most uids in one ``IN (...)`` of L{SQLiteStorage.get_many} (SQLite before
#: 3.32 allows 999 parameters a statement).
_IN_LIMIT = 500


def uids_by_collection(keys):
    """``{collection: [uid, ...]}`` of ``(collection, uid)`` keys, each uid once."""
    uids = {}
    for collection, uid in keys:
        uids.setdefault(collection, {})[uid] = None
    return {collection: list(held) for collection, held in uids.items()}


def _rows(db, sql, args=()):
    """
    Every row of one statement on ``db``: a connection (a cursor of its own,
    read to its end and closed, as PyPy needs) or the writer's one cursor,
    reused by each statement of a transaction (a new cursor per statement
    was 8 % of a PyPy writer thread: its object, its weak reference, the
    sweep of the connection's list of them).
    """
    if type(db) is sqlite3.Cursor:
        return db.execute(sql, args).fetchall()
    cursor = db.execute(sql, args)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


def _run(db, sql, args=()):
    """One statement without rows on ``db`` (see L{_rows})."""
    if type(db) is sqlite3.Cursor:
        db.execute(sql, args)
    else:
        db.execute(sql, args).close()


def _run_many(db, sql, rows):
    """One statement for each of ``rows`` on ``db`` (see L{_rows})."""
    if type(db) is sqlite3.Cursor:
        db.executemany(sql, rows)
    else:
        db.executemany(sql, rows).close()


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
        self._cursor = None  # the writer's one cursor (see _rows)
        self._last_seq = 0
        self._max_version = None
        self._purged = None  # the highest version of a tombstone purged (meta 'purged_version')
        self._live = {}  # collection -> live records
        self._states = {}  # "COLLECTION:FIELD" -> [collection, field, state, seq, until_seq]
        self._fields = fields_by_collection([])  # collection -> the fields indexed there

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
            self._cursor = conn.cursor()
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
        elif rows[0][0] == 1:
            _run(conn, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        elif rows[0][0] != SCHEMA_VERSION:
            raise StorageFailed(
                "%s: schema version %r, this minstore knows %d" % (self.path, rows[0][0], SCHEMA_VERSION)
            )

    def _load_counts(self, conn):
        self._last_seq = _rows(conn, "SELECT COALESCE(MAX(seq), 0) FROM records")[0][0]
        rows = _rows(conn, "SELECT value FROM meta WHERE key = 'max_version'")
        self._max_version = rows[0][0] if rows else None
        rows = _rows(conn, "SELECT value FROM meta WHERE key = 'purged_version'")
        self._purged = rows[0][0] if rows else None
        # Kept in the batch's own transaction: counting the rows at open took
        # seconds at a million records.
        self._live = dict(_rows(conn, "SELECT collection, live FROM live_counts"))
        if not self._live and _rows(conn, "SELECT 1 FROM records LIMIT 1"):
            # A database from before the counts table: count once.
            _run(conn, "INSERT OR REPLACE INTO live_counts SELECT collection, COUNT(*) FROM records NOT INDEXED WHERE deleted = 0 GROUP BY collection")
            self._live = dict(_rows(conn, "SELECT collection, live FROM live_counts"))
        # The indexes declared last are kept by every write from now, even
        # before set_indexes: entries never drift from their records.
        self._load_states(conn)

    def _load_states(self, conn):
        rows = _rows(conn, "SELECT spec, collection, field, state, seq, until_seq FROM idx_state ORDER BY rowid")
        self._states = dict((row[0], list(row[1:])) for row in rows)
        self._fields = fields_by_collection([Declaration(c, f) for c, f, _, _, _ in self._states.values()])

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
                if self._cursor is not None:
                    self._cursor.close()
                    self._cursor = None
                self._writer.close()
                self._writer = None

    # -- reads ------------------------------------------------------------

    def get(self, collection, uid):
        rows = _rows(
            self._reader(), "SELECT data FROM records WHERE collection = ? AND uid = ?", (collection, uid)
        )
        return bytes(rows[0][0]) if rows else None

    def get_many(self, keys):
        # One statement per collection (and per _IN_LIMIT uids), not one per
        # key: each statement is a release and a retake of the GIL, which
        # the reactor holds most of the time under load.
        conn = self._reader()
        found = {}
        for collection, uids in uids_by_collection(keys).items():
            for start in range(0, len(uids), _IN_LIMIT):
                part = uids[start:start + _IN_LIMIT]
                sql = "SELECT uid, data FROM records WHERE collection = ? AND uid IN (%s)" % ",".join("?" * len(part))
                for uid, data in _rows(conn, sql, [collection] + part):
                    found[collection, uid] = bytes(data)
        return [found.get(key) for key in keys]

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

    def scan_versions(self, after, upto, limit):
        sql = "SELECT collection, uid, version FROM records"
        where, args = [], []
        if after is not None:
            where.append("(collection, uid) > (?, ?)")
            args.extend(after)
        if upto is not None:
            where.append("(collection, uid) <= (?, ?)")
            args.extend(upto)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY collection, uid LIMIT ?"
        args.append(limit)
        return _rows(self._reader(), sql, args)

    def checkpoints(self):
        return dict(_rows(self._reader(), "SELECT peer, seq FROM checkpoints"))

    # -- writes -----------------------------------------------------------

    def write(self, batch, checkpoints=None):
        with self._lock:
            return self._write_locked(batch, checkpoints)

    def _write_locked(self, batch, checkpoints):
        seq, max_version, results, existed, live = self._transaction(self._store_batch, batch, checkpoints)
        self._last_seq = seq
        self._max_version = max_version
        for collection, delta in live.items():
            self._live[collection] = self._live.get(collection, 0) + delta
        self._after_commit(batch, results, existed)
        return results

    def _store_batch(self, conn, batch, checkpoints):
        """The batch's rows, in the caller's transaction; what the memory state becomes once it commits."""
        seq = self._last_seq
        max_version = self._max_version
        results = []
        existed = []  # per item: whether the uid was held before (record or tombstone)
        live = {}  # collection -> change in live count
        held_rows = self._held(conn, batch)  # (collection, uid) -> (deleted, version, data or None)
        stored = []
        for collection, uid, data, deleted, version, forward, condition in batch:
            fields = self._fields(collection)
            held = held_rows.get((collection, uid))
            was_live = held is not None and not held[0]
            existed.append(held is not None)
            if condition == ABSENT and was_live:
                results.append(None)
                continue
            if condition == NEWER and (
                held[1] >= version if held is not None else self._purged is not None and version <= self._purged
            ):
                results.append(None)
                continue
            seq += 1
            stored.append((seq, collection, uid, version, int(bool(deleted)), int(bool(forward)), data))
            held_rows[collection, uid] = (deleted, version, data)  # what a later item of the batch finds
            if fields:
                self._reindex(conn, collection, uid, fields, held[2] if was_live else None, None if deleted else data)
            delta = (not deleted) - was_live
            if delta:
                live[collection] = live.get(collection, 0) + delta
            if max_version is None or version > max_version:
                max_version = version
            results.append(seq)
        if stored:
            _run_many(
                conn,
                "INSERT OR REPLACE INTO records (seq, collection, uid, version, deleted, forward, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                stored,
            )
        for collection, delta in live.items():
            _run(
                conn,
                "INSERT INTO live_counts VALUES (?, ?) ON CONFLICT (collection) DO UPDATE SET live = live + ?",
                (collection, delta, delta),
            )
        if max_version != self._max_version:
            _run(conn, "INSERT OR REPLACE INTO meta VALUES ('max_version', ?)", (max_version,))
        if checkpoints is not None:
            self._replace_checkpoints(conn, checkpoints)
        return seq, max_version, results, existed, live

    #: uids looked up by one statement (SQLite allows 32,766 variables, or 999 before 3.32).
    HELD_CHUNK = 500

    def _held(self, conn, batch):
        """
        What the store holds of each uid of a batch, ``{(collection, uid):
        (deleted, version, data)}`` (data only for a collection with indexes,
        else None): one statement per collection (and 500 uids), not one per
        item.
        """
        uids = {}
        for item in batch:
            uids.setdefault(item[0], set()).add(item[1])
        held = {}
        for collection, wanted in uids.items():
            wanted = list(wanted)
            columns = "uid, deleted, version, data" if self._fields(collection) else "uid, deleted, version, NULL"
            for start in range(0, len(wanted), self.HELD_CHUNK):
                chunk = wanted[start : start + self.HELD_CHUNK]
                rows = _rows(
                    conn,
                    "SELECT %s FROM records WHERE collection = ? AND uid IN (%s)" % (columns, ",".join("?" * len(chunk))),
                    [collection] + chunk,
                )
                for uid, deleted, version, data in rows:
                    held[collection, uid] = (deleted, version, data)
        return held

    @staticmethod
    def _reindex(conn, collection, uid, fields, old, new):
        """Move a uid's index entries from its old record's keys to its new one's (None: no record)."""
        old_keys = record_keys(old, fields) if old is not None else {}
        new_keys = record_keys(new, fields) if new is not None else {}
        for field in fields:
            before, after = old_keys.get(field), new_keys.get(field)
            if before is not None and before != after:
                _run(
                    conn,
                    "DELETE FROM idx WHERE collection = ? AND field = ? AND key = ? AND uid = ?",
                    (collection, field, before, uid),
                )
            if after is not None:
                # Even when the key is unchanged: while an index is building,
                # the old record may not have its entry yet, and once moved
                # past the build's mark the build would not give it one.
                _run(conn, "INSERT OR IGNORE INTO idx VALUES (?, ?, ?, ?)", (collection, field, after, uid))

    def _after_commit(self, batch, results, existed):
        """A subclass's work once the batch is durable, still under the write lock."""

    # -- tombstone purge ------------------------------------------------------

    def purge_tombstones(self, before_version, upto_seq, upto_forwarded_seq, limit):
        with self._lock:
            removed, purged = self._transaction(self._purge, before_version, upto_seq, upto_forwarded_seq, limit)
            self._purged = purged
            if removed:
                self._after_purge(removed)
            return removed

    def _purge(self, conn, before_version, upto_seq, upto_forwarded_seq, limit):
        rows = _rows(
            conn,
            "SELECT seq, collection, uid, version FROM records INDEXED BY tombstones"
            " WHERE deleted = 1 AND version < ? AND (seq <= ? OR (forward = 1 AND seq <= ?))"
            " ORDER BY seq LIMIT ?",
            (before_version, upto_seq, upto_forwarded_seq, limit),
        )
        purged = self._purged
        for seq, _, _, version in rows:
            _run(conn, "DELETE FROM records WHERE seq = ?", (seq,))
            if purged is None or version > purged:
                purged = version
        if purged != self._purged:
            _run(conn, "INSERT OR REPLACE INTO meta VALUES ('purged_version', ?)", (purged,))
        return [(c, u, v) for _, c, u, v in rows], purged

    def _after_purge(self, removed):
        """A subclass's work once purged tombstones are gone from the catalog, under the write lock."""

    def purged_version(self):
        return self._purged

    @staticmethod
    def _replace_checkpoints(conn, checkpoints):
        _run(conn, "DELETE FROM checkpoints")
        for peer, seq in checkpoints.items():
            _run(conn, "INSERT INTO checkpoints VALUES (?, ?)", (peer, seq))

    def save_checkpoints(self, checkpoints):
        with self._lock:
            self._transaction(self._replace_checkpoints, checkpoints)

    # -- secondary indexes ---------------------------------------------------

    def _transaction(self, f, *args):
        """``f(cursor, *args)`` in one write transaction, under the write lock held by the caller."""
        conn = self._cursor
        try:
            _run(conn, "BEGIN IMMEDIATE")
            result = f(conn, *args)
            _run(conn, "COMMIT")
            return result
        except BaseException as e:
            try:
                _run(conn, "ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, (sqlite3.Error, OSError)):
                raise StorageFailed("%s: %s" % (self.path, e))
            raise

    def set_indexes(self, declarations):
        declarations = [Declaration(*d) for d in declarations]
        with self._lock:
            try:
                self._transaction(self._set_indexes, declarations)
            finally:
                self._load_states(self._writer)

    def _set_indexes(self, conn, declarations):
        wanted = dict((str(d), d) for d in declarations)
        held = dict(
            (spec, (collection, field, state))
            for spec, collection, field, state in _rows(conn, "SELECT spec, collection, field, state FROM idx_state")
        )
        for spec, (collection, field, _) in held.items():
            if spec in wanted:
                continue
            _run(conn, "DELETE FROM idx_state WHERE spec = ?", (spec,))
            if Declaration("*", field) in declarations:
                continue  # its entries are the other declaration's too
            if collection == "*":
                kept = [d.collection for d in declarations if d.field == field]
                _run(
                    conn,
                    "DELETE FROM idx WHERE field = ? AND collection NOT IN (%s)" % ",".join("?" * len(kept)),
                    [field] + kept,
                )
            elif Declaration(collection, field) not in declarations:
                _run(conn, "DELETE FROM idx WHERE collection = ? AND field = ?", (collection, field))
            log.info("index {spec} dropped (no longer declared)", spec=spec)
        for spec, d in wanted.items():
            if spec in held:
                continue
            everywhere = held.get(str(Declaration("*", d.field)))
            if self._last_seq == 0 or (everywhere is not None and everywhere[2] == "ready"):
                state = "ready"
            else:
                state = "building"
                log.info("index {spec} declared over {n} sequence numbers: building it", spec=spec, n=self._last_seq)
            _run(
                conn,
                "INSERT INTO idx_state (spec, collection, field, state, seq, until_seq) VALUES (?, ?, ?, ?, 0, ?)",
                (spec, d.collection, d.field, state, self._last_seq),
            )

    def build_indexes(self, limit):
        with self._lock:
            building = [(spec, s) for spec, s in self._states.items() if s[2] == "building"]
            if not building:
                return False
            spec, (collection, field, _, seq, until_seq) = building[0]
            top = min(until_seq, seq + limit)
            state = "ready" if top >= until_seq else "building"
            self._transaction(self._build_step, spec, collection, field, seq, top, state)
            self._states[spec][2:4] = [state, top]
            if state == "ready":
                log.info("index {spec} built", spec=spec)
            return state == "building" or len(building) > 1

    @staticmethod
    def _build_step(conn, spec, collection, field, seq, top, state):
        sql = "SELECT collection, uid, data FROM records WHERE seq > ? AND seq <= ? AND deleted = 0"
        args = [seq, top]
        if collection != "*":
            sql += " AND collection = ?"
            args.append(collection)
        entries = []
        for c, uid, data in _rows(conn, sql, args):
            key = record_keys(data, (field,)).get(field)
            if key is not None:
                entries.append((c, field, key, uid))
        _run_many(conn, "INSERT OR IGNORE INTO idx VALUES (?, ?, ?, ?)", entries)
        _run(conn, "UPDATE idx_state SET seq = ?, state = ? WHERE spec = ?", (top, state, spec))

    def index_states(self):
        return dict(
            (spec, {"state": state, "seq": seq, "until_seq": until_seq})
            for spec, (_, _, state, seq, until_seq) in list(self._states.items())
        )

    def find(self, collection, field, start, stop, after, limit):
        base = (
            "SELECT i.key, r.data FROM idx i JOIN records r ON r.collection = i.collection AND r.uid = i.uid"
            " WHERE i.collection = ? AND i.field = ?"
        )
        queries = find_queries(base, collection, field, start, stop, after)
        conn = self._reader()
        found = []
        _run(conn, "BEGIN")  # one snapshot for both
        try:
            for sql, args in queries:
                if len(found) < limit:
                    rows = _rows(conn, sql + " ORDER BY i.key, i.uid LIMIT ?", args + [limit - len(found)])
                    found.extend((bytes(k), bytes(d)) for k, d in rows)
        finally:
            _run(conn, "COMMIT")
        return found

    # -- memory -----------------------------------------------------------

    def last_seq(self):
        return self._last_seq

    def max_version(self):
        return self._max_version

    def count(self):
        return sum(self._live.values())

    def collections(self):
        return sorted(c for c, n in self._live.items() if n > 0)
