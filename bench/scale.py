#!/usr/bin/env python3
"""
A node holding 1,000,000 records against one holding 10,000 (issue 10).

For each engine (``files`` and ``sqlite`` by default), fills a data
directory with ``--big`` records and another with ``--small`` records of
one collection (200-byte string values, uids ``u0000001`` ... inserted in a
shuffled order), through the engine's own ``write(batch)`` (batches of
``--batch`` WriteItems, ``forward=False``), and caches them under
``--cache`` (default /tmp/minstore-scale): a later run reuses them.  Then,
per engine, it starts a real node on each (``twistd -n minstore --storage
ENGINE --processes ''``, free loopback ports) and measures over HTTP:

  start-up   process spawn to the first 200 of GET /_node/health (each node
             started alone, twice: the median)
  GET        wrk -t2 -c32 --latency on GET /c/u{random stored uid}
             (a Lua script), p50 / p99 and requests/s
  RSS        VmRSS of the node (/proc/PID/status) after the GET runs
  listing    wrk -t1 -c4 on GET /c/?limit=100&after={cursor of a random
             stored uid}, while a paced writer POSTs ``--write-rate``
             new uids per second (interleaved with the stored ones) on the
             same node

The 1M and 10k nodes of an engine run side by side and are measured in
alternation (big, small, then small, big for ``--repeat 2``); every ratio is the
median of the ratios of runs made one after the other.  Targets: start-up
< 10 s, RSS < 400 MB at 1M, GET p99 at 1M <= 1.5x at 10k, listing p99 at
1M <= 2x at 10k.

The POSTs of the listing runs stay in the cached directories (a few
thousand records per run, interleaved, never among the uids the GETs and
cursors pick); ``--refill`` starts again from scratch.

    /work/venv/bin/python bench/scale.py                      # both engines, 1M and 10k
    /work/venv/bin/python bench/scale.py --engines sqlite --repeat 3
    /work/venv/bin/python bench/scale.py --fill-only          # just build the cache

Standard library and minstore (for the fill), plus ``wrk`` on PATH.  Every
process it starts is stopped at the end.  All traffic goes to 127.0.0.1.
"""

import argparse
import base64
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from run import BENCH_ERRORS, THREAD_ID_LUA, BenchError, free_port, parse_wrk, request  # noqa: E402

from minstore.launcher import node_child  # noqa: E402

COLLECTION = "c"
VALUE_BYTES = 200
FILL_FORMAT = 1  # bump when the fill changes: cached directories are rebuilt
TARGETS = {"startup_s": 10.0, "rss_mb": 400.0, "get_p99_ratio": 1.5, "list_ratio": 2.0}

GET_LUA = THREAD_ID_LUA + r"""
function init(args)
  n = tonumber(args[1])
  math.randomseed(os.time() * 1000 + id * 7919)
  for i = 1, 10 do math.random() end
end
function request()
  return wrk.format("GET", string.format("/%(collection)s/u%%07d", math.random(n)))
end
"""

LIST_LUA = THREAD_ID_LUA + r"""
function init(args)
  math.randomseed(os.time() * 1000 + id * 104729)
  for i = 1, 10 do math.random() end
end
function request()
  return wrk.format("GET", "/%(collection)s/?limit=100&after=" .. cursors[math.random(#cursors)])
end
"""


def uid_of(i):
    return "u%07d" % i


def encode_cursor(uid):
    """As minstore.node.encode_cursor: base64url of the uid, no padding."""
    return base64.urlsafe_b64encode(uid.encode("utf-8")).decode("ascii").rstrip("=")


def log(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# -- fill -----------------------------------------------------------------


def fill(engine, count, data_dir, batch_size, seed=1):
    """Write ``count`` records into a new data directory through the engine's write(batch)."""
    from minstore.interfaces import WriteItem
    from minstore.records import HybridLogicalClock, encode_record, make_record
    from minstore.storage import make_storage

    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    os.makedirs(data_dir)
    storage = make_storage(engine, data_dir)
    storage.open()
    clock = HybridLogicalClock("scalefill")
    order = list(range(1, count + 1))
    random.Random(seed).shuffle(order)
    filler = ("The quick brown fox jumps over the lazy dog. " * 6)
    started = last = time.monotonic()
    try:
        for start in range(0, count, batch_size):
            batch = []
            for i in order[start:start + batch_size]:
                uid = uid_of(i)
                value = (uid + " " + filler)[:VALUE_BYTES]
                record = make_record(COLLECTION, uid, value, clock.now(), time.time())
                batch.append(WriteItem(COLLECTION, uid, encode_record(record), False, record["version"], False, None))
            storage.write(batch)
            now = time.monotonic()
            if now - last >= 10 or start + batch_size >= count:
                last = now
                done = min(start + batch_size, count)
                log("   fill %s %d: %d/%d (%.0f%%) in %.0fs, %.0f records/s"
                    % (engine, count, done, count, 100.0 * done / count, now - started, done / (now - started)))
    finally:
        storage.close()
    return time.monotonic() - started


def du_mb(path):
    try:
        out = subprocess.run(["du", "-sm", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
        return int(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def cached_data_dir(args, engine, count):
    """The cached data directory of an engine and size, filled first when missing."""
    base = os.path.join(args.cache, "%s-%d" % (engine, count))
    data_dir = os.path.join(base, "data")
    marker = os.path.join(base, "filled.json")
    if not args.refill and os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("format") == FILL_FORMAT and info.get("count") == count:
            return data_dir, info
    os.makedirs(base, exist_ok=True)
    if os.path.exists(marker):
        os.unlink(marker)
    log("   filling %s with %d records (%s engine, batches of %d)" % (data_dir, count, engine, args.batch))
    seconds = fill(engine, count, data_dir, args.batch)
    info = {"format": FILL_FORMAT, "count": count, "engine": engine, "fill_seconds": seconds,
            "batch": args.batch, "disk_mb": du_mb(data_dir), "filled_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(marker, "w") as f:
        json.dump(info, f)
    log("   filled in %.0fs (%.0f records/s), %s MB on disk" % (seconds, count / seconds, info["disk_mb"]))
    return data_dir, info


# -- measuring ------------------------------------------------------------


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far (every thread)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def warm_page_cache(data_dir):
    """
    Read the node's database files (``*.sqlite3*`` at the top of its data
    directory, not the files engine's record files, which a GET does not
    read) once, into the page cache; seconds taken and MB read.

    The VM this was written on runs DAMON with the ``pageout`` action: it
    evicts page-cache pages left cold for a while, so a 525 MB database
    filled minutes before is read from the disk again, and GET p99 at 1M
    measured the disk (300-870 ms, 1,000-2,800 req/s) rather than the node.
    """
    t0 = time.monotonic()
    total = 0
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if ".sqlite3" in name and os.path.isfile(path):
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
    return time.monotonic() - t0, total / 1e6


def start_node(args, engine, data_dir, work, name):
    """A started node and its start-up time (spawn to the first 200 of /_node/health)."""
    extra = ["--storage", engine, "--processes", ""] + shlex.split(args.node_args)
    server = node_child(name, free_port(), data_dir, os.path.join(work, name + ".log"), args=extra,
                        python=args.python, checkout=REPO)
    t0 = time.monotonic()
    server.start()
    try:
        server.wait_ready(timeout=120, interval=0.02)
    except BaseException:
        server.stop()
        raise
    return server, time.monotonic() - t0


def run_wrk(argv, duration):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise BenchError("wrk failed (%d):\n%s" % (proc.returncode, output))
    figures = parse_wrk(output)
    if figures["non_2xx"] or figures["socket_errors"]:
        log("   WARNING: %d non-2xx, %d socket errors" % (figures["non_2xx"], figures["socket_errors"]))
    return figures


def wrk_get(args, port, count, lua, duration):
    return run_wrk(["wrk", "-t%d" % args.threads, "-c%d" % args.connections, "-d%ds" % duration,
                    "--timeout", "10s", "--latency", "-s", lua, "http://127.0.0.1:%d" % port, "--", str(count)],
                   duration)


def wrk_list(args, port, lua, duration):
    return run_wrk(["wrk", "-t1", "-c%d" % args.list_connections, "-d%ds" % duration, "--timeout", "10s",
                    "--latency", "-s", lua, "http://127.0.0.1:%d" % port], duration)


class Writer(threading.Thread):
    """POSTs new uids at ``rate``/s (open loop, paced), interleaved with the stored uids."""

    def __init__(self, port, rate, count, tag):
        threading.Thread.__init__(self, daemon=True)
        self.port, self.rate, self.count, self.tag = port, rate, count, tag
        self.stopping = threading.Event()
        self.latencies = []
        self.errors = 0

    def run(self):
        rnd = random.Random()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        interval = 1.0 / self.rate
        due = time.monotonic()
        k = 0
        try:
            while not self.stopping.is_set():
                k += 1
                uid = "%s-%s-%d" % (uid_of(rnd.randint(1, self.count)), self.tag, k)
                body = json.dumps({"value": "written during the listing run " + uid})
                t0 = time.monotonic()
                try:
                    status, _ = request(None, None, "POST", "/%s/%s" % (COLLECTION, uid), body,
                                        {"Content-Type": "application/json"}, conn=conn)
                    if status != 200:
                        self.errors += 1
                except (OSError, http.client.HTTPException):
                    self.errors += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.latencies.append(time.monotonic() - t0)
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
                else:
                    due = time.monotonic()  # fell behind: do not burst
        finally:
            conn.close()

    def stop(self):
        self.stopping.set()
        self.join(30)


def order(rep):
    """big, small; then small, big; ...: neither always goes first."""
    return ("big", "small") if rep % 2 == 0 else ("small", "big")


def median(values):
    return statistics.median(values) if values else None


def bench_engine(args, engine, dirs, work):
    """Every figure of one engine; dirs = {"big": (count, data_dir), "small": ...}."""
    result = {"engine": engine, "startup_s": {}, "rss_mb": {}, "get": {}, "list": {}, "writes": {}}
    lua_dir = os.path.join(work, "lua")
    os.makedirs(lua_dir, exist_ok=True)
    get_lua = os.path.join(lua_dir, "get.lua")
    with open(get_lua, "w") as f:
        f.write(GET_LUA % {"collection": COLLECTION})
    list_lua = {}
    for size, (count, _) in dirs.items():
        rnd = random.Random(7)
        cursors = [encode_cursor(uid_of(rnd.randint(1, count))) for _ in range(5000)]
        path = list_lua[size] = os.path.join(lua_dir, "list-%s.lua" % size)
        with open(path, "w") as f:
            f.write("cursors = {%s}\n" % ",".join('"%s"' % c for c in cursors))
            f.write(LIST_LUA % {"collection": COLLECTION})

    # Start-up: each node alone, twice (the first of the pair may read the files cold).
    servers = {}
    try:
        for attempt in range(args.startups):
            for size in ("big", "small"):
                count, data_dir = dirs[size]
                server, seconds = start_node(args, engine, data_dir, work, "%s-%s" % (engine, size))
                result["startup_s"].setdefault(size, []).append(seconds)
                log("   %s %-5s (%d records) up in %.2f s, RSS %.0f MB"
                    % (engine, size, count, seconds, rss_mb(server.proc.pid)))
                if attempt < args.startups - 1:
                    server.stop()
                else:
                    servers[size] = server

        # GET, alternating big and small.
        for rep in range(args.repeat):
            for size in order(rep):
                count, data_dir = dirs[size]
                port = servers[size].port
                if not args.cold:
                    seconds, mb = warm_page_cache(data_dir)
                    log("   %s %-5s database read into the page cache: %.0f MB in %.1f s" % (engine, size, mb, seconds))
                if args.warmup:
                    wrk_get(args, port, count, get_lua, args.warmup)
                cpu0 = cpu_seconds(servers[size].proc.pid)
                figures = wrk_get(args, port, count, get_lua, args.duration)
                figures["cpu_us"] = 1e6 * (cpu_seconds(servers[size].proc.pid) - cpu0) / max(1, figures.get("requests", 1))
                result["get"].setdefault(size, []).append(figures)
                log("   %s %-5s GET   %7.0f req/s  p50 %6.2f ms  p99 %7.2f ms  node CPU %4.0f us/GET"
                    % (engine, size, figures["rps"], figures["p50"], figures["p99"], figures["cpu_us"]))
        for size in ("big", "small"):
            result["rss_mb"][size] = rss_mb(servers[size].proc.pid)
            log("   %s %-5s RSS after GETs %.0f MB" % (engine, size, result["rss_mb"][size]))

        # Listing under a light write load, alternating.
        for rep in range(args.repeat):
            for size in order(rep):
                count, data_dir = dirs[size]
                port = servers[size].port
                if not args.cold:
                    warm_page_cache(data_dir)
                # A few connections, so one slow answer does not hold the rate back.
                writers = [Writer(port, args.write_rate / 4.0, count, "w%d-%d-%d-%d" % (os.getpid(), rep, k, time.time()))
                           for k in range(4)]
                for writer in writers:
                    writer.start()
                try:
                    if args.warmup:
                        wrk_list(args, port, list_lua[size], args.warmup)
                    cpu0 = cpu_seconds(servers[size].proc.pid)
                    figures = wrk_list(args, port, list_lua[size], args.duration)
                    figures["cpu_us"] = 1e6 * (cpu_seconds(servers[size].proc.pid) - cpu0) / max(1, figures.get("requests", 1))
                finally:
                    for writer in writers:
                        writer.stop()
                w = sorted(x for writer in writers for x in writer.latencies)
                errors = sum(writer.errors for writer in writers)
                figures["writes"] = len(w)
                figures["write_errors"] = errors
                figures["write_p50"] = 1000 * w[len(w) // 2] if w else None
                figures["write_p99"] = 1000 * w[int(len(w) * 0.99)] if w else None
                result["list"].setdefault(size, []).append(figures)
                log("   %s %-5s LIST  %7.0f req/s  p50 %6.2f ms  p99 %7.2f ms   with %d POSTs (%.0f/s, p50 %.1f ms, p99 %.1f ms, %d errors)"
                    % (engine, size, figures["rps"], figures["p50"], figures["p99"], len(w),
                       len(w) / float(args.duration + args.warmup), figures["write_p50"] or 0,
                       figures["write_p99"] or 0, errors))
        for size in ("big", "small"):
            result["rss_mb"][size + "_end"] = rss_mb(servers[size].proc.pid)
    finally:
        for server in servers.values():
            server.stop()
    return result


def summarise(result):
    """The figures set against the targets."""
    s = {}
    s["startup_big_s"] = median(result["startup_s"]["big"])
    s["startup_small_s"] = median(result["startup_s"]["small"])
    s["rss_big_mb"] = result["rss_mb"]["big"]
    s["rss_small_mb"] = result["rss_mb"]["small"]
    for op in ("get", "list"):
        big, small = result[op]["big"], result[op]["small"]
        for key in ("p50", "p99", "rps", "cpu_us"):
            s["%s_%s_big" % (op, key)] = median([f[key] for f in big])
            s["%s_%s_small" % (op, key)] = median([f[key] for f in small])
            s["%s_%s_ratio" % (op, key)] = median([b[key] / a[key] for b, a in zip(big, small) if a[key]])
    return s


def report(summaries, args, load_before, load_after, fills):
    lines = []
    lines.append("load average before %.2f, after %.2f (1 min); nproc %d; %s"
                 % (load_before, load_after, os.cpu_count() or 0, time.strftime("%Y-%m-%d %H:%M")))
    if args.node_args:
        lines.append("node options: --processes '' %s" % args.node_args)
    lines.append("GET: wrk -t%d -c%d -d%ds (after %ds warm-up); listing: wrk -t1 -c%d, %d POST/s alongside; median of %d alternating pairs"
                 % (args.threads, args.connections, args.duration, args.warmup, args.list_connections,
                    args.write_rate, args.repeat))
    lines.append("page cache: %s" % ("left as it was (--cold)" if args.cold else
                                     "the database files read into it before each measured run"))
    for key, info in sorted(fills.items()):
        lines.append("- fill %s: %d records in %.0f s (%.0f records/s), %s MB on disk"
                     % (key, info["count"], info["fill_seconds"], info["count"] / info["fill_seconds"], info.get("disk_mb")))
    lines.append("")
    lines.append("| engine | start-up 1M / 10k | RSS 1M / 10k | GET p50 1M / 10k | GET p99 1M / 10k | GET p99 ratio | GET req/s 1M / 10k | list p50 1M / 10k | list p99 1M / 10k | list p50 ratio | list p99 ratio |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for engine, s in summaries.items():
        lines.append(
            "| %s | %.2f s / %.2f s | %.0f / %.0f MB | %.2f / %.2f ms | %.2f / %.2f ms | %.2fx | %.0f / %.0f | %.2f / %.2f ms | %.2f / %.2f ms | %.2fx | %.2fx |"
            % (engine, s["startup_big_s"], s["startup_small_s"], s["rss_big_mb"], s["rss_small_mb"],
               s["get_p50_big"], s["get_p50_small"], s["get_p99_big"], s["get_p99_small"], s["get_p99_ratio"],
               s["get_rps_big"], s["get_rps_small"], s["list_p50_big"], s["list_p50_small"],
               s["list_p99_big"], s["list_p99_small"], s["list_p50_ratio"], s["list_p99_ratio"]))
    lines.append("")
    lines.append("Node CPU per request (user + system, /proc; includes the writes' share during the listing runs):")
    lines.append("")
    lines.append("| engine | GET µs 1M / 10k | ratio | listing µs 1M / 10k | ratio |")
    lines.append("|---|---:|---:|---:|---:|")
    for engine, s in summaries.items():
        lines.append("| %s | %.0f / %.0f | %.2fx | %.0f / %.0f | %.2fx |" % (
            engine, s["get_cpu_us_big"], s["get_cpu_us_small"], s["get_cpu_us_ratio"],
            s["list_cpu_us_big"], s["list_cpu_us_small"], s["list_cpu_us_ratio"]))
    lines.append("")
    lines.append("| engine | start-up < 10 s | RSS < 400 MB | GET p99 1M/10k <= 1.5 | listing p99 1M/10k <= 2 |")
    lines.append("|---|---|---|---|---|")
    for engine, s in summaries.items():
        ok = lambda v, t: "%s %s" % (("%.2f" % v), "ok" if v <= t else "MISSED")  # noqa: E731
        lines.append("| %s | %s | %s | %s | %s |" % (
            engine, ok(s["startup_big_s"], TARGETS["startup_s"]), ok(s["rss_big_mb"], TARGETS["rss_mb"]),
            ok(s["get_p99_ratio"], TARGETS["get_p99_ratio"]), ok(s["list_p99_ratio"], TARGETS["list_ratio"])))
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="files,sqlite", help="engines to measure (default files,sqlite)")
    p.add_argument("--big", type=int, default=1000000, help="records of the big node (default 1,000,000)")
    p.add_argument("--small", type=int, default=10000, help="records of the small node (default 10,000)")
    p.add_argument("--batch", type=int, default=1000, help="WriteItems per write(batch) of the fill (default 1000)")
    p.add_argument("--cache", default="/tmp/minstore-scale", help="where the filled data directories are kept (default /tmp/minstore-scale)")
    p.add_argument("--refill", action="store_true", help="fill the data directories again even when cached")
    p.add_argument("--fill-only", action="store_true", help="fill (or check) the cache and stop")
    p.add_argument("--python", default=sys.executable, help="interpreter running the nodes (default: this one)")
    p.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up before each (default 3)")
    p.add_argument("--repeat", type=int, default=2, help="alternating big/small pairs per measure (default 2)")
    p.add_argument("--startups", type=int, default=2, help="start-ups per node (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t of the GET runs (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c of the GET runs (default 32)")
    p.add_argument("--list-connections", type=int, default=4, help="wrk -c of the listing runs (default 4)")
    p.add_argument("--write-rate", type=int, default=50, help="POST/s during the listing runs (default 50)")
    p.add_argument("--node-args", default="", help="more options for every node, e.g. '--read-cache-size 1' (one string)")
    p.add_argument("--cold", action="store_true",
                   help="do not read the database files into the page cache before each measured run"
                        " (see warm_page_cache: a VM evicting cold pages makes the 1M GETs measure the disk)")
    p.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    return p.parse_args(argv)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    fills = {}
    dirs = {}
    for engine in engines:
        dirs[engine] = {}
        for size, count in (("big", args.big), ("small", args.small)):
            data_dir, info = cached_data_dir(args, engine, count)
            fills["%s-%d" % (engine, count)] = info
            dirs[engine][size] = (count, data_dir)
    if args.fill_only:
        return 0
    if shutil.which("wrk") is None:
        log("scale.py: wrk is not on PATH (apt-get install wrk)")
        return 2
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="minstore-scale-")
    results = {}
    summaries = {}
    try:
        for engine in engines:
            log("== %s" % engine)
            results[engine] = bench_engine(args, engine, dirs[engine], work)
            summaries[engine] = summarise(results[engine])
    except BENCH_ERRORS as e:
        log("scale.py: %s" % e)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()[0]
    print(report(summaries, args, load_before, load_after, fills))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "summaries": summaries, "fills": fills,
                       "load": [load_before, load_after], "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
