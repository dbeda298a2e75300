"""
The ``postgresql`` engine: records, the change feed and the replication
checkpoints in a PostgreSQL database that several nodes may share
(``--storage postgresql --dsn postgresql://...``), one transaction per
batch.  Needs the ``postgresql`` extra: psycopg 3 on CPython, pg8000 (pure
Python) on PyPy, where psycopg's pure-Python mode does not work.

Tables (all named ``minstore_*``, so the database may hold others):

* ``minstore_records``: every record and tombstone, keyed by its sequence
  number and unique on ``(collection, uid)``, as in the ``sqlite`` engine:
  writing a uid again moves its row to the next number, so the rows after a
  number are the newest change of each uid written since.  ``uid`` is
  ``COLLATE "C"`` (code point order, as Python sorts); ``data`` is the
  record's JSON as text, so that expression indexes on it
  (``(data::jsonb #> '{value,year}')``) can serve secondary indexes.
* ``minstore_state``: one row, the database's sequence counter and the
  highest version held.  Each write transaction starts by locking that row
  (``SELECT ... FOR UPDATE``) and ends by moving it on: writers of every
  node sharing the database are serialised from their first statement to
  their COMMIT, so sequence numbers are given in commit order and a reader
  of "the changes after N" never misses a lower number committed later
  (which a plain SEQUENCE would allow).  The same lock makes POST's
  "absent" check atomic across nodes.
* ``minstore_counts``: live records per collection, kept in the same
  transaction.
* ``minstore_checkpoints``: ``(node, peer) -> seq``, each node's own.
* ``minstore_schema``: the schema version; :data:`MIGRATIONS` bring an
  older database up to date at open, under an advisory lock so that nodes
  starting together migrate once.
* Secondary indexes (L{minstore.storage.indexes}), as in the ``sqlite``
  engine: ``minstore_idx (collection, field, key, uid)``, ``key`` the
  sortable bytes of the field's value as ``bytea`` (compared bytewise, the
  order the key encoding is made for), its primary key the order of a
  filtered listing; ``minstore_idx_state``: every declaration the database
  keeps and how far its build is.  Each write keeps the entries of every
  declaration in ``minstore_idx_state`` in its own transaction, under the
  counter-row lock (so a declaration and the writes are in one order: what
  was written before it, the build indexes, what is written after, the
  writes do).  A build goes in steps, each a transaction under that lock
  that records how far it went.

  Declarations are per database, as the records are, while each node gives
  its own ``--indexes``: ``minstore_idx_decl (node, spec)`` holds each
  node's, and the database keeps the union of them.  A node that stops
  declaring an index removes only its own declaration: the index (its
  state and entries) is dropped when no node declares it any more, so two
  nodes declaring different indexes never drop each other's.  (A node
  that left the cluster for good keeps its declarations until another
  node is started with its ``--node-id`` and new ``--indexes``, or its
  rows are deleted.)  Writers learn of a changed set of declarations from
  ``minstore_state.idx_gen``, read with the lock they take anyway.
  L{index_states} shows this node's declarations, refreshed with the other
  memory values (another node may finish a build this node declared too).

Last writer wins is also checked in SQL: the upsert only replaces a row
whose version is not newer (``WHERE minstore_records.version <=
EXCLUDED.version``).  A batch whose rows the SQL refused (which the lock
rules out on PostgreSQL) is rolled back and retried.  Serialisation
failures and deadlocks (SQLSTATE 40001, 40P01: CockroachDB's "restart
transaction") are retried with a short back-off.

The "memory" values (last_seq, max_version, count, collections) are read
at open, refreshed after each of this node's commits (from the locked
state row, so exactly), and every ``refresh_interval`` seconds by a
background thread, which is how other nodes' writes show up in them.

Connections: a pool of at most ``pool_size`` (``--db-pool``, by default
``--threads``), made on first use and made again after the database went
away; each call leases one for its statement or transaction and gives it
back.  A thread finding every connection leased waits for one, at most
``pool_timeout`` seconds (by default ``statement_timeout``), then fails
with 503 ``storage_busy``.  An unreachable database fails reads and writes
with 503 (L{minstore.errors.ServiceUnavailable}) within
``connect_timeout`` or ``statement_timeout`` seconds (``statement_timeout``
and ``lock_timeout`` of every session, ``--db-timeout``), a full disk or
another error of the database with L{minstore.errors.StorageFailed} (507).
"""

import contextlib
import os
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.logger import Logger
from zope.interface import implementer

from minstore.errors import ServiceUnavailable, StorageFailed
from minstore.interfaces import ABSENT, NEWER, Change, IStorage
from minstore.storage.indexes import Declaration, fields_by_collection, find_queries, record_keys

log = Logger("minstore.storage.postgresql")

#: 2: the secondary index tables (a database of version 1 is upgraded at
#: open; a minstore that knows only 1 refuses a 2, whose indexes it would
#: not keep).
SCHEMA_VERSION = 2

#: version -> the statements that bring the schema from version - 1 to it.
MIGRATIONS = {
    1: [
        """CREATE TABLE minstore_records (
            seq BIGINT PRIMARY KEY,
            collection TEXT COLLATE "C" NOT NULL,
            uid TEXT COLLATE "C" NOT NULL,
            version TEXT COLLATE "C" NOT NULL,
            deleted BOOLEAN NOT NULL,
            forward BOOLEAN NOT NULL,
            data TEXT NOT NULL,
            UNIQUE (collection, uid)
        )""",
        """CREATE TABLE minstore_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            max_version TEXT COLLATE "C"
        )""",
        "INSERT INTO minstore_state VALUES (1, 0, NULL)",
        """CREATE TABLE minstore_counts (
            collection TEXT COLLATE "C" PRIMARY KEY,
            live BIGINT NOT NULL
        )""",
        """CREATE TABLE minstore_checkpoints (
            node TEXT NOT NULL,
            peer TEXT NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (node, peer)
        )""",
    ],
    2: [
        # Moved on by every change of the set of declarations: writers reload them.
        "ALTER TABLE minstore_state ADD COLUMN idx_gen BIGINT NOT NULL DEFAULT 0",
        """CREATE TABLE minstore_idx (
            collection TEXT COLLATE "C" NOT NULL,
            field TEXT COLLATE "C" NOT NULL,
            key BYTEA NOT NULL,
            uid TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (collection, field, key, uid)
        )""",
        """CREATE TABLE minstore_idx_state (
            spec TEXT COLLATE "C" PRIMARY KEY,
            collection TEXT COLLATE "C" NOT NULL,
            field TEXT COLLATE "C" NOT NULL,
            state TEXT NOT NULL,
            seq BIGINT NOT NULL,
            until_seq BIGINT NOT NULL
        )""",
        """CREATE TABLE minstore_idx_decl (
            node TEXT NOT NULL,
            spec TEXT COLLATE "C" NOT NULL,
            collection TEXT COLLATE "C" NOT NULL,
            field TEXT COLLATE "C" NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (node, spec)
        )""",
    ],
}

#: Index entries per INSERT or DELETE statement (4 parameters each).
_ENTRIES_PER_STATEMENT = 2000

#: pg_advisory_lock key of migrations ("minstore" in ASCII, truncated).
_MIGRATION_LOCK = 0x6D696E73746F7265

#: SQLSTATEs after which a transaction is run again.
RETRY_STATES = ("40001", "40P01")
RETRIES = 8


class _Driver:
    """What the engine needs of a DB-API driver: connect, and how to read an error."""

    def __init__(self, name, module, connect):
        self.name = name
        self.module = module
        self.connect = connect

    def sqlstate(self, error):
        """The SQLSTATE of a database error, or None (a connection that broke)."""
        state = getattr(error, "sqlstate", None)
        if state:
            return state
        args = getattr(error, "args", ())
        if args and isinstance(args[0], dict):  # pg8000
            return args[0].get("C")
        return None


def _psycopg():
    import psycopg

    def connect(dsn, connect_timeout, options):
        kwargs = {"autocommit": True, "connect_timeout": max(1, int(connect_timeout))}
        if options:
            kwargs["options"] = options
        return psycopg.connect(dsn, **kwargs)

    return _Driver("psycopg", psycopg, connect)


def _pg8000():
    import pg8000.dbapi

    def connect(dsn, connect_timeout, options):
        kwargs = parse_dsn(dsn)
        kwargs["timeout"] = connect_timeout
        startup = {}
        if options:
            startup["options"] = options
        conn = pg8000.dbapi.connect(startup_params=startup or None, **kwargs)
        conn.autocommit = True
        return conn

    return _Driver("pg8000", pg8000.dbapi, connect)


def load_driver(prefer=None):
    """psycopg 3 when it imports (and works), else pg8000; ImportError naming the extra."""
    order = [prefer] if prefer else ["psycopg", "pg8000"]
    errors = []
    for name in order:
        try:
            return {"psycopg": _psycopg, "pg8000": _pg8000}[name]()
        except ImportError as e:
            errors.append("%s: %s" % (name, e))
    raise ImportError(
        "the postgresql engine needs psycopg (CPython) or pg8000 (PyPy): "
        "pip install 'minstore[postgresql]' (%s)" % "; ".join(errors)
    )


def parse_dsn(dsn):
    """
    pg8000's connect() arguments from a libpq DSN: a URL
    (``postgresql://user:password@host:port/dbname?host=/socket/dir``) or
    ``key=value`` words; what is missing comes from PGHOST, PGPORT,
    PGUSER, PGPASSWORD and PGDATABASE, as libpq does.
    """
    params = {}
    if "://" in dsn:
        url = urlsplit(dsn)
        if url.scheme not in ("postgresql", "postgres"):
            raise ValueError("a DSN URL starts with postgresql://, not %s://" % url.scheme)
        if url.hostname:
            params["host"] = unquote(url.hostname)
        if url.port:
            params["port"] = str(url.port)
        if url.username:
            params["user"] = unquote(url.username)
        if url.password:
            params["password"] = unquote(url.password)
        if url.path.strip("/"):
            params["dbname"] = unquote(url.path.strip("/"))
        for key, values in parse_qs(url.query).items():
            params[key] = values[-1]
    else:
        for word in dsn.split():
            key, sep, value = word.partition("=")
            if not sep:
                raise ValueError("%r is not key=value" % word)
            params[key] = value.strip("'")
    env = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE"}
    for key, var in env.items():
        if key not in params and os.environ.get(var):
            params[key] = os.environ[var]
    kwargs = {"user": params.get("user") or _login(), "database": params.get("dbname")}
    if params.get("password"):
        kwargs["password"] = params["password"]
    port = int(params.get("port") or 5432)
    host = params.get("host") or "/var/run/postgresql"
    if host.startswith("/"):
        kwargs["unix_sock"] = os.path.join(host, ".s.PGSQL.%d" % port)
    else:
        kwargs["host"], kwargs["port"] = host, port
    return kwargs


def _login():
    import getpass

    return getpass.getuser()


def _values(rows, width):
    """``(%s, ...), (%s, ...)`` for ``rows`` rows of ``width`` columns."""
    one = "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * rows)


class _Retry(Exception):
    """The transaction is to run again (a serialisation failure, or rows the SQL refused)."""


@implementer(IStorage)
class PostgreSQLStorage:
    name = "postgresql"
    #: Several nodes may share the database: a node's read cache could
    #: serve a record that another node has changed since (the node turns
    #: its read cache off for such an engine).
    shared = True

    def __init__(
        self,
        data_dir,
        dsn=None,
        node_id=None,
        refresh_interval=0.5,
        statement_timeout=10.0,
        connect_timeout=5.0,
        driver=None,
        pool_size=10,
        pool_timeout=None,
    ):
        self.data_dir = os.path.abspath(data_dir)
        #: None: $MINSTORE_DSN; "": libpq's defaults (PGHOST, PGDATABASE, ... of the environment).
        self.dsn = dsn if dsn is not None else os.environ.get("MINSTORE_DSN", "")
        self.node_id = node_id if node_id is not None else self._stored_node_id()
        self.refresh_interval = refresh_interval
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        if int(pool_size) < 1:
            raise ValueError("pool_size must be 1 or more, not %r" % (pool_size,))
        #: Most connections to the database at once (leased by the calls).
        self.pool_size = int(pool_size)
        #: Most seconds a call waits for a connection while all are leased.
        self.pool_timeout = statement_timeout if pool_timeout is None else pool_timeout
        self._driver_name = driver
        self.driver = None
        #: The connection this thread leased (a nested lease reuses it).
        self._local = threading.local()
        #: Every open connection, leased or idle; the idle ones, last returned last.
        self._conns = []
        self._idle = []
        self._conns_lock = threading.Lock()
        self._slots = threading.Semaphore(self.pool_size)
        #: For status: calls that had to wait for a connection, and that gave up.
        self.pool_waits = 0
        self.pool_timeouts = 0
        self._state_lock = threading.Lock()
        self._last_seq = 0
        self._max_version = None
        self._live = {}
        self._refresher = None
        self._stop = threading.Event()
        #: This node's declarations: spec -> {"state", "seq", "until_seq"}, in declared order.
        self._states = {}
        #: (idx_gen, collection -> fields) of the database's declarations, as last read.
        self._index_fields = (None, fields_by_collection([]))
        #: Whether the last attempt to reach the database failed (for health).
        self.unavailable = None

    def _stored_node_id(self):
        try:
            with open(os.path.join(self.data_dir, "node_id")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def describe(self):
        """The DSN without its password, for logs."""
        try:
            url = urlsplit(self.dsn)
            if url.password:
                return self.dsn.replace(":" + url.password + "@", ":***@")
        except ValueError:
            pass
        return self.dsn or "(libpq defaults)"

    # -- connections ------------------------------------------------------

    def _connect(self):
        # In milliseconds, at least 1 (0 would turn the time-out off), at most PostgreSQL's int.
        ms = max(1, min(2 ** 31 - 1, int(round(self.statement_timeout * 1000))))
        options = "-c statement_timeout=%d -c lock_timeout=%d" % (ms, ms)
        try:
            conn = self.driver.connect(self.dsn, self.connect_timeout, options)
        except self.driver.module.Error as e:
            self.unavailable = str(e).strip() or type(e).__name__
            raise ServiceUnavailable(
                "storage_unavailable", "the database %s cannot be reached: %s" % (self.describe(), self.unavailable)
            )
        except (OSError, ValueError) as e:
            self.unavailable = str(e)
            raise ServiceUnavailable(
                "storage_unavailable", "the database %s cannot be reached: %s" % (self.describe(), e)
            )
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _lease(self):
        """
        A connection of the pool for the duration of the block: an idle one,
        else a new one while the pool has fewer than ``pool_size``, else the
        first one given back within ``pool_timeout`` seconds (503
        ``storage_busy`` when none is).  Nested in the same thread, the same
        connection.
        """
        held = getattr(self._local, "conn", None)
        if held is not None:
            yield held
            return
        if not self._slots.acquire(blocking=False):
            self.pool_waits += 1
            started = time.monotonic()
            if not self._slots.acquire(timeout=self.pool_timeout):
                self.pool_timeouts += 1
                raise ServiceUnavailable(
                    "storage_busy",
                    "all %d connections to the database %s stayed busy for %.3g s (--db-pool, --db-timeout)"
                    % (self.pool_size, self.describe(), time.monotonic() - started),
                    headers={b"retry-after": b"1"},
                )
        try:
            with self._conns_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self._connect()
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None
                with self._conns_lock:
                    if conn in self._conns:  # not discarded (broken) nor closed meanwhile
                        self._idle.append(conn)
        finally:
            self._slots.release()

    def pool_status(self):
        """The pool, for ``/_node/status``."""
        with self._conns_lock:
            open_, idle = len(self._conns), len(self._idle)
        return {
            "dsn": self.describe(),
            "driver": self.driver.name if self.driver is not None else None,
            "pool_size": self.pool_size,
            "connections": open_,
            "leased": open_ - idle,
            "pool_waits": self.pool_waits,
            "pool_timeouts": self.pool_timeouts,
            "statement_timeout": self.statement_timeout,
            "pool_timeout": self.pool_timeout,
            "unavailable": self.unavailable,
        }

    def _discard(self, conn):
        """Forget a connection that broke: the next lease makes a new one."""
        with self._conns_lock:
            if conn in self._conns:
                self._conns.remove(conn)
            if conn in self._idle:
                self._idle.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _failed(self, conn, e, what):
        """The exception to raise for a driver error ``e`` met doing ``what``."""
        state = self.driver.sqlstate(e)
        broken = False
        try:
            self._run(conn, "ROLLBACK")
        except Exception:
            broken = True  # the connection itself is gone
        module = self.driver.module
        lost = state is None and isinstance(e, (module.OperationalError, module.InterfaceError))
        if broken or lost or (state or "")[:2] in ("08", "57"):
            # No connection, or the server shut down / cancelled (statement_timeout).
            self._discard(conn)
            self.unavailable = str(e).strip() or type(e).__name__
            return ServiceUnavailable(
                "storage_unavailable", "the database %s is unavailable (%s): %s" % (self.describe(), what, self.unavailable)
            )
        return StorageFailed("%s: %s failed: [%s] %s" % (self.describe(), what, state, str(e).strip()))

    @staticmethod
    def _rows(conn, sql, args=()):
        cursor = conn.cursor()
        try:
            cursor.execute(sql, args)
            return cursor.fetchall()
        finally:
            cursor.close()

    @staticmethod
    def _run(conn, sql, args=()):
        cursor = conn.cursor()
        try:
            cursor.execute(sql, args)
        finally:
            cursor.close()

    def _read(self, what, sql, args=()):
        """Rows of one read statement, in autocommit; reconnects once for a stale connection."""
        for attempt in (0, 1):
            with self._lease() as conn:
                try:
                    rows = self._rows(conn, sql, args)
                    self.unavailable = None
                    return rows
                except self.driver.module.Error as e:
                    error = self._failed(conn, e, what)
                    if attempt or not isinstance(error, ServiceUnavailable):
                        raise error
                except OSError as e:
                    self._discard(conn)
                    if attempt:
                        raise ServiceUnavailable("storage_unavailable", "the database is unavailable: %s" % (e,))

    def _transaction(self, what, body, isolation=""):
        """
        ``body(conn)`` in one transaction, committed; run again after a
        serialisation failure or a deadlock, and once on a fresh
        connection when the connection broke before COMMIT was sent.
        """
        reconnected = False
        attempt = 0
        while True:
            with self._lease() as conn:
                committing = False
                try:
                    self._run(conn, "BEGIN" + isolation)
                    result = body(conn)
                    committing = True
                    self._run(conn, "COMMIT")
                    self.unavailable = None
                    return result
                except _Retry:
                    self._run(conn, "ROLLBACK")
                except self.driver.module.Error as e:
                    state = self.driver.sqlstate(e)
                    error = self._failed(conn, e, what)
                    if state in RETRY_STATES and attempt < RETRIES:
                        pass
                    elif isinstance(error, ServiceUnavailable) and not committing and not reconnected:
                        reconnected = True
                        continue
                    else:
                        raise error
                except OSError as e:
                    self._discard(conn)
                    if committing or reconnected:
                        raise ServiceUnavailable("storage_unavailable", "the database is unavailable: %s" % (e,))
                    reconnected = True
                    continue
                except BaseException:
                    try:
                        self._run(conn, "ROLLBACK")
                    except Exception:
                        self._discard(conn)
                    raise
            attempt += 1
            if attempt > RETRIES:
                raise StorageFailed("%s: %s: gave up after %d retries" % (self.describe(), what, RETRIES))
            # In the storage thread, never the reactor's; close() cuts the wait short.
            self._stop.wait(min(0.2, 0.002 * 2 ** attempt))

    # -- open and close -------------------------------------------------------

    def open(self):
        try:
            self.driver = load_driver(self._driver_name)
        except ImportError as e:
            raise StorageFailed(str(e))
        self._stop.clear()
        try:
            with self._lease() as conn:
                self._migrate(conn)
                self._refresh(conn)
        except ServiceUnavailable as e:
            self.close()
            raise StorageFailed(e.message)
        except self.driver.module.Error as e:
            self.close()
            raise StorageFailed("%s: %s" % (self.describe(), str(e).strip()))
        if self.refresh_interval:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="minstore-pg-refresh", daemon=True
            )
            self._refresher.start()

    def _migrate(self, conn):
        encoding = self._rows(conn, "SHOW server_encoding")[0][0]
        if encoding.upper().replace("-", "") != "UTF8":
            raise StorageFailed("%s: the database's encoding is %s; minstore needs UTF8" % (self.describe(), encoding))
        self._run(conn, "SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            self._run(conn, "BEGIN")
            try:
                self._run(conn, "CREATE TABLE IF NOT EXISTS minstore_schema (version INTEGER NOT NULL)")
                rows = self._rows(conn, "SELECT version FROM minstore_schema")
                version = rows[0][0] if rows else 0
                if version > SCHEMA_VERSION:
                    raise StorageFailed(
                        "%s: schema version %d, this minstore knows up to %d (upgrade minstore)"
                        % (self.describe(), version, SCHEMA_VERSION)
                    )
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[v]:
                        self._run(conn, statement)
                    log.info("database schema migrated to version {version}", version=v)
                if not rows:
                    self._run(conn, "INSERT INTO minstore_schema VALUES (%s)", (SCHEMA_VERSION,))
                elif version != SCHEMA_VERSION:
                    self._run(conn, "UPDATE minstore_schema SET version = %s", (SCHEMA_VERSION,))
                self._run(conn, "COMMIT")
            except BaseException:
                self._run(conn, "ROLLBACK")
                raise
        finally:
            self._run(conn, "SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))

    def close(self):
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(10)
            self._refresher = None
        with self._conns_lock:
            conns, self._conns, self._idle = self._conns, [], []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass

    # -- the memory values ------------------------------------------------

    def _refresh(self, conn=None):
        if conn is None:
            rows = self._read("refresh", "SELECT seq, max_version FROM minstore_state")
            counts = self._read("refresh", "SELECT collection, live FROM minstore_counts")
            states = self._read("refresh", self._STATES_SQL, (self.node_id,))
        else:
            rows = self._rows(conn, "SELECT seq, max_version FROM minstore_state")
            counts = self._rows(conn, "SELECT collection, live FROM minstore_counts")
            states = self._rows(conn, self._STATES_SQL, (self.node_id,))
        self._remember(rows[0][0], rows[0][1], dict(counts), replace=True)
        self._remember_states(states)

    def _remember(self, seq, max_version, live, replace=False):
        with self._state_lock:
            if seq >= self._last_seq:
                self._last_seq = seq
                if max_version is not None and (self._max_version is None or max_version > self._max_version):
                    self._max_version = max_version
                merged = dict(live) if replace else dict(self._live, **live)
                self._live = merged

    def _refresh_loop(self):
        while not self._stop.wait(self.refresh_interval):
            try:
                self._refresh()
            except (ServiceUnavailable, StorageFailed):
                pass  # self.unavailable says why; tried again next time
            except Exception:
                log.failure("refreshing the counts from the database failed")

    def last_seq(self):
        return self._last_seq

    def max_version(self):
        return self._max_version

    def count(self):
        return sum(self._live.values())

    def collections(self):
        return sorted(c for c, n in self._live.items() if n > 0)

    # -- reads ------------------------------------------------------------

    def get(self, collection, uid):
        rows = self._read(
            "get", "SELECT data FROM minstore_records WHERE collection = %s AND uid = %s", (collection, uid)
        )
        return rows[0][0].encode("utf-8") if rows else None

    def get_many(self, keys):
        from minstore.storage.sqlite import uids_by_collection

        found = {}
        for collection, uids in uids_by_collection(keys).items():
            rows = self._read(
                "get",
                "SELECT uid, data FROM minstore_records WHERE collection = %s AND uid = ANY(%s)",
                (collection, uids),
            )
            for uid, data in rows:
                found[collection, uid] = data.encode("utf-8")
        return [found.get(key) for key in keys]

    def list(self, collection, after, prefix, limit):
        sql = "SELECT data FROM minstore_records WHERE collection = %s AND NOT deleted"
        args = [collection]
        if after is not None:
            sql += " AND uid > %s"
            args.append(after)
        if prefix:
            from minstore.storage.sqlite import prefix_bound

            sql += " AND uid >= %s"
            args.append(prefix)
            bound = prefix_bound(prefix)
            if bound is not None:
                sql += " AND uid < %s"
                args.append(bound)
        sql += " ORDER BY uid LIMIT %s"
        args.append(limit)
        return [row[0].encode("utf-8") for row in self._read("list", sql, args)]

    def changes(self, after, limit, forwarded_only=False, collection=None):
        sql = (
            "SELECT seq, collection, uid, version, deleted, forward, data FROM minstore_records"
            " WHERE seq > %s"
        )
        args = [after]
        if forwarded_only:
            sql += " AND forward"
        if collection is not None:
            sql += " AND collection = %s"
            args.append(collection)
        sql += " ORDER BY seq LIMIT %s"
        args.append(limit)

        def read(conn):
            # One snapshot: the counter and the rows agree.
            top = self._rows(conn, "SELECT seq FROM minstore_state")[0][0]
            return top, self._rows(conn, sql, args)

        top, rows = self._transaction("changes", read, " ISOLATION LEVEL REPEATABLE READ READ ONLY")
        changes = [
            Change(seq, c, u, v, bool(d), bool(f), data.encode("utf-8")) for seq, c, u, v, d, f, data in rows
        ]
        scanned = changes[-1].seq if len(changes) >= limit else max(top, after)
        return changes, scanned

    def count_changes(self, after, forwarded_only=False):
        sql = "SELECT COUNT(*) FROM minstore_records WHERE seq > %s" + (" AND forward" if forwarded_only else "")
        return self._read("count_changes", sql, (after,))[0][0]

    def scan_versions(self, after, upto, limit):
        # (collection, uid) row comparisons in "C" order: code point order, the unique index's.
        sql = "SELECT collection, uid, version FROM minstore_records"
        where, args = [], []
        if after is not None:
            where.append("(collection, uid) > (%s, %s)")
            args.extend(after)
        if upto is not None:
            where.append("(collection, uid) <= (%s, %s)")
            args.extend(upto)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY collection, uid LIMIT %s"
        args.append(limit)
        return [tuple(row) for row in self._read("scan_versions", sql, args)]

    # -- tombstone purge ------------------------------------------------------

    def purge_tombstones(self, before_version, upto_seq, upto_forwarded_seq, limit):
        # Deliberately none: the database is one store for every node that
        # shares it, and each of them has its own peers.  This node's peers
        # confirming a tombstone says nothing of the others' peers, and a
        # tombstone removed here is removed for all of them: a peer of
        # another node still holding the old record would bring it back.
        return []

    def purged_version(self):
        return None

    def checkpoints(self):
        rows = self._read("checkpoints", "SELECT peer, seq FROM minstore_checkpoints WHERE node = %s", (self.node_id,))
        return dict(rows)

    # -- writes -----------------------------------------------------------

    def write(self, batch, checkpoints=None):
        if not batch and checkpoints is None:
            return []
        for w in batch:
            if "\x00" in w.uid:
                raise StorageFailed("%s: PostgreSQL text cannot hold the NUL character of uid %r" % (self.describe(), w.uid))
        seq, max_version, live, results = self._transaction(
            "write", lambda conn: self._write_in(conn, batch, checkpoints)
        )
        self._remember(seq, max_version, live)
        return results

    def _write_in(self, conn, batch, checkpoints):
        """The body of a write transaction: (counter, max_version, {collection: live}, results)."""
        # The lock every writer of every node takes first: numbers in commit order.
        seq, max_version, gen = self._rows(
            conn, "SELECT seq, max_version, idx_gen FROM minstore_state WHERE id = 1 FOR UPDATE"
        )[0]
        fields = self._declared_fields(conn, gen)
        held = {}
        old_data = {}  # (collection, uid) -> the live record held before the batch, where indexed
        if batch:
            keys = list({(w.collection, w.uid) for w in batch})
            indexed = any(fields(c) for c, _ in keys)
            rows = self._rows(
                conn,
                "SELECT r.collection, r.uid, r.deleted, r.version, "
                + ("CASE WHEN r.deleted THEN NULL ELSE r.data END" if indexed else "NULL")
                + " FROM minstore_records r"
                " JOIN unnest(%s::text[], %s::text[]) AS k(collection, uid)"
                " ON r.collection = k.collection AND r.uid = k.uid",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            held = {(c, u): (bool(d), v) for c, u, d, v, _ in rows}
            old_data = {(c, u): data for c, u, _, _, data in rows if data is not None}
        results = []
        rows = {}  # (collection, uid) -> the row to store (the last one of the batch)
        delta = {}
        for collection, uid, data, deleted, version, forward, condition in batch:
            key = (collection, uid)
            old = held.get(key)
            was_live = old is not None and not old[0]
            if condition == ABSENT and was_live:
                results.append(None)
                continue
            if old is not None and (old[1] >= version if condition == NEWER else old[1] > version):
                # Last writer wins: never over a newer version (another node's, written meanwhile).
                results.append(None)
                continue
            seq += 1
            if isinstance(data, bytes):
                data = data.decode("utf-8")
            rows[key] = (seq, collection, uid, version, bool(deleted), bool(forward), data)
            held[key] = (bool(deleted), version)
            change = (not deleted) - was_live
            if change:
                delta[collection] = delta.get(collection, 0) + change
            if max_version is None or version > max_version:
                max_version = version
            results.append(seq)
        if rows:
            stored = self._upsert(conn, list(rows.values()), fields, old_data)
            if stored != len(rows):
                raise _Retry()  # a row changed under us: not with the lock, but never store a gap
            self._run(
                conn, "UPDATE minstore_state SET seq = %s, max_version = %s WHERE id = 1", (seq, max_version)
            )
        live = {}
        if delta:
            names = sorted(delta)
            live = dict(
                self._rows(
                    conn,
                    "INSERT INTO minstore_counts (collection, live) VALUES " + _values(len(names), 2)
                    + " ON CONFLICT (collection) DO UPDATE SET live = minstore_counts.live + EXCLUDED.live"
                    " RETURNING collection, live",
                    [x for name in names for x in (name, delta[name])],
                )
            )
        if checkpoints is not None:
            self._replace_checkpoints(conn, checkpoints)
        return seq, max_version, live, results

    def _upsert(self, conn, rows, fields, old_data):
        """
        Insert or replace ``rows``; the number stored.  Last writer wins in
        SQL too: a held row with a newer version is left alone.  The
        entries of the secondary indexes move with them, in the same
        transaction: from the keys of the record held before the batch
        (``old_data``) to those of the row stored (``fields``: collection ->
        the fields indexed there).
        """
        stored = self._rows(
            conn,
            "INSERT INTO minstore_records (seq, collection, uid, version, deleted, forward, data) VALUES "
            + _values(len(rows), 7)
            + " ON CONFLICT (collection, uid) DO UPDATE SET seq = EXCLUDED.seq, version = EXCLUDED.version,"
            " deleted = EXCLUDED.deleted, forward = EXCLUDED.forward, data = EXCLUDED.data"
            " WHERE minstore_records.version <= EXCLUDED.version RETURNING seq",
            [x for row in rows for x in row],
        )
        removed, added = [], []
        for _, collection, uid, _, deleted, _, data in rows:
            indexed = fields(collection)
            if not indexed:
                continue
            old = old_data.get((collection, uid))
            old_keys = record_keys(old, indexed) if old is not None else {}
            new_keys = record_keys(data, indexed) if not deleted else {}
            for field in indexed:
                before, after = old_keys.get(field), new_keys.get(field)
                if before is not None and before != after:
                    removed.append((collection, field, before, uid))
                if after is not None:
                    # Even when the key is unchanged: while an index is
                    # building, the old record may not have its entry yet,
                    # and once moved past the build's mark the build would
                    # not give it one.
                    added.append((collection, field, after, uid))
        for i in range(0, len(removed), _ENTRIES_PER_STATEMENT):
            chunk = removed[i : i + _ENTRIES_PER_STATEMENT]
            self._run(
                conn,
                "DELETE FROM minstore_idx i USING (VALUES "
                + ", ".join(["(%s::text, %s::text, %s::bytea, %s::text)"] * len(chunk))
                + ") AS d(collection, field, key, uid) WHERE i.collection = d.collection"
                " AND i.field = d.field AND i.key = d.key AND i.uid = d.uid",
                [x for entry in chunk for x in entry],
            )
        self._insert_entries(conn, added)
        return len(stored)

    def _insert_entries(self, conn, entries):
        for i in range(0, len(entries), _ENTRIES_PER_STATEMENT):
            chunk = entries[i : i + _ENTRIES_PER_STATEMENT]
            self._run(
                conn,
                "INSERT INTO minstore_idx (collection, field, key, uid) VALUES "
                + ", ".join(["(%s, %s, %s::bytea, %s)"] * len(chunk))
                + " ON CONFLICT DO NOTHING",
                [x for entry in chunk for x in entry],
            )

    def _replace_checkpoints(self, conn, checkpoints):
        self._run(conn, "DELETE FROM minstore_checkpoints WHERE node = %s", (self.node_id,))
        if checkpoints:
            peers = sorted(checkpoints)
            self._run(
                conn,
                "INSERT INTO minstore_checkpoints (node, peer, seq) VALUES " + _values(len(peers), 3),
                [x for peer in peers for x in (self.node_id, peer, checkpoints[peer])],
            )

    def save_checkpoints(self, checkpoints):
        self._transaction("save_checkpoints", lambda conn: self._replace_checkpoints(conn, checkpoints))

    # -- secondary indexes ---------------------------------------------------

    #: This node's declarations and their states, in declared order.
    _STATES_SQL = (
        "SELECT d.spec, s.state, s.seq, s.until_seq FROM minstore_idx_decl d"
        " JOIN minstore_idx_state s ON s.spec = d.spec WHERE d.node = %s ORDER BY d.position"
    )

    def _remember_states(self, rows):
        self._states = dict(
            (spec, {"state": state, "seq": seq, "until_seq": until_seq}) for spec, state, seq, until_seq in rows
        )

    def _declared_fields(self, conn, gen):
        """collection -> the fields indexed there, of every declaration the database keeps (at ``gen``)."""
        known, fields = self._index_fields
        if known != gen:
            rows = self._rows(conn, "SELECT collection, field FROM minstore_idx_state ORDER BY spec")
            fields = fields_by_collection([Declaration(c, f) for c, f in rows])
            self._index_fields = (gen, fields)
        return fields

    def set_indexes(self, declarations):
        declarations = [Declaration(*d) for d in declarations]
        states = self._transaction("set_indexes", lambda conn: self._set_indexes(conn, declarations))
        self._remember_states(states)

    def _set_indexes(self, conn, mine):
        # Under the writers' lock: the declaration's until_seq is exactly the
        # last number written without its entries.
        seq = self._rows(conn, "SELECT seq FROM minstore_state WHERE id = 1 FOR UPDATE")[0][0]
        self._run(conn, "DELETE FROM minstore_idx_decl WHERE node = %s", (self.node_id,))
        if mine:
            self._run(
                conn,
                "INSERT INTO minstore_idx_decl (node, spec, collection, field, position) VALUES "
                + _values(len(mine), 5),
                [x for i, d in enumerate(mine) for x in (self.node_id, str(d), d.collection, d.field, i)],
            )
        # What the database keeps: the union of every node's declarations.
        declarations = [Declaration(c, f) for c, f in self._rows(conn, "SELECT DISTINCT collection, field FROM minstore_idx_decl")]
        wanted = dict((str(d), d) for d in declarations)
        held = dict(
            (spec, (collection, field, state))
            for spec, collection, field, state in self._rows(
                conn, "SELECT spec, collection, field, state FROM minstore_idx_state"
            )
        )
        changed = False
        for spec, (collection, field, _) in held.items():
            if spec in wanted:
                continue
            changed = True
            self._run(conn, "DELETE FROM minstore_idx_state WHERE spec = %s", (spec,))
            if Declaration("*", field) in declarations:
                pass  # its entries are the other declaration's too
            elif collection == "*":
                kept = [d.collection for d in declarations if d.field == field]
                self._run(
                    conn,
                    "DELETE FROM minstore_idx WHERE field = %s AND NOT (collection = ANY(%s::text[]))",
                    (field, kept),
                )
            elif Declaration(collection, field) not in declarations:
                self._run(conn, "DELETE FROM minstore_idx WHERE collection = %s AND field = %s", (collection, field))
            log.info("index {spec} dropped (no node declares it any more)", spec=spec)
        for spec, d in wanted.items():
            if spec in held:
                continue
            changed = True
            everywhere = held.get(str(Declaration("*", d.field)))
            if seq == 0 or (everywhere is not None and everywhere[2] == "ready"):
                state = "ready"
            else:
                state = "building"
                log.info("index {spec} declared over {n} sequence numbers: building it", spec=spec, n=seq)
            self._run(
                conn,
                "INSERT INTO minstore_idx_state (spec, collection, field, state, seq, until_seq)"
                " VALUES (%s, %s, %s, %s, 0, %s)",
                (spec, d.collection, d.field, state, seq),
            )
        if changed:
            self._run(conn, "UPDATE minstore_state SET idx_gen = idx_gen + 1 WHERE id = 1")
        return self._rows(conn, self._STATES_SQL, (self.node_id,))

    def build_indexes(self, limit):
        if not any(s["state"] == "building" for s in self._states.values()):
            return False
        more, states = self._transaction("build_indexes", lambda conn: self._build_step(conn, limit))
        self._remember_states(states)
        return more

    def _build_step(self, conn, limit):
        """One step of the first building declaration of this node's: (whether some still build, states)."""
        # Under the writers' lock: a write cannot move a record between the
        # step's read of it and its entry.
        self._run(conn, "SELECT seq FROM minstore_state WHERE id = 1 FOR UPDATE")
        building = [row for row in self._rows(conn, self._STATES_SQL, (self.node_id,)) if row[1] == "building"]
        if not building:
            return False, self._rows(conn, self._STATES_SQL, (self.node_id,))  # another node built them
        spec, _, seq, until_seq = building[0]
        collection, field = self._rows(conn, "SELECT collection, field FROM minstore_idx_state WHERE spec = %s", (spec,))[0]
        top = min(until_seq, seq + limit)
        state = "ready" if top >= until_seq else "building"
        sql = "SELECT collection, uid, data FROM minstore_records WHERE seq > %s AND seq <= %s AND NOT deleted"
        args = [seq, top]
        if collection != "*":
            sql += " AND collection = %s"
            args.append(collection)
        entries = []
        for c, uid, data in self._rows(conn, sql, args):
            key = record_keys(data, (field,)).get(field)
            if key is not None:
                entries.append((c, field, key, uid))
        self._insert_entries(conn, entries)
        self._run(conn, "UPDATE minstore_idx_state SET seq = %s, state = %s WHERE spec = %s", (top, state, spec))
        if state == "ready":
            log.info("index {spec} built", spec=spec)
        return state == "building" or len(building) > 1, self._rows(conn, self._STATES_SQL, (self.node_id,))

    def index_states(self):
        return dict((spec, dict(s)) for spec, s in list(self._states.items()))

    def find(self, collection, field, start, stop, after, limit):
        base = (
            "SELECT i.key, r.data FROM minstore_idx i"
            " JOIN minstore_records r ON r.collection = i.collection AND r.uid = i.uid"
            " WHERE i.collection = %s AND i.field = %s"
        )
        queries = find_queries(base, collection, field, start, stop, after, "%s")

        def read(conn):
            found = []
            for sql, args in queries:
                if len(found) < limit:
                    rows = self._rows(conn, sql + " ORDER BY i.key, i.uid LIMIT %s", args + [limit - len(found)])
                    found.extend((bytes(k), d.encode("utf-8")) for k, d in rows)
            return found

        # One snapshot for both.
        return self._transaction("find", read, " ISOLATION LEVEL REPEATABLE READ READ ONLY")
