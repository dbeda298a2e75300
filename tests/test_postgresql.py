"""
The ``postgresql`` engine: the whole conformance suite, what sharing one
database between nodes adds (one feed in commit order, POST's "absent"
atomic across nodes, last writer wins in SQL, per-node checkpoints), the
retry of serialisation failures, a database that goes away and comes back,
and two real nodes over one ``--dsn``.

The tests run against a throwaway PostgreSQL cluster that this module
starts (``initdb`` + ``pg_ctl`` on a free loopback port, as the
``postgres`` user when run as root) and stops at exit, or against
``$MINSTORE_TEST_DSN`` when set (a database the tests may empty: they drop
and recreate the ``minstore_*`` tables).  Without PostgreSQL binaries or a
driver they skip, saying why; CI installs both (``.ci/run``).
"""

import atexit
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import sys
import threading

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from minstore.errors import ServiceUnavailable, StorageFailed
from minstore.interfaces import ABSENT, NEWER
from minstore.storage.indexes import parse_declarations
from minstore.testing import (
    V1,
    V2,
    V3,
    DurableStorageContract,
    StorageContract,
    assert_index_exact,
    build_all,
    found,
    item,
    uids_of,
)
from tests.harness import NodeTestMixin, deferred_test, free_port

try:
    from minstore.storage.postgresql import PostgreSQLStorage, load_driver, parse_dsn

    load_driver()
    _NO_DRIVER = None
except ImportError as e:
    _NO_DRIVER = str(e)

ENGINE = "minstore.storage.postgresql:PostgreSQLStorage"
TABLES = (
    "minstore_records, minstore_state, minstore_counts, minstore_checkpoints, minstore_schema,"
    " minstore_idx, minstore_idx_state, minstore_idx_decl"
)


def _bin_dir():
    """The directory of initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(versions[-1]) if versions else None


class TemporaryCluster:
    """A PostgreSQL cluster in a temporary directory, on a free loopback port."""

    def __init__(self, bin_dir, fsync=False):
        self.bin_dir = bin_dir
        self.fsync = fsync
        self.base = tempfile.mkdtemp(prefix="minstore-pg-")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.port = None
        self.user = None
        if os.geteuid() == 0:
            # initdb refuses root: the cluster belongs to an unprivileged user.
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise SkipTest("running as root and no 'postgres' user to own a test cluster")
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)

    def _cmd(self, *argv):
        argv = [os.path.join(self.bin_dir, argv[0])] + list(argv[1:])
        if self.user is not None:
            argv = ["runuser", "-u", self.user.pw_name, "--"] + argv
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.base)

    def start(self):
        done = self._cmd("initdb", "-D", self.data, "-A", "trust", "-U", "minstore", "-E", "UTF8", "--no-locale")
        if done.returncode:
            raise RuntimeError("initdb failed: %s" % done.stdout.decode(errors="replace")[-2000:])
        self.port = free_port()
        self.restart()

    def restart(self):
        options = "-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=200" % (self.port, self.base)
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        done = self._cmd("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")
        if done.returncode:
            with open(self.log, errors="replace") as f:
                raise RuntimeError("pg_ctl start failed: %s\n%s" % (done.stdout.decode(errors="replace"), f.read()[-2000:]))

    def stop(self, mode="fast"):
        self._cmd("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def dsn(self, dbname="postgres"):
        return "postgresql://minstore@127.0.0.1:%d/%s" % (self.port, dbname)

    def remove(self):
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


_cluster = None
_cluster_error = None


def database_dsn():
    """The DSN of the test database (made once), or SkipTest saying why there is none."""
    global _cluster, _cluster_error
    if _NO_DRIVER:
        raise SkipTest(_NO_DRIVER)
    if os.environ.get("MINSTORE_TEST_DSN"):
        return os.environ["MINSTORE_TEST_DSN"]
    if _cluster_error:
        raise SkipTest(_cluster_error)
    if _cluster is None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            _cluster_error = "no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql, or set MINSTORE_TEST_DSN"
            raise SkipTest(_cluster_error)
        try:
            cluster = TemporaryCluster(bin_dir)
            cluster.start()
        except SkipTest as e:
            _cluster_error = str(e)
            raise
        atexit.register(cluster.remove)
        _cluster = cluster
        conn = load_driver().connect(cluster.dsn(), 10, None)
        cur = conn.cursor()
        cur.execute("CREATE DATABASE minstore_test")
        conn.close()
    return _cluster.dsn("minstore_test")


def own_cluster():
    """The cluster this module started (None with MINSTORE_TEST_DSN)."""
    database_dsn()
    return _cluster


def reset_database():
    """Drop minstore's tables from the test database: each test starts empty."""
    conn = load_driver().connect(database_dsn(), 10, None)
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS " + TABLES)
        cur.execute("DROP FUNCTION IF EXISTS minstore_test_fail() CASCADE")
        cur.execute("DROP SEQUENCE IF EXISTS minstore_test_failures")
        cur.close()
    finally:
        conn.close()


class _PostgreSQLCase:
    def setUp(self):
        self.dsn = database_dsn()
        reset_database()
        # The crash tests' child builds the engine from the data dir alone: $MINSTORE_DSN.
        old = os.environ.get("MINSTORE_DSN")
        os.environ["MINSTORE_DSN"] = self.dsn
        self.addCleanup(self._restore_env, old)

    @staticmethod
    def _restore_env(old):
        if old is None:
            os.environ.pop("MINSTORE_DSN", None)
        else:
            os.environ["MINSTORE_DSN"] = old

    def engine(self, node_id="n1", data=None, **kwargs):
        storage = PostgreSQLStorage(data or self.mktemp(), dsn=self.dsn, node_id=node_id, **kwargs)
        storage.open()
        self.addCleanup(storage.close)
        return storage

    def sql(self, storage, statement):
        with storage._lease() as conn:
            storage._run(conn, statement)

    def rows(self, storage, statement):
        with storage._lease() as conn:
            return storage._rows(conn, statement)


class PostgreSQLContractTests(_PostgreSQLCase, StorageContract, DurableStorageContract, SynchronousTestCase):
    """The conformance suite every engine passes, crash points included."""

    def make_storage(self):
        self.data = os.path.abspath(self.mktemp())
        return self.engine(data=self.data)

    def reopen_storage(self, storage):
        storage.close()
        return self.engine(data=self.data)

    def engine_spec(self):
        return (ENGINE, os.path.abspath(self.mktemp()))

    def fill_disk(self, storage):
        # A full disk cannot be made for the server from here; the database
        # raising its own "disk full" error (SQLSTATE 53100) on the write
        # takes the same path through the engine.
        self.sql(
            storage,
            "CREATE FUNCTION minstore_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';"
            " END $$",
        )
        self.sql(
            storage,
            "CREATE TRIGGER minstore_test_fail BEFORE INSERT OR UPDATE ON minstore_records"
            " FOR EACH STATEMENT EXECUTE FUNCTION minstore_test_fail()",
        )
        return True

    def free_disk(self, storage):
        self.sql(storage, "DROP FUNCTION minstore_test_fail() CASCADE")


class SharedDatabaseTests(_PostgreSQLCase, SynchronousTestCase):
    """Several engines (nodes) on one database form one store."""

    def test_one_feed_for_every_node(self):
        """What one node writes, another reads at once, numbered in one sequence."""
        a, b = self.engine("a"), self.engine("b")
        self.assertEqual(a.write([item("c", "x")]), [1])
        self.assertEqual(b.get("c", "x"), item("c", "x").data)
        self.assertEqual(b.write([item("c", "y")]), [2])
        self.assertEqual([c.uid for c in a.changes(0, 10)[0]], ["x", "y"])
        self.assertEqual(uids_of(a.list("c", None, None, 10)), ["x", "y"])
        # a learns of b's write from its next commit or its next refresh.
        a._refresh()
        self.assertEqual((a.last_seq(), a.count(), a.collections()), (2, 2, ["c"]))

    def test_refresh_thread_follows_other_nodes(self):
        """The memory values follow other nodes' writes within the refresh interval."""
        a = self.engine("a", refresh_interval=0.05)
        b = self.engine("b", refresh_interval=0)
        b.write([item("c", "x", version=V3), item("d", "y")])
        import time

        deadline = time.time() + 5
        while a.last_seq() < 2 and time.time() < deadline:
            time.sleep(0.02)
        self.assertEqual((a.last_seq(), a.max_version(), a.count(), a.collections()), (2, V3, 2, ["c", "d"]))

    def test_racing_posts_exactly_one_wins(self):
        """POSTs of one uid racing on two nodes: exactly one is stored."""
        a, b = self.engine("a"), self.engine("b")
        for round in range(20):
            uid = "race%d" % round
            results = {}
            barrier = threading.Barrier(2)

            def post(name, storage, value):
                barrier.wait()
                results[name] = storage.write([item("c", uid, value, condition=ABSENT)])[0]

            threads = [threading.Thread(target=post, args=(n, s, n)) for n, s in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [n for n, seq in results.items() if seq is not None]
            self.assertEqual(len(winners), 1, results)
            self.assertEqual(json.loads(a.get("c", uid))["value"], winners[0])

    def test_feed_in_commit_order_across_nodes(self):
        """
        Readers that follow the feed with "after the last number I saw",
        while two nodes write concurrently from several threads each, see
        every number: none is committed below one already read.
        """
        a, b = self.engine("a"), self.engine("b")
        stop = threading.Event()
        seen, errors = [], []

        def writer(storage, name):
            try:
                for i in range(40):
                    storage.write([item("c", "%s-%d-%d" % (name, i, j)) for j in range(3)])
            except Exception as e:
                errors.append(e)

        def reader():
            after = 0
            while True:
                last = stop.is_set()
                changes, scanned = a.changes(after, 1000)
                seen.extend(c.seq for c in changes)
                after = scanned
                if last:
                    return

        threads = [threading.Thread(target=writer, args=(s, "%s%d" % (n, k))) for n, s in (("a", a), ("b", b)) for k in range(3)]
        follower = threading.Thread(target=reader)
        follower.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        follower.join()
        self.assertEqual(errors, [])
        self.assertEqual(seen, list(range(1, 6 * 40 * 3 + 1)))

    def test_last_writer_wins_in_sql(self):
        """A write over a newer version (another node's) is not stored, whatever its condition."""
        a, b = self.engine("a"), self.engine("b")
        self.assertEqual(a.write([item("c", "x", "new", V3)]), [1])
        self.assertEqual(b.write([item("c", "x", "old", V2)]), [None])
        self.assertEqual(b.write([item("c", "x", "old", V2, condition=NEWER)]), [None])
        self.assertEqual(json.loads(b.get("c", "x"))["value"], "new")
        self.assertEqual(b.write([item("c", "x", "newer", V3 + "z")]), [2])

    def test_nul_in_uid_fails_the_batch_only(self):
        """PostgreSQL text cannot hold NUL: such a batch fails with StorageFailed, the engine goes on."""
        a = self.engine("a")
        self.assertRaises(StorageFailed, a.write, [item("c", "a\x00b")])
        self.assertEqual(a.write([item("c", "x")]), [1])

    def test_checkpoints_per_node(self):
        """Each node keeps its own checkpoints in the shared database."""
        a, b = self.engine("a"), self.engine("b")
        a.save_checkpoints({"http://p:1": 5})
        b.write([item("c", "x")], checkpoints={"http://p:1": 1, "http://q:1": 1})
        self.assertEqual(a.checkpoints(), {"http://p:1": 5})
        self.assertEqual(b.checkpoints(), {"http://p:1": 1, "http://q:1": 1})

    def test_schema_version_is_checked(self):
        """A database of a newer schema than this minstore knows is refused with one line."""
        a = self.engine("a")
        self.sql(a, "UPDATE minstore_schema SET version = 99")
        e = self.assertRaises(StorageFailed, self.engine, "b")
        self.assertIn("schema version 99", str(e))

    def test_migration_from_empty_by_two_nodes_at_once(self):
        """Two nodes opening an empty database together create the schema once."""
        errors = []
        # mktemp() here, not in the threads: it makes the test's directory
        # unless it exists, which two threads racing turn into FileExistsError.
        dirs = dict((n, self.mktemp()) for n in "ab")

        def open_one(name):
            try:
                self.engine(name, data=dirs[name])
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=open_one, args=(n,)) for n in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_index_declarations_of_two_nodes_are_kept_together(self):
        """
        Nodes declaring different indexes on one database keep each
        other's: each write, on either node, keeps every node's entries;
        one node dropping its declaration drops nothing another still
        declares; an index one node declares over held records builds
        while the other writes.
        """
        a, b = self.engine("a", refresh_interval=0), self.engine("b", refresh_interval=0)
        a.set_indexes(parse_declarations("c:value.g"))
        b.set_indexes(parse_declarations("c:value.h"))
        self.assertEqual(a.index_states(), {"c:value.g": {"state": "ready", "seq": 0, "until_seq": 0}})
        self.assertEqual(list(b.index_states()), ["c:value.h"])
        a.write([item("c", "x", {"g": 1, "h": 2})])
        b.write([item("c", "y", {"g": 1, "h": 3})])
        self.assertEqual(found(b, "c", "value.h", {"eq": 2}), ["x"])
        self.assertEqual(found(a, "c", "value.g", {"eq": 1}), ["x", "y"])
        # b no longer declares value.h, a declares it too: kept, still kept by b's writes.
        a.set_indexes(parse_declarations("c:value.g,c:value.h"))
        b.set_indexes([])
        self.assertEqual(b.index_states(), {})
        self.assertEqual(a.index_states()["c:value.h"]["state"], "ready")
        b.write([item("c", "x", {"g": 5, "h": 3}, V2), item("c", "y", deleted=True, version=V2)])
        self.assertEqual(found(a, "c", "value.h", {"eq": 3}), ["x"])
        self.assertEqual(found(a, "c", "value.g", {"eq": 1}), [])
        assert_index_exact(self, a, "c", "value.g")
        # Declared by b over held records: building, while a writes.
        b.set_indexes(parse_declarations("c:value.k"))
        a.write([item("c", "z%d" % i, {"k": i % 2}) for i in range(6)])
        self.assertEqual(b.index_states()["c:value.k"]["state"], "building")
        build_all(b, 2)
        self.assertEqual(b.index_states()["c:value.k"]["state"], "ready")
        assert_index_exact(self, b, "c", "value.k")
        self.assertEqual(found(a, "c", "value.k", {"eq": 1}), ["z1", "z3", "z5"])
        # Dropped by the last node that declares it: gone.
        a.set_indexes(parse_declarations("c:value.g"))
        self.assertEqual(found(a, "c", "value.h", {"eq": 3}), [])

    def test_schema_1_is_migrated_to_the_index_tables(self):
        """A database of schema 1 (before secondary indexes) gets the index tables at open, its records kept."""
        a = self.engine("a", refresh_interval=0)
        a.write([item("c", "x", {"g": 1})])
        for statement in [
            "DROP TABLE minstore_idx, minstore_idx_state, minstore_idx_decl",
            "ALTER TABLE minstore_state DROP COLUMN idx_gen",
            "UPDATE minstore_schema SET version = 1",
        ]:
            self.sql(a, statement)
        a.close()
        b = self.engine("b", refresh_interval=0)
        self.assertEqual(self.rows(b, "SELECT version FROM minstore_schema"), [(2,)])
        b.set_indexes(parse_declarations("c:value.g"))
        self.assertEqual(b.index_states()["c:value.g"]["state"], "building")
        build_all(b)
        self.assertEqual(found(b, "c", "value.g", {"eq": 1}), ["x"])

    def test_serialization_failures_are_retried(self):
        """A transaction the database aborts with SQLSTATE 40001 (CockroachDB's restart) runs again."""
        a = self.engine("a")
        self.sql(a, "CREATE SEQUENCE minstore_test_failures")
        self.sql(
            a,
            "CREATE FUNCTION minstore_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF nextval('minstore_test_failures') <= 2 THEN"
            " RAISE EXCEPTION 'restart transaction' USING ERRCODE = 'serialization_failure'; END IF;"
            " RETURN NULL; END $$",
        )
        self.sql(
            a,
            "CREATE TRIGGER minstore_test_fail BEFORE INSERT ON minstore_records"
            " FOR EACH STATEMENT EXECUTE FUNCTION minstore_test_fail()",
        )
        self.assertEqual(a.write([item("c", "x"), item("c", "y")]), [1, 2])
        self.assertEqual(self.rows(a, "SELECT last_value FROM minstore_test_failures")[0][0], 3)
        self.assertEqual([c.seq for c in a.changes(0, 10)[0]], [1, 2])
        self.assertEqual(a.write([item("c", "z")]), [3])

    def test_unreachable_database(self):
        """A database that cannot be reached stops the open with one line naming it."""
        port = free_port()
        storage = PostgreSQLStorage(self.mktemp(), dsn="postgresql://minstore@127.0.0.1:%d/x" % port, connect_timeout=2)
        e = self.assertRaises(StorageFailed, storage.open)
        self.assertIn("127.0.0.1:%d" % port, str(e))

    def test_database_down_then_back(self):
        """While the server is down reads and writes fail with 503; once back they work, no reopen."""
        cluster = own_cluster()
        if cluster is None:
            raise SkipTest("MINSTORE_TEST_DSN: the tests do not stop a server they did not start")
        a = self.engine("a", refresh_interval=0)
        a.write([item("c", "x")])
        cluster.stop("fast")
        try:
            e = self.assertRaises(ServiceUnavailable, a.write, [item("c", "y")])
            self.assertEqual((e.code, e.error), (503, "storage_unavailable"))
            self.assertRaises(ServiceUnavailable, a.get, "c", "x")
            self.assertTrue(a.unavailable)
        finally:
            cluster.restart()
        self.assertEqual(a.write([item("c", "y")]), [2])
        self.assertIsNotNone(a.get("c", "x"))
        self.assertIsNone(a.unavailable)


class PoolTests(_PostgreSQLCase, SynchronousTestCase):
    """--db-pool bounds the connections; --db-timeout the statements and the wait for a connection."""

    def _in_threads(self, count, call):
        """``call(i)`` in ``count`` threads at once: their results, or the first exception."""
        results, errors = [None] * count, []
        start = threading.Barrier(count)

        def run(i):
            try:
                start.wait(10)
                results[i] = call(i)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertFalse([t for t in threads if t.is_alive()], "a thread hung")
        if errors:
            raise errors[0]
        return results

    def test_pool_of_one_serves_many_threads(self):
        """With one connection, eight threads writing and reading at once all succeed, over one session."""
        a = self.engine("a", pool_size=1, refresh_interval=0)

        def work(i):
            seqs = []
            for n in range(10):
                seqs.extend(a.write([item("c", "t%d-%d" % (i, n))]))
                self.assertIsNotNone(a.get("c", "t%d-%d" % (i, n)))
            return seqs

        seqs = sorted(sum(self._in_threads(8, work), []))
        self.assertEqual(seqs, list(range(1, 81)))
        self.assertEqual(a.count(), 80)
        status = a.pool_status()
        self.assertEqual((status["pool_size"], status["connections"], status["leased"]), (1, 1, 0))
        self.assertEqual(status["pool_timeouts"], 0)

    def test_pool_grows_up_to_its_size(self):
        """Connections are made as calls need them, never more than the pool's size."""
        a = self.engine("a", pool_size=3, refresh_interval=0)
        gate = threading.Event()
        all_held = threading.Barrier(4)
        held = []

        def hold(i):
            with a._lease() as conn:
                held.append(conn)
                all_held.wait(10)
                gate.wait(10)

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            all_held.wait(10)
            self.assertEqual(len(set(map(id, held))), 3)
            self.assertEqual(a.pool_status()["leased"], 3)
        finally:
            gate.set()
            for t in threads:
                t.join(10)
        a.write([item("c", "x")])
        self.assertEqual(a.pool_status()["connections"], 3)

    def test_waiting_for_a_connection_is_bounded(self):
        """Every connection leased past pool_timeout: 503 storage_busy, the database still healthy."""
        a = self.engine("a", pool_size=1, pool_timeout=0.3, refresh_interval=0)
        a.write([item("c", "x")])
        got, release = threading.Event(), threading.Event()

        def hold():
            with a._lease():
                got.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            self.assertTrue(got.wait(10))

            def busy(i):
                try:
                    (a.get, a.write)[i % 2](*(("c", "x") if i % 2 == 0 else ([item("c", "y")],)))
                except ServiceUnavailable as e:
                    return e
                return None

            errors = self._in_threads(2, busy)
        finally:
            release.set()
            holder.join(10)
        for e in errors:
            self.assertIsInstance(e, ServiceUnavailable)
            self.assertEqual((e.code, e.error), (503, "storage_busy"))
            self.assertIn("all 1 connections", e.message)
            self.assertEqual(e.headers, {b"retry-after": b"1"})
        self.assertIsNone(a.unavailable)  # busy is not down: /_node/health stays 200
        self.assertEqual(a.pool_status()["pool_timeouts"], 2)
        self.assertEqual(a.write([item("c", "y")]), [2])

    def test_statement_timeout(self):
        """A statement running past statement_timeout is cancelled: 503, and the next call works."""
        a = self.engine("a", statement_timeout=0.2, refresh_interval=0)
        e = self.assertRaises(ServiceUnavailable, a._read, "sleep", "SELECT pg_sleep(5)")
        self.assertEqual(e.error, "storage_unavailable")
        self.assertIn("statement timeout", e.message)
        a.write([item("c", "x")])
        self.assertIsNotNone(a.get("c", "x"))

    def test_lock_timeout_bounds_a_write_behind_a_stuck_node(self):
        """A node holding the counter row's lock (stuck mid-transaction) fails other nodes' writes within the time-out."""
        stuck = self.engine("stuck", refresh_interval=0)
        a = self.engine("a", statement_timeout=0.3, refresh_interval=0)
        with stuck._lease() as conn:
            stuck._run(conn, "BEGIN")
            stuck._run(conn, "SELECT seq FROM minstore_state WHERE id = 1 FOR UPDATE")
            try:
                e = self.assertRaises(ServiceUnavailable, a.write, [item("c", "x")])
                self.assertEqual((e.code, e.error), (503, "storage_unavailable"))
            finally:
                stuck._run(conn, "ROLLBACK")
        self.assertEqual(a.write([item("c", "x")]), [1])

    def test_pool_size_is_checked(self):
        self.assertRaises(ValueError, PostgreSQLStorage, self.mktemp(), dsn=self.dsn, pool_size=0)


class DSNTests(SynchronousTestCase):
    def setUp(self):
        if _NO_DRIVER:
            raise SkipTest(_NO_DRIVER)

    def test_parse_url(self):
        """pg8000 gets libpq's URL fields, a socket directory as unix_sock."""
        self.assertEqual(
            parse_dsn("postgresql://u:p%40ss@db.example:6543/store"),
            {"user": "u", "password": "p@ss", "database": "store", "host": "db.example", "port": 6543},
        )
        self.assertEqual(
            parse_dsn("postgresql:///store?host=/run/pg&user=u"),
            {"user": "u", "database": "store", "unix_sock": "/run/pg/.s.PGSQL.5432"},
        )
        self.assertEqual(parse_dsn("host=h port=1 dbname=d user=u")["host"], "h")
        self.assertRaises(ValueError, parse_dsn, "mysql://x/y")


class SharedDatabaseNodesTests(NodeTestMixin, TestCase):
    """Two real nodes with one --dsn."""

    timeout = 120

    def setUp(self):
        self.dsn = database_dsn()
        reset_database()

    def _nodes(self):
        args = ["--storage", "postgresql", "--dsn", self.dsn, "--processes", ""]
        return [self.make_node(args=args, name=n) for n in ("a", "b")]

    @deferred_test
    async def test_write_on_one_read_on_the_other(self):
        """A write on one node is readable on the other at once, updates and deletes included."""
        a, b = self._nodes()
        await gatherResults([ensureDeferred(n.start()) for n in (a, b)])
        code, _, body = await self.call_json("POST", a.url + "/books/dune", json={"value": "Dune"})
        self.assertEqual(code, 200, body)
        code, _, body = await self.call_json("GET", b.url + "/books/dune?local=1")
        self.assertEqual((code, body["value"]), (200, "Dune"))
        code, _, body = await self.call_json("PUT", b.url + "/books/dune", json={"value": "Dune II"})
        self.assertEqual(code, 200, body)
        code, _, body = await self.call_json("GET", a.url + "/books/dune?local=1")
        self.assertEqual((code, body["value"]), (200, "Dune II"))
        code, _, body = await self.call_json("DELETE", a.url + "/books/dune")
        self.assertEqual(code, 200, body)
        code, _, body = await self.call_json("GET", b.url + "/books/dune?local=1")
        self.assertEqual(code, 404, body)
        code, _, body = await self.call_json("POST", b.url + "/books/", json={"uid": "emma", "value": "Emma"})
        self.assertEqual(code, 200, body)
        code, _, body = await self.call_json("GET", a.url + "/books/?local=1")
        self.assertEqual((code, [r["uid"] for r in body["items"]]), (200, ["emma"]))

    @deferred_test
    async def test_racing_posts_one_200(self):
        """POSTs of one uid sent to both nodes at once: exactly one 200, the other 400 record_exists."""
        a, b = self._nodes()
        await gatherResults([ensureDeferred(n.start()) for n in (a, b)])
        for round in range(10):
            url = "/race/u%d" % round
            answers = await gatherResults(
                [ensureDeferred(self.call_json("POST", n.url + url, json={"value": n.name})) for n in (a, b)]
            )
            codes = sorted(code for code, _, _ in answers)
            self.assertEqual(codes, [200, 400], answers)
            loser = [body for code, _, body in answers if code == 400][0]
            self.assertEqual(loser["error"], "record_exists")


    @deferred_test
    async def test_pool_of_one_connection(self):
        """--db-pool 1 under --threads 4: forty concurrent writes and reads all succeed; the status shows the pool."""
        node = self.make_node(
            args=["--storage", "postgresql", "--dsn", self.dsn, "--processes", "", "--threads", "4", "--db-pool", "1"],
            name="a",
        )
        await node.start()
        calls = [self.call_json("POST", node.url + "/books/b%d" % i, json={"value": i}) for i in range(20)]
        answers = await gatherResults([ensureDeferred(c) for c in calls])
        self.assertEqual([code for code, _, _ in answers], [200] * 20, answers)
        calls = [self.call_json("GET", node.url + "/books/b%d?local=1" % i) for i in range(20)]
        answers = await gatherResults([ensureDeferred(c) for c in calls])
        self.assertEqual([(code, body["value"]) for code, _, body in answers], [(200, i) for i in range(20)])
        code, _, status = await self.call_json("GET", node.url + "/_node/status")
        self.assertEqual(code, 200)
        database = status["database"]
        self.assertEqual((database["pool_size"], database["connections"]), (1, 1), database)
        self.assertEqual((database["statement_timeout"], database["pool_timeouts"]), (10.0, 0), database)
        self.assertEqual(database["dsn"], self.dsn)


class DSNOptionTests(SynchronousTestCase):
    """--dsn goes with --storage postgresql, and only with it."""

    def _error(self, argv):
        import io

        from minstore.tap import Options

        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "MINSTORE_DSN"})
        e = self.assertRaises(SystemExit, Options().parseOptions, argv + ["--data", self.mktemp()])
        self.assertEqual(e.code, 2)
        return err.getvalue()

    def test_postgresql_needs_a_dsn(self):
        self.assertIn("--storage postgresql needs --dsn", self._error(["--storage", "postgresql"]))

    def test_dsn_only_with_postgresql(self):
        self.assertIn("--dsn: only for --storage postgresql", self._error(["--storage", "sqlite", "--dsn", "postgresql:///x"]))

    def test_bad_dsn(self):
        if _NO_DRIVER:
            raise SkipTest(_NO_DRIVER)
        self.assertIn("--dsn: a DSN URL starts with postgresql://", self._error(["--storage", "postgresql", "--dsn", "mysql://h/x"]))

    def test_dsn_from_environment(self):
        if _NO_DRIVER:
            raise SkipTest(_NO_DRIVER)
        from minstore.tap import Options

        self.patch(os, "environ", dict(os.environ, MINSTORE_DSN="postgresql://u@127.0.0.1/x"))
        options = Options()
        options.parseOptions(["--storage", "postgresql", "--data", self.mktemp(), "--processes", ""])
        self.assertEqual(options["dsn"], "postgresql://u@127.0.0.1/x")

    def test_db_pool_and_timeout(self):
        """--db-pool defaults to --threads, must be 1 or more and goes with --storage postgresql only; --db-timeout above 0."""
        if _NO_DRIVER:
            raise SkipTest(_NO_DRIVER)
        from minstore.tap import Options

        argv = ["--storage", "postgresql", "--dsn", "postgresql://u@127.0.0.1/x", "--processes", ""]
        options = Options()
        options.parseOptions(argv + ["--data", self.mktemp(), "--threads", "7"])
        self.assertEqual((options["db-pool"], options["db-timeout"]), (7, 10.0))
        options = Options()
        options.parseOptions(argv + ["--data", self.mktemp(), "--db-pool", "2", "--db-timeout", "1.5"])
        self.assertEqual((options["db-pool"], options["db-timeout"]), (2, 1.5))
        self.assertIn("--db-pool: must be above 0, not 0", self._error(argv + ["--db-pool", "0"]))
        self.assertIn("--db-pool: 'x' is not a whole number", self._error(argv + ["--db-pool", "x"]))
        self.assertIn("--db-timeout: must be above 0", self._error(argv + ["--db-timeout", "0"]))
        self.assertIn("--db-pool: only for --storage postgresql", self._error(["--storage", "sqlite", "--db-pool", "2"]))

    def test_help_lists_them(self):
        from minstore.tap import Options

        text = str(Options())
        for option in ("--db-pool", "--db-timeout", "--dsn"):
            self.assertIn(option, text)
