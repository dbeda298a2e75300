#!/usr/bin/env python3
"""
Benchmark the cache strategy (cache=1): a front in front of two dependants.

Starts, from this checkout, two dependants (storage --storage, default
files; empty servers.list) and two fronts (memory storage, servers.list
naming both dependants): the *hit* front (--cache-ttl 600, so every entry
stays fresh for the run) and the *miss* front (--cache-size 1: no record
fits, so every GET goes to the dependants).  Seeds records through the hit
front (each processed by one dependant, replicated to the other, cached by
the front), then measures with wrk, in the same run:

  hits    GET /bench/seed-{i}?cache=1 on the hit front    (wrk -t2 -c32)
  direct  GET /bench/seed-{i} on a dependant              (wrk -t2 -c32)
          alternated for --rounds rounds; the medians and hits/direct
          (target: at least 1.5)
  miss    GET /bench/seed-{i}?cache=1 on the miss front   (wrk -t1 -c1)
  direct1 GET /bench/seed-{i} on a dependant              (wrk -t1 -c1)
          the miss path's added latency: miss minus direct1, p50 and p99

Each wrk client rotates over the seeded uids.  Every process it starts is
stopped at the end.  Loopback only.  Uses bench/run.py's helpers.

    python3 bench/cache_bench.py
    python3 bench/cache_bench.py --duration 5 --rounds 1 --json cache.json
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import (  # noqa: E402  (bench/run.py, beside this file)
    BENCH_ERRORS,
    REPO,
    THREAD_ID_LUA,
    TEXT,
    BenchError,
    _raise_exit,
    free_port,
    interpreter_info,
    parse_wrk,
    request,
)

from minstore.launcher import node_child  # noqa: E402  (run.py put the checkout on sys.path)

COLLECTION = "bench"
TARGET_RATIO = 1.5

# GET /bench/seed-{i}{suffix}, i rotating over 1..count, each thread at its own offset.
GET_LUA = THREAD_ID_LUA + r"""
function init(args)
  count = tonumber(args[1])
  suffix = args[2] or ""
  i = (id * 7919) %% count
end
function request()
  i = i %% count + 1
  return wrk.format("GET", "/%(collection)s/seed-" .. i .. suffix)
end
"""


def seed_through(port, count, workers=8):
    """POST seed-1 .. seed-COUNT through a front (cache=1)."""

    def part(indexes):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in indexes:
                body = json.dumps({"value": "%s seed %d" % (TEXT, i)})
                status, data = request(
                    None, None, "POST", "/%s/seed-%d?cache=1" % (COLLECTION, i), body,
                    {"Content-Type": "application/json"}, conn=conn,
                )
                if status != 200:
                    raise BenchError("seeding seed-%d through the front: %d %r" % (i, status, data[:200]))
        finally:
            conn.close()

    indexes = list(range(1, count + 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(part, indexes[k::workers]) for k in range(workers)]:
            f.result()


def wrk(port, script, count, suffix, duration, threads, connections, verbose=False):
    argv = [
        "wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration,
        "--timeout", "10s", "--latency",
        "-s", script, "http://127.0.0.1:%d" % port, "--", str(count), suffix,
    ]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
    output = proc.stdout.decode("utf-8", "replace")
    if verbose:
        sys.stderr.write(output)
    if proc.returncode != 0:
        raise BenchError("wrk failed (%d):\n%s" % (proc.returncode, output))
    result = parse_wrk(output)
    if result["non_2xx"] or result["socket_errors"]:
        raise BenchError("wrk saw errors on port %d:\n%s" % (port, output))
    return result


def cache_status(port):
    status, body = request("127.0.0.1", port, "GET", "/_node/status")
    return json.loads(body)["cache"] if status == 200 else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternated hits/direct rounds (default 3)")
    p.add_argument("--seed", type=int, default=1000, help="records seeded, and rotated over (default 1000)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t of the throughput runs (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c of the throughput runs (default 32)")
    p.add_argument("--storage", choices=("files", "memory"), default="files", help="the dependants' storage (default files)")
    p.add_argument("--python", default=sys.executable, help="interpreter running the nodes (default: this one)")
    p.add_argument("--json", metavar="FILE", help="write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs)")
    p.add_argument("--verbose", action="store_true", help="print wrk's whole output")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.rounds <= 0 or args.seed <= 0 or args.warmup < 0:
        p.error("--duration, --rounds and --seed must be above 0, --warmup at least 0")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        sys.stderr.write("cache_bench.py: wrk is not on PATH (apt-get install wrk)\n")
        return 2
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)

    def log(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log("cache_bench.py: WARNING: load average %.2f before the run: something else is "
            "using the cores, and the figures will show it" % load_before[0])
    work = tempfile.mkdtemp(prefix="minstore-cache-bench-")
    script = os.path.join(work, "get.lua")
    with open(script, "w") as f:
        f.write(GET_LUA % {"collection": COLLECTION})
    ports = {name: free_port() for name in ("dep_a", "dep_b", "front", "miss_front")}
    while len(set(ports.values())) < len(ports):
        ports = {name: free_port() for name in ports}
    empty = os.path.join(work, "dependant.list")
    with open(empty, "w") as f:
        f.write("# a dependant lists nobody: the front replicates\n")
    front_list = os.path.join(work, "front.list")
    with open(front_list, "w") as f:
        f.write("http://127.0.0.1:%d\nhttp://127.0.0.1:%d\n" % (ports["dep_a"], ports["dep_b"]))
    specs = {
        "dep_a": (empty, ["--storage", args.storage]),
        "dep_b": (empty, ["--storage", args.storage]),
        "front": (front_list, ["--storage", "memory", "--cache-ttl", "600"]),
        "miss_front": (front_list, ["--storage", "memory", "--cache-size", "1"]),
    }
    servers = {
        name: node_child(
            name, ports[name], os.path.join(work, name), os.path.join(work, name + ".log"),
            servers=servers_file, args=extra, python=args.python, checkout=REPO,
        )
        for name, (servers_file, extra) in specs.items()
    }
    info = interpreter_info(args.python)
    figures = {"interpreter": info, "nproc": os.cpu_count(), "seeded": args.seed}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready(timeout=60.0)
        log("== %s: dependants on %d and %d, fronts on %d (hits) and %d (misses)"
            % (info, ports["dep_a"], ports["dep_b"], ports["front"], ports["miss_front"]))
        t0 = time.monotonic()
        seed_through(ports["front"], args.seed)
        log("   seeded %d records through the front in %.1fs" % (args.seed, time.monotonic() - t0))

        def run(name, port, suffix, duration, threads, connections):
            return wrk(port, script, args.seed, suffix, duration, threads, connections, args.verbose)

        if args.warmup:
            run("hits", ports["front"], "?cache=1", args.warmup, args.threads, args.connections)
            run("direct", ports["dep_a"], "", args.warmup, args.threads, args.connections)
        before = cache_status(ports["front"])
        hits, direct = [], []
        for r in range(args.rounds):
            hits.append(run("hits", ports["front"], "?cache=1", args.duration, args.threads, args.connections))
            direct.append(run("direct", ports["dep_a"], "", args.duration, args.threads, args.connections))
            log("   round %d: hits %.0f req/s, direct %.0f req/s"
                % (r + 1, hits[-1]["rps"], direct[-1]["rps"]))
        after = cache_status(ports["front"])
        asked = after["misses"] + after["revalidations"] - before["misses"] - before["revalidations"]
        if asked:
            raise BenchError("the hits run asked the dependants %d times: not all hits" % asked)

        if args.warmup:
            run("miss", ports["miss_front"], "?cache=1", args.warmup, 1, 1)
        miss = run("miss", ports["miss_front"], "?cache=1", args.duration, 1, 1)
        direct1 = run("direct1", ports["dep_a"], "", args.duration, 1, 1)
        miss_status = cache_status(ports["miss_front"])
        if miss_status["hits"]:
            raise BenchError("the miss front served %d hits" % miss_status["hits"])
    except BENCH_ERRORS as e:
        log("cache_bench.py: %s" % e)
        return 1
    except KeyboardInterrupt:
        log("cache_bench.py: interrupted; servers stopped")
        return 130
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log("   kept %s" % work)

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    figures.update({
        "hits_rps": median(hits, "rps"),
        "direct_rps": median(direct, "rps"),
        "hits_p50_ms": median(hits, "p50"),
        "hits_p99_ms": median(hits, "p99"),
        "direct_p50_ms": median(direct, "p50"),
        "direct_p99_ms": median(direct, "p99"),
        "miss_p50_ms": miss["p50"],
        "miss_p99_ms": miss["p99"],
        "direct1_p50_ms": direct1["p50"],
        "direct1_p99_ms": direct1["p99"],
        "miss_rps_c1": miss["rps"],
        "direct_rps_c1": direct1["rps"],
        "rounds": [{"hits": h["rps"], "direct": d["rps"]} for h, d in zip(hits, direct)],
    })
    figures["ratio"] = figures["hits_rps"] / figures["direct_rps"]
    figures["load_average_before"] = load_before[0]
    figures["load_average_after"] = os.getloadavg()[0]
    figures["miss_added_p50_ms"] = figures["miss_p50_ms"] - figures["direct1_p50_ms"]
    figures["miss_added_p99_ms"] = figures["miss_p99_ms"] - figures["direct1_p99_ms"]

    print()
    print("%s, nproc %d, %d records, storage of the dependants: %s; load average %.2f before, %.2f after"
          % (info, os.cpu_count(), args.seed, args.storage,
             figures["load_average_before"], figures["load_average_after"]))
    print("throughput, wrk -t%d -c%d -d%ds, median of %d alternated rounds:"
          % (args.threads, args.connections, args.duration, args.rounds))
    print("  GET through the front, cache hits  %9.0f req/s   p50 %6.2f ms  p99 %6.2f ms"
          % (figures["hits_rps"], figures["hits_p50_ms"], figures["hits_p99_ms"]))
    print("  GET straight from a dependant      %9.0f req/s   p50 %6.2f ms  p99 %6.2f ms"
          % (figures["direct_rps"], figures["direct_p50_ms"], figures["direct_p99_ms"]))
    print("  hits / direct                      %9.2fx  (target >= %.1fx: %s)"
          % (figures["ratio"], TARGET_RATIO, "met" if figures["ratio"] >= TARGET_RATIO else "NOT met"))
    print("miss path, wrk -t1 -c1 -d%ds (one request at a time):" % args.duration)
    print("  GET through the front, every one a miss  p50 %6.2f ms  p99 %6.2f ms"
          % (figures["miss_p50_ms"], figures["miss_p99_ms"]))
    print("  GET straight from a dependant            p50 %6.2f ms  p99 %6.2f ms"
          % (figures["direct1_p50_ms"], figures["direct1_p99_ms"]))
    print("  added by the front on a miss             p50 %+6.2f ms  p99 %+6.2f ms"
          % (figures["miss_added_p50_ms"], figures["miss_added_p99_ms"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
