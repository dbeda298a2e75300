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

With ``--cluster 1,2,3``, instead: one node on sqlite, then 1, 2 and 3
real nodes over the one database, each configuration started afresh (an
emptied database, seeded), in an order reversed every other repetition
(``--repeat``); POST and GET load from one wrk per node, all at once; the
CPU (user + system, from /proc) of every node and of every PostgreSQL
server process (the postmaster, its backends and helpers, and the backends
that exited, through the postmaster's children's times), per request,
with the load average of the machine.  CPU per request moves far less than
requests/s when other work shares the cores::

    /work/venv/bin/python bench/pg_bench.py
    /work/venv/bin/python bench/pg_bench.py --records 4000 --nodes --duration 5
    /work/venv/bin/python bench/pg_bench.py --cluster 1,2,3 --repeat 2 --duration 6
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


# -- --cluster: 1, 2, 3 nodes over one database --------------------------


def postgres_cpu(data_dir):
    """
    CPU seconds (user + system) of a cluster's processes so far: the
    postmaster's own and its reaped children's (backends that exited), plus
    every live child's.  None when the cluster's processes cannot be read.
    """
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            pid = int(f.readline())
        tick = float(os.sysconf("SC_CLK_TCK"))

        def stat(p):
            with open("/proc/%d/stat" % p) as f:
                return f.read().rsplit(")", 1)[1].split()

        fields = stat(pid)
        total = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        children = set()
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                children.update(int(c) for c in f.read().split())
        for child in children:
            try:
                total += sum(int(x) for x in stat(child)[11:13])
            except (OSError, IndexError):
                pass  # exited meanwhile: now in the postmaster's cutime
        return total / tick
    except (OSError, ValueError, IndexError):
        return None


def node_cpu(pid):
    from run import children_cpu_seconds, cpu_seconds

    own = cpu_seconds(pid)
    if own is None:
        return None
    return own[0] + own[1] + (children_cpu_seconds(pid) or 0.0)


def reset_tables(dsn):
    from tests.test_postgresql import TABLES

    conn = load_driver().connect(dsn, 10, None)
    try:
        cur = conn.cursor()
        cur.execute("DROP TABLE IF EXISTS " + TABLES)
        cur.close()
    finally:
        conn.close()


def run_cluster(args, dsn, pg_data, work):
    """The --cluster figures: a list of result dicts, one per configuration and run."""
    sys.path.insert(0, HERE)
    import run as bench_run

    lua = os.path.join(work, "post.lua")
    with open(lua, "w") as f:
        f.write(bench_run.POST_LUA % {"collection": bench_run.COLLECTION})
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    configurations = [("sqlite", 1)] if args.with_sqlite else []
    configurations += [("postgresql", int(n)) for n in args.cluster.split(",")]
    results = []
    tags = iter(range(1, 1 << 30))
    for rep in range(args.repeat):
        order = configurations if rep % 2 == 0 else configurations[::-1]
        for storage, count in order:
            if storage == "postgresql":
                reset_tables(dsn)
            nodes = []
            try:
                for i in range(count):
                    port = bench_run.free_port()
                    argv = [
                        sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                        "minstore", "--port", "tcp:%d:interface=127.0.0.1" % port,
                        "--data", os.path.join(work, "r%d-%s%d-n%d" % (rep, storage, count, i)),
                        "--storage", storage, "--processes=",
                    ]
                    if storage == "postgresql":
                        argv += ["--dsn", dsn]
                    argv += args.node_args.split()
                    log = os.path.join(work, "r%d-%s%d-n%d.log" % (rep, storage, count, i))
                    nodes.append(bench_run.Server("node %d" % i, argv, port, log, env, REPO).start())
                for node in nodes:
                    node.wait_ready("/_node/health")
                # The seeds (GET reads seed-1) through the first node: every node reads them.
                bench_run.seed(nodes[0].port, args.seed)
                for op in ("post", "get"):
                    result = measure(args, bench_run, nodes, op, lua, pg_data if storage == "postgresql" else None, next(tags))
                    result.update(storage=storage, nodes=count, op=op, rep=rep)
                    results.append(result)
                    print(
                        "  run %d %-10s x%d %-4s %7.0f req/s  node cpu %s us/req  db cpu %s us/req  batch %s (write %s ms)  load %.1f-%.1f%s"
                        % (
                            rep + 1, storage, count, op, result["rps"],
                            "/".join("%.0f" % c for c in result["node_cpu_us"]),
                            "%.0f" % result["db_cpu_us"] if result["db_cpu_us"] is not None else "-",
                            "/".join("%.1f" % b for b in result["batch"]) or "-",
                            "/".join("%.1f" % w for w in result["write_ms"]) or "-",
                            result["load"][0], result["load"][1],
                            "  ERRORS %d" % result["errors"] if result["errors"] else "",
                        ),
                        flush=True,
                    )
            finally:
                for node in nodes:
                    node.stop()
    return results


def measure(args, bench_run, nodes, op, lua, pg_data, tag):
    """One wrk per node at once (a warm-up, then measured); CPU of each node and of the database."""

    def wrk_argv(node, duration, label):
        argv = ["wrk", "-t1", "-c%d" % args.connections, "-d%ds" % duration, "--timeout", "10s", "--latency"]
        url = "http://127.0.0.1:%d" % node.port
        if op == "get":
            return argv + [url + "/%s/seed-1" % bench_run.COLLECTION]
        return argv + ["-s", lua, url, "--", "%s-%d-%d" % (label, tag, node.port), bench_run.TEXT]

    def run_all(duration, label):
        procs = [
            subprocess.Popen(wrk_argv(n, duration, label), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for n in nodes
        ]
        outputs = [p.communicate(timeout=duration + 60)[0].decode("utf-8", "replace") for p in procs]
        for p, out in zip(procs, outputs):
            if p.returncode:
                raise bench_run.BenchError("wrk failed (%d):\n%s" % (p.returncode, out))
        return [bench_run.parse_wrk(out) for out in outputs]

    if args.warmup:
        run_all(args.warmup, "w")
    stats_before = [bench_run.node_stats(n.port) for n in nodes]
    load_before = os.getloadavg()[0]
    cpu_before = [node_cpu(n.proc.pid) for n in nodes]
    db_before = postgres_cpu(pg_data) if pg_data else None
    figures = run_all(args.duration, "m")
    db_after = postgres_cpu(pg_data) if pg_data else None
    cpu_after = [node_cpu(n.proc.pid) for n in nodes]
    load_after = os.getloadavg()[0]
    for n in nodes:
        if not n.alive():
            raise bench_run.BenchError("%s died:\n%s" % (n.name, n.log_tail()))
    requests = [f.get("requests", 0) for f in figures]
    total = sum(requests)
    batches, write_ms = [], []
    for n, before in zip(nodes, stats_before):
        deltas = bench_run.node_deltas(before, bench_run.node_stats(n.port))
        if op == "post" and "avg_batch" in deltas:
            batches.append(deltas["avg_batch"])
            write_ms.append(deltas.get("avg_write_ms", float("nan")))
    return {
        "rps": sum(f["rps"] for f in figures),
        "requests": total,
        "errors": sum(f["non_2xx"] + f["socket_errors"] for f in figures),
        "node_cpu_us": [
            (a - b) * 1e6 / r if a is not None and b is not None and r else float("nan")
            for a, b, r in zip(cpu_after, cpu_before, requests)
        ],
        "db_cpu_us": (db_after - db_before) * 1e6 / total if db_before is not None and db_after is not None and total else None,
        "p99": max(f.get("p99", 0) for f in figures),
        "batch": batches,
        # A batch's storage write, its wait for the counter row's lock included.
        "write_ms": write_ms,
        "load": (load_before, load_after),
    }


def cluster_table(results):
    """Markdown: the median of each configuration's runs, each run's figures beside."""

    def median(values):
        values = sorted(values)
        return values[(len(values) - 1) // 2] if values else float("nan")

    lines = [
        "| engine, nodes | op | req/s (all nodes) | node CPU us/req (each node) | database CPU us/req | p99 ms | POST batch (its write) | load avg | runs (req/s; node, db us/req) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    keys = []
    for r in results:
        key = (r["storage"], r["nodes"], r["op"])
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (k[2] != "post", k[0] != "sqlite", k[1]))
    for key in keys:
        runs = [r for r in results if (r["storage"], r["nodes"], r["op"]) == key]
        node_us = median([sum(r["node_cpu_us"]) / len(r["node_cpu_us"]) for r in runs])
        db = [r["db_cpu_us"] for r in runs if r["db_cpu_us"] is not None]
        lines.append(
            "| %s x%d | %s | %.0f | %.0f | %s | %.0f | %s | %s | %s |"
            % (
                key[0], key[1], key[2].upper(), median([r["rps"] for r in runs]), node_us,
                "%.0f" % median(db) if db else "-",
                median([r["p99"] for r in runs]),
                "%.1f (%.1f ms)" % (
                    median([sum(r["batch"]) / len(r["batch"]) for r in runs if r["batch"]]),
                    median([sum(r["write_ms"]) / len(r["write_ms"]) for r in runs if r["write_ms"]]),
                ) if key[2] == "post" else "",
                ", ".join("%.1f" % ((r["load"][0] + r["load"][1]) / 2) for r in runs),
                "; ".join(
                    "%.0f: %s, %s" % (
                        r["rps"], "/".join("%.0f" % c for c in r["node_cpu_us"]),
                        "%.0f" % r["db_cpu_us"] if r["db_cpu_us"] is not None else "-",
                    )
                    for r in runs
                ),
            )
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="an existing database to use (its minstore_* tables are dropped!)")
    p.add_argument("--records", type=int, default=3000, help="records written per measurement (default 3000)")
    p.add_argument("--batches", default="1,8,32,128", help="batch sizes (default 1,8,32,128)")
    p.add_argument("--nodes", action="store_true", help="also POST/GET a node on sqlite and one on postgresql (bench/run.py)")
    p.add_argument("--duration", type=int, default=5, help="--nodes, --cluster: seconds of each measured wrk run")
    p.add_argument("--cluster", metavar="COUNTS", help="instead: 1, 2, 3 (COUNTS) real nodes over one database, and one on sqlite, POST and GET, CPU per request of each node and of the database")
    p.add_argument("--repeat", type=int, default=2, help="--cluster: runs of every configuration, the order reversed every other time (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="--cluster: seconds of wrk warm-up before each measured run (default 1)")
    p.add_argument("--connections", type=int, default=16, help="--cluster: wrk -c of each node's load (default 16)")
    p.add_argument("--seed", type=int, default=200, help="--cluster: records seeded in each configuration (default 200)")
    p.add_argument("--no-sqlite", dest="with_sqlite", action="store_false", help="--cluster: without the sqlite node")
    p.add_argument("--node-args", default="", help="--cluster: more options for every node, e.g. '--threads 4 --db-pool 2'")
    p.add_argument("--json", metavar="FILE", help="--cluster: write every run's figures to this JSON file")
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
        if args.cluster:
            if cluster is None:
                print("(--dsn: the database server's CPU is not measured, only the nodes')")
            results = run_cluster(args, dsn, cluster.data if cluster is not None else None, work)
            print()
            print(cluster_table(results))
            if args.json:
                import json

                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
            return
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
