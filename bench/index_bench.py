#!/usr/bin/env python3
"""
Filtered listings on a secondary index, against an unfiltered listing.

For each engine and size: seeds N records straight through the engine
(``{"g": i % 100, ...}``: 100 distinct values, 1 % selectivity), starts a
real node from this checkout with ``--indexes bench:value.g`` (so the index
is built in the background at start, and timed), then measures sequential
HTTP requests on one keep-alive connection: the first page of 100 of one
value (``?value.g=V&limit=100``, V rotating) and the first page of 100 of
the collection (``?limit=100``).  Prints p50/p99 in ms.  Loopback only.

    /work/venv/bin/python bench/index_bench.py --sizes 10000,100000 --engines sqlite,files
"""

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from minstore.interfaces import WriteItem  # noqa: E402
from minstore.launcher import free_port, node_child  # noqa: E402
from minstore.records import encode_record, make_record  # noqa: E402
from minstore.storage import make_storage  # noqa: E402


def seed(engine, data, n):
    storage = make_storage(engine, data)
    storage.open()
    t = time.perf_counter()
    for start in range(0, n, 2000):
        batch = []
        for i in range(start, min(n, start + 2000)):
            uid = "r%07d" % i
            version = "%013d-000000-seed" % (i + 1)
            record = make_record("bench", uid, {"g": i % 100, "title": "record %d" % i, "pad": "x" * 100}, version, 1.0)
            batch.append(WriteItem("bench", uid, encode_record(record), False, version, True, None))
        storage.write(batch)
    storage.close()
    return time.perf_counter() - t


def get(conn, path):
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    return response.status, body


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def measure(conn, paths, rounds):
    times = []
    for i in range(rounds):
        path = paths[i % len(paths)]
        t = time.perf_counter()
        status, body = get(conn, path)
        times.append((time.perf_counter() - t) * 1000)
        if status != 200:
            raise SystemExit("%s: %d %s" % (path, status, body[:200]))
    return percentile(times, 50), percentile(times, 99)


def run(engine, n, rounds, python):
    work = tempfile.mkdtemp(prefix="index-bench-")
    data = os.path.join(work, "data")
    try:
        seconds = seed(engine, data, n)
        port = free_port()
        node = node_child("node", port, data, os.path.join(work, "node.log"), python=python, checkout=REPO,
                          args=["--storage", engine, "--processes", "", "--indexes", "bench:value.g"])
        started = time.perf_counter()
        node.start()
        try:
            node.wait_ready(timeout=600, interval=0.05)
            conn = None
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    status, body = get(conn, "/_node/status")
                    if json.loads(body)["indexes"]["bench:value.g"]["state"] == "ready":
                        break
                except (OSError, http.client.HTTPException):
                    conn = None
                time.sleep(0.05)
            build = time.perf_counter() - started
            status, body = get(conn, "/bench/?value.g=42&limit=100")
            page = json.loads(body)["items"]
            assert len(page) == min(100, n // 100) and all(r["value"]["g"] == 42 for r in page), len(page)
            filtered = measure(conn, ["/bench/?value.g=%d&limit=100" % v for v in range(100)], rounds)
            plain = measure(conn, ["/bench/?limit=100"], rounds)
            return {"engine": engine, "records": n, "seed_s": round(seconds, 1), "start_and_build_s": round(build, 2),
                    "filtered_p50_ms": round(filtered[0], 2), "filtered_p99_ms": round(filtered[1], 2),
                    "plain_p50_ms": round(plain[0], 2), "plain_p99_ms": round(plain[1], 2)}
        finally:
            node.stop(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--engines", default="sqlite,files")
    p.add_argument("--rounds", type=int, default=500, help="requests measured per kind (default 500)")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args()
    for engine in args.engines.split(","):
        for n in [int(x) for x in args.sizes.split(",")]:
            print(json.dumps(run(engine, n, args.rounds, args.python)), flush=True)


if __name__ == "__main__":
    main()
