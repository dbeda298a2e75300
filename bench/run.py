#!/usr/bin/env python3
"""
Benchmark a minstore node against a bare Klein app (bench/bare_klein.py).

Starts a real node from this checkout (fresh temporary data directory) and
the bare app on free loopback ports, waits until both answer, seeds records,
then, for each operation and each server, runs ``wrk -t2 -c32 --latency``
once as a warm-up and once measured:

  get   GET /bench/seed-1 (an existing record)
  post  POST /bench/{unique uid} of a new ~200-byte JSON record
  put   PUT /bench/seed-{i} with a new ~200-byte value, rotating over the seeds

and prints requests/s, p50 and p99 of both servers, the ratio node/bare,
and the CPU time each server spent per request (user + system, from /proc),
which moves far less than requests/s when other processes share the cores;
the node's children (its file writer) are counted
apart, as ``(+N)``, and the ratio by CPU leaves them out.
``--repeat N`` measures everything N times, node and bare back to back (in
the reverse order every other time), and reports medians.

``--targets node,etcd`` (or ``node,bare,etcd``) also starts etcd (Debian's
``etcd-server``, ``--etcd``) on loopback with a temporary data directory,
and measures its v3 JSON gateway in the same run: ``get`` is ``POST
/v3/kv/range`` of a seeded key, ``post`` a ``POST /v3/kv/put`` of a new key
with a ~200-byte value (etcd syncs its WAL before answering: durable, as
the node's POST is), ``put`` a put of a seeded key; the node/etcd ratio of
each operation is the median of the ratios of runs made back to back.
``--also-storage sqlite`` runs a second node with another engine beside
the first (its own data directory, seeded the same way), measured in the
same alternation.  Every process it starts is stopped at the end, whatever
happens.  All traffic goes to 127.0.0.1.  Standard library only, plus
``wrk`` on PATH.  The servers run under ``--python`` (default: the
interpreter running this script), which must have minstore's dependencies.

    /tmp/venv/bin/python bench/run.py                  # CPython
    python3 bench/run.py --python /tmp/pypy-venv/bin/python
    /tmp/venv/bin/python bench/run.py --compare-pypy --repeat 3 --warmup 5
    /tmp/venv/bin/python bench/run.py --json out.json --duration 15
    /tmp/venv/bin/python bench/run.py --targets node,etcd --also-storage sqlite --ops get,post --repeat 3

Results and the profiling findings: bench/RESULTS.md.
"""

import argparse
import base64
import concurrent.futures
import http.client
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# How to start a node (argv, environment, health wait): one place for the
# benchmarks and the integration tests.  Standard library only.
from minstore.launcher import Child, NodeStartError, free_port, node_argv, node_environ  # noqa: E402
COLLECTION = "bench"
OPERATIONS = ("get", "post", "put")
DEFAULT_PYPY = "/tmp/pypy-venv/bin/python"

#: About 200 bytes of English, so the ``lang`` process does real work.
TEXT = (
    "The quick brown fox jumps over the lazy dog while a patient engineer "
    "measures how many small records per second a replicated store keeps "
    "durable on a modest machine with two cores and one disk"
)

#: The preamble of wrk scripts that number their threads (``id``, from 1).
THREAD_ID_LUA = r"""
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
"""

# A new record per request: uids unique per run (prefix), thread and request.
POST_LUA = THREAD_ID_LUA + r"""
function init(args)
  prefix = args[1] or "r"
  text = args[2] or "x"
  counter = 0
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  local uid = prefix .. "-" .. id .. "-" .. counter
  local body = '{"value": "' .. text .. " " .. uid .. '"}'
  return wrk.format("POST", "/%(collection)s/" .. uid, nil, body)
end
"""

# A changed value for an existing record, rotating over the seeded uids; each
# thread starts at its own offset.
PUT_LUA = THREAD_ID_LUA + r"""
function init(args)
  prefix = args[1] or "r"
  text = args[2] or "x"
  seeds = tonumber(args[3] or "1000")
  counter = 0
  pos = ((id - 1) * 7919) %% seeds
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  pos = pos %% seeds + 1
  local uid = "seed-" .. pos
  local body = '{"value": "' .. text .. " " .. prefix .. "-" .. id .. "-" .. counter .. '"}'
  return wrk.format("PUT", "/%(collection)s/" .. uid, nil, body)
end
"""


# etcd's v3 JSON gateway takes keys and values in base64.
_B64_LUA = r"""
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = b64chars:sub(c1 + 1, c1 + 1) .. b64chars:sub(c2 + 1, c2 + 1)
      .. (b and b64chars:sub(c3 + 1, c3 + 1) or "=") .. (c and b64chars:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end
"""

# A put of a new key per request (as POST_LUA's uids) with a ~200-byte value.
ETCD_POST_LUA = _B64_LUA + THREAD_ID_LUA + r"""
function init(args)
  prefix = args[1] or "r"
  text = args[2] or "x"
  counter = 0
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  local uid = prefix .. "-" .. id .. "-" .. counter
  local body = '{"key": "' .. b64("bench/" .. uid) .. '", "value": "' .. b64(text .. " " .. uid) .. '"}'
  return wrk.format("POST", "/v3/kv/put", nil, body)
end
"""

# A put of a new value for a seeded key, rotating over them.
ETCD_PUT_LUA = _B64_LUA + THREAD_ID_LUA + r"""
function init(args)
  prefix = args[1] or "r"
  text = args[2] or "x"
  seeds = tonumber(args[3] or "1000")
  counter = 0
  pos = ((id - 1) * 7919) % seeds
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  pos = pos % seeds + 1
  local body = '{"key": "' .. b64("bench/seed-" .. pos) .. '", "value": "'
    .. b64(text .. " " .. prefix .. "-" .. id .. "-" .. counter) .. '"}'
  return wrk.format("POST", "/v3/kv/put", nil, body)
end
"""


def etcd_get_lua():
    """A range of one seeded key, the same request every time."""
    body = json.dumps({"key": base64.b64encode(b"bench/seed-1").decode("ascii")})
    return (
        'wrk.method = "POST"\nwrk.path = "/v3/kv/range"\nwrk.body = %s\n'
        'wrk.headers["Content-Type"] = "application/json"\n' % json.dumps(body)
    )


class BenchError(Exception):
    pass


#: What a benchmark reports and stops on: its own errors, and a server that
#: did not start (L{minstore.launcher.NodeStartError}).
BENCH_ERRORS = (BenchError, NodeStartError)


# -- processes ------------------------------------------------------------


#: A child process in its own session (a node, etcd, the bare app), its
#: output in a log file, stopped with SIGTERM then SIGKILL.
Server = Child


def request(host, port, method, path, body=None, headers=None, timeout=10, conn=None):
    own = conn is None
    if own:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def seed(port, count, workers=8):
    """POST seed-1 .. seed-COUNT, with a few connections in parallel."""

    def part(indexes):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in indexes:
                body = json.dumps({"value": "%s seed %d" % (TEXT, i)})
                status, data = request(
                    None, None, "POST", "/%s/seed-%d" % (COLLECTION, i), body,
                    {"Content-Type": "application/json"}, conn=conn,
                )
                if status != 200 and not (status == 400 and b"record_exists" in data):
                    raise BenchError("seeding seed-%d: %d %r" % (i, status, data[:200]))
        finally:
            conn.close()

    indexes = list(range(1, count + 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(part, indexes[k::workers]) for k in range(workers)]:
            f.result()


def seed_etcd(port, count, workers=8):
    """Put bench/seed-1 .. bench/seed-COUNT into etcd."""

    def part(indexes):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in indexes:
                body = json.dumps({
                    "key": base64.b64encode(b"bench/seed-%d" % i).decode("ascii"),
                    "value": base64.b64encode(("%s seed %d" % (TEXT, i)).encode("utf-8")).decode("ascii"),
                })
                status, data = request(None, None, "POST", "/v3/kv/put", body,
                                       {"Content-Type": "application/json"}, conn=conn)
                if status != 200:
                    raise BenchError("seeding etcd bench/seed-%d: %d %r" % (i, status, data[:200]))
        finally:
            conn.close()

    indexes = list(range(1, count + 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(part, indexes[k::workers]) for k in range(workers)]:
            f.result()


def etcd_argv(binary, data_dir, client_port, peer_port):
    client = "http://127.0.0.1:%d" % client_port
    peer = "http://127.0.0.1:%d" % peer_port
    return [
        binary, "--name", "bench", "--data-dir", data_dir,
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", "bench=" + peer, "--initial-cluster-state", "new",
        "--logger", "zap", "--log-level", "warn",
    ]


def children_cpu_seconds(pid):
    """User + system CPU seconds used so far by a process's children (the
    node's file writer), or None."""
    try:
        pids = set()
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                pids.update(int(p) for p in f.read().split())
        total = 0.0
        for child in pids:
            user, system = cpu_seconds(child) or (0.0, 0.0)
            total += user + system
        return total
    except (OSError, ValueError):
        return None


def cpu_seconds(pid):
    """(user, system) CPU seconds used so far by a process (all its threads), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = float(os.sysconf("SC_CLK_TCK"))
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, ValueError, IndexError):
        return None


#: (name in the figures, metric series prefix) read from the node's /metrics.
NODE_SERIES = (
    ("batch", 'minstore_write_batch_size_'),
    ("write", 'minstore_storage_operation_duration_seconds_{kind}{{operation="write"}}'),
    ("get", 'minstore_storage_operation_duration_seconds_{kind}{{operation="get"}}'),
)


def node_stats(port):
    """{name: (sum, count)} of a few of the node's histograms, or None."""
    try:
        status, text = request("127.0.0.1", port, "GET", "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    values = {}
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = value
    found = {}
    for name, series in NODE_SERIES:
        try:
            found[name] = tuple(
                float(values[series.format(kind=kind) if "{kind}" in series else series + kind])
                for kind in ("sum", "count")
            )
        except (KeyError, ValueError):
            continue
    return found


def node_deltas(before, after):
    """Average batch size, storage write and read time (ms) between two node_stats."""
    out = {}
    if not before or not after:
        return out
    for name, key, scale in (("batch", "avg_batch", 1.0), ("write", "avg_write_ms", 1000.0), ("get", "avg_read_ms", 1000.0)):
        if name in before and name in after and after[name][1] > before[name][1]:
            out[key] = scale * (after[name][0] - before[name][0]) / (after[name][1] - before[name][1])
            if name == "write":
                out["writes"] = after[name][1] - before[name][1]
            if name == "get":
                out["reads"] = after[name][1] - before[name][1]
    return out


# -- wrk ------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
    if not m:
        raise BenchError("cannot read a wrk duration %r" % text)
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(output):
    """requests/s, p50/p75/p90/p99 (ms), request count, non-2xx/3xx, socket errors."""
    result = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not m:
        raise BenchError("no Requests/sec in wrk output:\n%s" % output)
    result["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(r"^\s+%s(?:\.0+)?%%\s+([\d.]+\w+)" % pct, output, re.M)
        if m:
            result["p" + pct] = _to_ms(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    if m:
        result["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if m:
        result["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        result["socket_errors"] = sum(int(x) for x in m.groups())
    return result


def start_py_spy(args, pid, operation, duration):
    """py-spy sampling the node (the thread holding the GIL) for the measured run; stops by itself."""
    os.makedirs(args.py_spy, exist_ok=True)
    out = os.path.join(os.path.abspath(args.py_spy), "%s.txt" % operation)
    argv = [args.py_spy_bin, "record", "-p", str(pid), "-d", str(duration), "-r", "250",
            "-f", "raw", "-o", out, "--threads", "--gil", "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True), out


def run_wrk(args, port, operation, duration, tag, lua_dir, target="node"):
    url = "http://127.0.0.1:%d" % port
    argv = [
        "wrk",
        "-t%d" % args.threads,
        "-c%d" % args.connections,
        "-d%ds" % duration,
        "--timeout", "10s",
        "--latency",
    ]
    if target == "etcd":
        argv += ["-s", os.path.join(lua_dir, "etcd-%s.lua" % operation), url, "--", tag, TEXT, str(args.seed)]
    elif operation == "get":
        argv.append(url + "/%s/seed-1" % COLLECTION)
    else:
        script = os.path.join(lua_dir, operation + ".lua")
        argv += ["-s", script, url, "--", tag, TEXT]
        if operation == "put":
            argv.append(str(args.seed))
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60
    )
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise BenchError("wrk failed (%d):\n%s" % (proc.returncode, output))
    return parse_wrk(output), output


# -- one interpreter ------------------------------------------------------


def git_revision():
    """The checkout's commit, with the paths of minstore/ changed since it."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "minstore", "twisted"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30).stdout.decode().split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (" + uncommitted changes in " + ", ".join(changed) if changed else "")


def interpreter_info(python):
    code = (
        "import platform,sys;print(platform.python_implementation()+' '"
        "+platform.python_version()+(' (PyPy '+'.'.join(map(str,sys.pypy_version_info[:3]))+')'"
        " if hasattr(sys,'pypy_version_info') else ''))"
    )
    out = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, timeout=60, check=True)
    return out.stdout.decode().strip()


def bench_interpreter(args, python, log):
    """Run every operation against a node and the bare app under ``python``."""
    info = interpreter_info(python)
    log("== %s (%s)" % (info, python))
    work = tempfile.mkdtemp(prefix="minstore-bench-")
    lua_dir = os.path.join(work, "lua")
    os.mkdir(lua_dir)
    for name, text in (("post", POST_LUA), ("put", PUT_LUA)):
        with open(os.path.join(lua_dir, name + ".lua"), "w") as f:
            f.write(text % {"collection": COLLECTION})
    for name, text in (("etcd-post", ETCD_POST_LUA), ("etcd-put", ETCD_PUT_LUA), ("etcd-get", etcd_get_lua())):
        with open(os.path.join(lua_dir, name + ".lua"), "w") as f:
            f.write(text)

    env = node_environ(checkout=REPO)

    def bench_node_argv(storage, data, port, profile):
        twistd_args = []
        if profile:
            twistd_args = ["--profile", os.path.abspath(args.profile), "--profiler", "cprofile", "--savestats"]
        extra = ["--storage", storage]
        if args.processes is not None:
            extra.append("--processes=" + args.processes)
        extra += shlex.split(args.node_args or "")
        return node_argv(port, os.path.join(work, data), None, extra, python, twistd_args)

    # The nodes (the first with --storage, one more per --also-storage), then bare, then etcd.
    nodes = []
    if "node" in args.targets:
        nodes = [("node", args.storage)] + [("node-" + s, s) for s in args.also_storage]
    targets = [n for n, _ in nodes] + [t for t in ("bare", "etcd") if t in args.targets]
    servers = {}
    results = {"interpreter": info, "python": python, "operations": {}, "targets": targets,
               "storages": dict(nodes)}
    try:
        for name, storage in nodes:
            port = free_port()
            servers[name] = Server(
                "node (%s)" % storage, bench_node_argv(storage, "data-" + name, port, args.profile and name == "node"),
                port, os.path.join(work, name + ".log"), env, REPO,
            )
        if "etcd" in targets:
            port = free_port()
            servers["etcd"] = Server(
                "etcd", etcd_argv(args.etcd, os.path.join(work, "etcd"), port, free_port()),
                port, os.path.join(work, "etcd.log"),
            )
        if "bare" in targets:
            port = free_port()
            servers["bare"] = Server(
                "bare klein",
                [python, os.path.join(HERE, "bare_klein.py"), str(port)],
                port, os.path.join(work, "bare.log"), env, REPO,
            )
        for server in servers.values():
            server.start()
        for name, server in servers.items():
            server.wait_ready("/health" if name == "etcd" else "/_node/health", timeout=60.0)
            log("   %s up on 127.0.0.1:%d" % (server.name, server.port))
        for name, _ in nodes:
            t0 = time.monotonic()
            seed(servers[name].port, args.seed)
            log("   seeded %s with %d records in %.1fs" % (name, args.seed, time.monotonic() - t0))
        if "etcd" in servers:
            t0 = time.monotonic()
            seed_etcd(servers["etcd"].port, args.seed)
            log("   seeded etcd with %d keys in %.1fs" % (args.seed, time.monotonic() - t0))

        tags = itertools.count(1)
        samples = {}  # (op, name) -> [figures of each repetition]
        for rep in range(args.repeat):
            if args.repeat > 1:
                log("   -- repetition %d of %d" % (rep + 1, args.repeat))
            for op in args.ops:
                # Every other repetition in the reverse order: no server always goes first.
                for name in (targets if rep % 2 == 0 else targets[::-1]):
                    server = servers[name]
                    kind = "etcd" if name == "etcd" else "node"
                    if args.warmup > 0:
                        run_wrk(args, server.port, op, args.warmup, "w%d-%d" % (next(tags), os.getpid()), lua_dir, kind)
                    before = node_stats(server.port) if name.startswith("node") else None
                    spy = None
                    if args.py_spy and name == "node" and rep == 0:
                        spy = start_py_spy(args, server.proc.pid, op, args.duration)
                    cpu_before = cpu_seconds(server.proc.pid)
                    children_before = children_cpu_seconds(server.proc.pid)
                    try:
                        figures, output = run_wrk(
                            args, server.port, op, args.duration, "m%d-%d" % (next(tags), os.getpid()), lua_dir, kind
                        )
                        cpu_after = cpu_seconds(server.proc.pid)
                        children_after = children_cpu_seconds(server.proc.pid)
                        if cpu_before is not None and cpu_after is not None and figures.get("requests"):
                            # CPU time per request hardly moves when other
                            # processes take cores; requests/s does.
                            n = figures["requests"]
                            figures["cpu_user_us"] = (cpu_after[0] - cpu_before[0]) * 1e6 / n
                            figures["cpu_sys_us"] = (cpu_after[1] - cpu_before[1]) * 1e6 / n
                            figures["cpu_us"] = figures["cpu_user_us"] + figures["cpu_sys_us"]
                            if children_before is not None and children_after is not None:
                                # The node's children: its file writer.
                                figures["cpu_children_us"] = (children_after - children_before) * 1e6 / n
                    finally:
                        if spy is not None:
                            try:
                                spy[0].wait(30)
                            except subprocess.TimeoutExpired:
                                os.killpg(spy[0].pid, signal.SIGKILL)
                                spy[0].wait()
                    if spy is not None:
                        log("   py-spy samples (collapsed stacks): %s" % spy[1])
                    if not server.alive():
                        raise BenchError("%s died during %s:\n%s" % (server.name, op, server.log_tail()))
                    if name.startswith("node"):
                        figures.update(node_deltas(before, node_stats(server.port)))
                    samples.setdefault((op, name), []).append(figures)
                    if args.verbose:
                        log(output)
                    log(
                        "   %-4s %-11s %9.0f req/s  p50 %7.2f ms  p99 %8.2f ms  cpu %6.0f us/req (sys %.0f)%s%s%s"
                        % (
                            op, name, figures["rps"], figures.get("p50", float("nan")),
                            figures.get("p99", float("nan")), figures.get("cpu_us", float("nan")),
                            figures.get("cpu_sys_us", float("nan")),
                            " +%.0f in children" % figures["cpu_children_us"] if figures.get("cpu_children_us") else "",
                            "  non-2xx %d" % figures["non_2xx"] if figures["non_2xx"] else "",
                            "  batch %.1f, storage write %.1f ms (x%d), read %.2f ms (x%d)" % (
                                figures["avg_batch"], figures.get("avg_write_ms", 0), figures.get("writes", 0),
                                figures.get("avg_read_ms", 0), figures.get("reads", 0))
                            if "avg_batch" in figures else "",
                        )
                    )
                    if figures["non_2xx"] or figures["socket_errors"]:
                        log("   WARNING: %d non-2xx answers, %d socket errors (see --verbose)"
                            % (figures["non_2xx"], figures["socket_errors"]))
        # Each figure is the repetition with the median requests/s; the ratio
        # is the median of the ratios of runs made one after the other.
        for op in args.ops:
            row = results["operations"].setdefault(op, {})
            for name in targets:
                runs = samples.get((op, name), [])
                if runs:
                    ordered = sorted(runs, key=lambda f: f["rps"])
                    row[name] = dict(ordered[(len(ordered) - 1) // 2])
                    row[name]["runs"] = runs
            node_runs, bare_runs = samples.get((op, "node")), samples.get((op, "bare"))
            if node_runs and bare_runs:
                ratios = sorted(n["rps"] / b["rps"] for n, b in zip(node_runs, bare_runs) if b["rps"])
                if ratios:
                    row["ratio"] = ratios[(len(ratios) - 1) // 2]
                    row["ratios"] = ratios
            etcd_runs = samples.get((op, "etcd"))
            for name, _ in nodes:
                node_runs = samples.get((op, name))
                if node_runs and etcd_runs:
                    ratios = sorted(n["rps"] / e["rps"] for n, e in zip(node_runs, etcd_runs) if e["rps"])
                    if ratios:
                        row["etcd_ratio:" + name] = ratios[(len(ratios) - 1) // 2]
                        row["etcd_ratios:" + name] = ratios
    finally:
        for server in servers.values():
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                log("   could not stop %s: %s" % (server.name, e))
        if args.keep:
            log("   kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.profile and "node" in servers:
        log("   node profile (cProfile stats): %s" % os.path.abspath(args.profile))
    return results


# -- output ---------------------------------------------------------------


def _fmt_rps(row, name):
    f = row.get(name)
    return "%.0f" % f["rps"] if f else "-"


def _fmt_lat(row, name):
    f = row.get(name)
    if not f:
        return "-"
    return "%s / %s" % (_ms(f.get("p50")), _ms(f.get("p99")))


def _fmt_ratio(row):
    if "ratio" not in row:
        return "-"
    ratios = row.get("ratios") or []
    if len(ratios) > 1:
        return "%.2f (%.2f-%.2f)" % (row["ratio"], ratios[0], ratios[-1])
    return "%.2f" % row["ratio"]


def _ms(v):
    if v is None:
        return "?"
    return "%.2f ms" % v if v < 10 else "%.1f ms" % v if v < 100 else "%.0f ms" % v


def _label(op, storage):
    return {"get": "GET existing", "post": "POST new (%s)" % storage, "put": "PUT existing (%s)" % storage}[op]


def _fmt_cpu(row, name):
    f = row.get(name)
    if not f or "cpu_us" not in f:
        return "-"
    if f.get("cpu_children_us"):
        return "%.0f (+%.0f)" % (f["cpu_us"], f["cpu_children_us"])
    return "%.0f" % f["cpu_us"]


def _cpu_ratio(row):
    """bare CPU per request / node CPU per request: the throughput ratio a core to itself would give."""
    n, b = row.get("node"), row.get("bare")
    if n and b and n.get("cpu_us") and b.get("cpu_us"):
        return "%.2f" % (b["cpu_us"] / n["cpu_us"])
    return "-"


def table(runs, storage):
    """
    Markdown: one row per operation; with two interpreters the main figures
    side by side, then the latencies and CPU costs of each.
    """
    lines = []
    if len(runs) == 1:
        run = runs[0]
        lines.append(
            "| operation | node req/s | node p50 / p99 | node CPU µs/req | bare req/s "
            "| bare p50 / p99 | bare CPU µs/req | node/bare req/s | node/bare by CPU |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for op, row in run["operations"].items():
            lines.append(
                "| %s | %s | %s | %s | %s | %s | %s | %s | %s |"
                % (
                    _label(op, storage), _fmt_rps(row, "node"), _fmt_lat(row, "node"),
                    _fmt_cpu(row, "node"), _fmt_rps(row, "bare"), _fmt_lat(row, "bare"),
                    _fmt_cpu(row, "bare"), _fmt_ratio(row), _cpu_ratio(row),
                )
            )
        return "\n".join(lines)
    names = [r["interpreter"].split(" (")[0] for r in runs]
    head = "| operation |"
    rule = "|---|"
    for name in names:
        head += " %s node req/s | bare req/s | node/bare req/s | node/bare by CPU |" % name
        rule += "---:|---:|---:|---:|"
    if len(runs) == 2:
        head += " node %s/%s |" % (names[1].split()[0], names[0].split()[0])
        rule += "---:|"
    lines += [head, rule]
    for op in runs[0]["operations"]:
        line = "| %s |" % _label(op, storage)
        for run in runs:
            row = run["operations"].get(op, {})
            line += " %s | %s | %s | %s |" % (
                _fmt_rps(row, "node"), _fmt_rps(row, "bare"), _fmt_ratio(row), _cpu_ratio(row),
            )
        if len(runs) == 2:
            a = runs[0]["operations"].get(op, {}).get("node")
            b = runs[1]["operations"].get(op, {}).get("node")
            line += " %s |" % ("%.2fx" % (b["rps"] / a["rps"]) if a and b and a["rps"] else "-")
        lines.append(line)
    lines += [
        "",
        "| operation | interpreter | node p50 / p99 | bare p50 / p99 | node CPU µs/req | bare CPU µs/req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for op in runs[0]["operations"]:
        for name, run in zip(names, runs):
            row = run["operations"].get(op, {})
            lines.append(
                "| %s | %s | %s | %s | %s | %s |"
                % (_label(op, storage), name, _fmt_lat(row, "node"), _fmt_lat(row, "bare"),
                   _fmt_cpu(row, "node"), _fmt_cpu(row, "bare"))
            )
    return "\n".join(lines)


#: The lowest node/etcd requests/s ratio aimed at, per operation (issue 10).
ETCD_TARGETS = {"get": 2.0, "post": 0.5}


def etcd_table(run):
    """Markdown: each node against etcd, per operation, with the targets."""
    lines = [
        "| operation | node (engine) | node req/s | node p50 / p99 | node CPU µs/req | etcd req/s | etcd p50 / p99 "
        "| etcd CPU µs/req | node/etcd req/s (runs) | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    etcd_op = {"get": "range", "post": "put (new key)", "put": "put (seeded key)"}
    for op, row in run["operations"].items():
        for name, storage in run["storages"].items():
            ratio = row.get("etcd_ratio:" + name)
            ratios = row.get("etcd_ratios:" + name) or []
            target = ETCD_TARGETS.get(op)
            lines.append("| %s vs %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                op.upper(), etcd_op[op], storage, _fmt_rps(row, name), _fmt_lat(row, name), _fmt_cpu(row, name),
                _fmt_rps(row, "etcd"), _fmt_lat(row, "etcd"), _fmt_cpu(row, "etcd"),
                "-" if ratio is None else "**%.2f** (%s)" % (ratio, ", ".join("%.2f" % r for r in ratios)),
                "-" if target is None or ratio is None else ">= %.1f: %s" % (target, "met" if ratio >= target else "MISSED"),
            ))
    return "\n".join(lines)


# -- main -----------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of the wrk warm-up before each (default 3; 0: none)")
    p.add_argument("--python", default=sys.executable, help="interpreter running the node and the bare app (default: this one)")
    p.add_argument("--compare-pypy", nargs="?", const=DEFAULT_PYPY, metavar="PYPY",
                   help="also run everything under PyPy (default %s, made by bench/pypy-venv.sh) and print both side by side" % DEFAULT_PYPY)
    p.add_argument("--storage", choices=("files", "sqlite", "memory"), default="files", help="the node's storage engine (default files)")
    p.add_argument("--also-storage", default="", metavar="ENGINES",
                   help="comma-separated engines of more nodes measured beside the first, e.g. sqlite (default none)")
    p.add_argument("--etcd", default=shutil.which("etcd") or "/usr/bin/etcd", help="the etcd binary of the etcd target")
    p.add_argument("--processes", default=None, help="the node's --processes (default: the node's own default, lang,schema; '' for none)")
    p.add_argument("--node-args", default="", help="more options for the node, e.g. '--threads 4' (one string)")
    p.add_argument("--ops", default=",".join(OPERATIONS), help="operations to run, of get,post,put (default all)")
    p.add_argument("--targets", default="node,bare", help="servers to measure, of node,bare,etcd (default node,bare)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure every operation this many times, node and bare in turn; report the median (default 1)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    p.add_argument("--seed", type=int, default=1000, help="records seeded before the runs; PUT rotates over them (default 1000)")
    p.add_argument("--json", metavar="FILE", help="write the figures to this JSON file")
    p.add_argument("--profile", metavar="FILE", help="run the node under cProfile (twistd --profiler cprofile --savestats) and write its stats here; the figures then carry the profiler's cost")
    p.add_argument("--py-spy", metavar="DIR",
                   help="sample the node with py-spy during each measured run, only the thread holding the GIL (where the node's one core of Python goes); write DIR/{op}.txt (CPython only)")
    p.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "/tmp/tools-venv/bin/py-spy", help=argparse.SUPPRESS)
    p.add_argument("--wait-idle", type=int, default=0, metavar="SECONDS",
                   help="before starting, wait up to this long for the 1-minute load average to fall below 0.5 (the machine is shared)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, Lua scripts)")
    p.add_argument("--verbose", action="store_true", help="print wrk's whole output")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.also_storage = [s.strip() for s in args.also_storage.split(",") if s.strip()]
    for s in args.also_storage:
        if s not in ("files", "sqlite", "memory") or s == args.storage:
            p.error("--also-storage: %r is not another of files, sqlite, memory" % s)
    for op in args.ops:
        if op not in OPERATIONS:
            p.error("--ops: no operation %r (get, post, put)" % op)
    for t in args.targets:
        if t not in ("node", "bare", "etcd"):
            p.error("--targets: %r is not node, bare or etcd" % t)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        p.error("--duration must be above 0 and --warmup at least 0")
    if args.compare_pypy and args.profile:
        p.error("--profile runs one interpreter; drop --compare-pypy")
    return args


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("wrk") is None:
        sys.stderr.write("run.py: wrk is not on PATH (apt-get install wrk)\n")
        return 2
    pythons = [args.python]
    if args.compare_pypy:
        if not os.access(args.compare_pypy, os.X_OK):
            sys.stderr.write("run.py: no PyPy at %s (make it: sh bench/pypy-venv.sh)\n" % args.compare_pypy)
            return 2
        pythons.append(args.compare_pypy)
    # A SIGTERM or SIGHUP unwinds like Ctrl-C, so the servers get stopped.
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)

    def log(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    if args.wait_idle:
        deadline = time.monotonic() + args.wait_idle
        while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
            time.sleep(5)
    started = time.time()
    load = os.getloadavg()
    if load[0] > 0.5:
        log("run.py: WARNING: load average %.2f before the run: something else is using "
            "the cores, and the figures will show it" % load[0])
    runs = []
    try:
        for python in pythons:
            runs.append(bench_interpreter(args, python, log))
    except BENCH_ERRORS as e:
        log("run.py: %s" % e)
        return 1
    except KeyboardInterrupt:
        log("run.py: interrupted; servers stopped")
        return 130

    load_after = os.getloadavg()
    revision = git_revision()
    print()
    print("minstore at %s" % revision)
    print(
        "wrk -t%d -c%d -d%ds --latency after a %ds warm-up, median of %d; storage %s; processes %s; %d seeded records; nproc %d"
        % (args.threads, args.connections, args.duration, args.warmup, args.repeat, args.storage,
           "default (lang,schema)" if args.processes is None else repr(args.processes),
           args.seed, os.cpu_count() or 0)
    )
    print("load average before %.2f (1 min); after %.2f (includes this run)" % (load[0], load_after[0]))
    for run in runs:
        print("- %s: %s" % (run["interpreter"], run["python"]))
    print()
    if "bare" in args.targets:
        print(table(runs, args.storage))
    if "etcd" in args.targets:
        for run in runs:
            print()
            print("%s, node against etcd (%s):" % (run["interpreter"], args.etcd))
            print()
            print(etcd_table(run))
    if args.json:
        document = {
            "started": started,
            "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_before": load, "loadavg_after": load_after},
            "settings": {
                "threads": args.threads, "connections": args.connections,
                "duration": args.duration, "warmup": args.warmup, "storage": args.storage,
                "processes": args.processes, "seed": args.seed, "repeat": args.repeat,
            },
            "revision": revision,
            "runs": runs,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
        log("figures written to %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
