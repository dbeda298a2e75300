#!/usr/bin/env python3
"""
Micro-benchmark of the postgresql engine: records/s of IStorage.write per
batch size, one writer and several (on two engines, as two nodes sharing
one database: every writer waits for the counter row's lock, so this shows
what serialising the writers costs), against the sqlite engine on the same
disk.

Starts a throwaway PostgreSQL cluster (tests/test_postgresql.py's, with
fsync on, as a real server) unless --dsn is given, and stops it at the end.
With --nodes, also runs bench/run.py's POST/GET figures for a node on
sqlite and a node on postgresql (wrk on PATH)::

    /work/venv/bin/python bench/pg_bench.py
    /work/venv/bin/python bench/pg_bench.py --records 4000 --nodes --duration 5
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from minstore.interfaces import WriteItem  # noqa: E402
from minstore.records import encode_record, make_record  # noqa: E402
from minstore.storage.postgresql import PostgreSQLStorage, load_driver  # noqa: E402
from minstore.storage.sqlite import SQLiteStorage  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog while a patient engineer measures records per second"


def items(prefix, n, start=0):
    out = []
    for i in range(start, start + n):
        uid = "%s-%d" % (prefix, i)
        version = "%013d-000000-bench" % (i + 1)
        data = encode_record(make_record("bench", uid, {"text": TEXT, "n": i}, version, 1.0))
        out.append(WriteItem("bench", uid, data, False, version, True, "absent"))
    return out


def run_writers(engines, threads_per_engine, records, batch):
    """records/s of ``len(engines) * threads_per_engine`` writers, ``records`` in all."""
    per = records // (len(engines) * threads_per_engine)
    work = []
    for e_index, engine in enumerate(engines):
        for t in range(threads_per_engine):
            prefix = "b%d-e%d-t%d-%f" % (batch, e_index, t, time.time())
            batches = [items(prefix, batch, i) for i in range(0, per, batch)]
            work.append((engine, batches))
    errors = []

    def go(engine, batches):
        try:
            for b in batches:
                engine.write(b)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=w) for w in work]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(len(b) for _, bs in work for b in bs) / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing database to use (its minstore_* tables are dropped!)")
    p.add_argument("--records", type=int, default=3000, help="records written per measurement (default 3000)")
    p.add_argument("--batches", default="1,8,32,128", help="batch sizes (default 1,8,32,128)")
    p.add_argument("--nodes", action="store_true", help="also POST/GET a node on sqlite and one on postgresql (bench/run.py)")
    p.add_argument("--duration", type=int, default=5, help="--nodes: seconds of each wrk run")
    args = p.parse_args()

    cluster = None
    if args.dsn:
        dsn = args.dsn
    else:
        from tests.test_postgresql import TemporaryCluster, _bin_dir

        cluster = TemporaryCluster(_bin_dir(), fsync=True)
        cluster.start()
        conn = load_driver().connect(cluster.dsn(), 10, None)
        conn.cursor().execute("CREATE DATABASE bench")
        conn.close()
        dsn = cluster.dsn("bench")
    work = tempfile.mkdtemp(prefix="minstore-pg-bench-")
    try:
        print("driver %s, python %s, nproc %d, load %s" % (
            load_driver().name, sys.version.split()[0], os.cpu_count(), os.getloadavg()[0]))
        print("| batch | sqlite 1 writer | postgresql 1 writer | postgresql 2 nodes x 2 writers |")
        print("|---|---|---|---|")
        for batch in [int(b) for b in args.batches.split(",")]:
            lite = SQLiteStorage(os.path.join(work, "sqlite-%d" % batch))
            lite.open()
            one = PostgreSQLStorage(os.path.join(work, "a"), dsn=dsn, node_id="a", refresh_interval=0)
            two = PostgreSQLStorage(os.path.join(work, "b"), dsn=dsn, node_id="b", refresh_interval=0)
            one.open()
            two.open()
            try:
                s = run_writers([lite], 1, args.records, batch)
                a = run_writers([one], 1, args.records, batch)
                b = run_writers([one, two], 2, args.records, batch)
            finally:
                lite.close()
                one.close()
                two.close()
            print("| %d | %.0f rec/s | %.0f rec/s | %.0f rec/s |" % (batch, s, a, b))
        if args.nodes:
            for label, node_args in (("sqlite", "--storage sqlite"), ("postgresql", "--storage postgresql --dsn " + dsn)):
                print("\nnode on %s (bench/run.py):" % label)
                subprocess.call([
                    sys.executable, os.path.join(HERE, "run.py"), "--targets", "node", "--ops", "post,get",
                    "--processes", "", "--duration", str(args.duration), "--warmup", "2",
                    "--node-args", node_args,
                ])
    finally:
        if cluster is not None:
            cluster.remove()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
