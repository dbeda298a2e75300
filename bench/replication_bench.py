#!/usr/bin/env python3
"""
Benchmark minstore's replication (DESIGN section 4) on real nodes.

Starts every node itself (``twistd -n minstore`` from this checkout, files
engine, fresh temporary data directories, free loopback ports) and stops
them all at the end, whatever happens.  All traffic goes to 127.0.0.1.

(a) Replication lag: a paced, open-loop writer POSTs new records on the
    emitter A at ``--rate`` writes/s for ``--warmup`` + ``--duration`` s
    (the warm-up's figures are printed apart); a watcher per
    receiver polls ``GET ?local=1`` for the acknowledged records it does not
    serve yet, oldest first (one GET every ``--poll-interval`` while it
    misses, more at once after hits; a record missing for
    ``--give-up`` s counts as not seen), and the lag of a record is the time
    from its acknowledgement to the first 200 on the last receiver.  That is
    an upper bound: it includes a GET's round trip and up to one interval.
      mirror   A->B, A->C     lag to the later of B and C
      bridge   A(*)->B(*)->C  lag to C
(b) The emitter's POST throughput, ``wrk -t2 -c32`` with a Lua script making
    unique uids, on a node with two receivers (A->B, A->C) and on the same
    node standalone, same duration, fresh data for each; the ratio.  After
    the run with receivers, how long the replication backlog takes to drain.
    CPU per acknowledged POST: each node's (user + system, /proc/PID/stat),
    the nodes' sum, and the whole machine's (busy time in /proc/stat, which
    also counts wrk and anything else running); the ratio of the sums,
    replicated / standalone.  ``--repeat N`` makes N pairs, in the order
    standalone, replicated, then replicated, standalone, ...; the ratios
    are the medians of the pairs'.

    python3 bench/replication_bench.py                     # all, defaults
    python3 bench/replication_bench.py --rate 200 --duration 30 --wrk-duration 20
    python3 bench/replication_bench.py --only lag --topologies mirror
    python3 bench/replication_bench.py --python /tmp/pypy-venv/bin/python --json out.json

Standard library only (the client is asyncio over raw HTTP/1.1), plus
``wrk`` on PATH for (b).  Targets (issue 10): mirror lag p99 < 20 ms at 200
writes/s; throughput with two receivers >= 0.7 of standalone; the whole
machine's CPU per replicated POST <= 1.6x standalone.
"""

import argparse
import asyncio
import http.client
import itertools
import json
import os
import shlex
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
COLLECTION = "bench"
TOPOLOGIES = ("mirror", "bridge")
LAG_TARGET_MS = 20.0
RATIO_TARGET = 0.7
CPU_RATIO_TARGET = 1.6

sys.path.insert(0, HERE)
from run import POST_LUA as _RUN_POST_LUA  # noqa: E402  (bench/run.py, beside this file)
from run import BENCH_ERRORS, TEXT, BenchError, parse_wrk  # noqa: E402  (one wrk parser, one error type)

# How to start a node, shared with the integration tests (run.py put the
# checkout on sys.path).
from minstore.launcher import Child, free_ports, node_argv, node_environ, write_servers  # noqa: E402

#: New records with unique uids, the same script as bench/run.py's POST runs.
POST_LUA = _RUN_POST_LUA % {"collection": COLLECTION}


def log(text=""):
    print(text, flush=True)


def machine_busy_seconds():
    """CPU seconds the whole machine has been busy (every core, /proc/stat: all but idle and iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def loadavg():
    """The 1, 5 and 15 minute load averages, as text: other work on the machine skews every figure."""
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


# -- nodes ----------------------------------------------------------------


def http_request(port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _die_with_parent():
    """In the child (Linux): SIGTERM when the benchmark dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Node(Child):
    """One ``twistd -n minstore`` child (L{minstore.launcher}) in its own session: SIGTERM, then SIGKILL."""

    def __init__(self, name, python, work, port, peers=(), bridge=False, processes=None, storage="files", extra=()):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        args = ["--storage", storage]
        if processes is not None:
            args.append("--processes=" + processes)
        args += list(extra)
        servers = write_servers(os.path.join(self.dir, "servers.list"), peers, bridge) if peers else None
        Child.__init__(
            self, name, node_argv(port, os.path.join(self.dir, "data"), servers, args, python),
            port, os.path.join(self.dir, "node.log"), node_environ(checkout=REPO), self.dir,
            preexec_fn=_die_with_parent,
        )

    def cpu_seconds(self):
        """User + system CPU time of the node so far (Linux /proc), or None."""
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def status(self):
        code, body = http_request(self.port, "GET", "/_node/status")
        if code != 200:
            raise BenchError("%s: /_node/status answered %d" % (self.name, code))
        return json.loads(body)

    def stop(self, grace=20.0):
        Child.stop(self, grace)


class Cluster:
    """
    Nodes started together from a peer graph ``{name: [peer names]}``, in a
    fresh directory; a context manager that stops them all and removes it.
    """

    def __init__(self, args, graph, bridges=(), label=""):
        self.args = args
        self.label = label
        self.work = tempfile.mkdtemp(prefix="minstore-repl-bench-")
        names = list(graph)
        ports = dict(zip(names, free_ports(len(names))))
        self.nodes = {}
        for name in names:
            self.nodes[name] = Node(
                name, args.python, self.work, ports[name],
                peers=[ports[p] for p in graph[name]], bridge=name in bridges,
                processes=args.processes, storage=args.storage, extra=shlex.split(args.node_args),
            )

    def __getitem__(self, name):
        return self.nodes[name]

    def __enter__(self):
        try:
            for node in self.nodes.values():
                node.start()
            for node in self.nodes.values():
                node.wait_ready(timeout=60.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def check_alive(self):
        for node in self.nodes.values():
            if not node.alive():
                raise BenchError("%s died:\n%s" % (node.name, node.log_tail()))

    def __exit__(self, *exc):
        for node in self.nodes.values():
            try:
                node.stop()
            except Exception as e:  # keep stopping the others
                log("   could not stop %s: %s" % (node.name, e))
        if self.args.keep:
            log("   kept %s" % self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        return False

    def settled_counts(self, names=("A", "B", "C"), timeout=10.0):
        """
        The nodes' record counts once they agree (or at the time-out).  A
        backlog of 0 can be read while A still commits writes wrk sent
        before it stopped (their connections closed, the writes go on):
        those then reach the receivers a moment later, so the counts are
        read again, with the backlogs, until they agree.
        """
        start = time.monotonic()
        while True:
            counts = [self[n].status()["records"] for n in names]
            if len(set(counts)) <= 1 or time.monotonic() - start > timeout:
                return counts
            time.sleep(0.1)
            self.wait_drained()

    def wait_drained(self, timeout=120.0):
        """Seconds until every node's backlog to every peer is 0 (None: not within timeout)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.check_alive()
            if all(p["backlog"] == 0 for n in self.nodes.values() for p in n.status()["peers"]):
                return time.monotonic() - start
            time.sleep(0.05)
        return None


# -- a small asyncio HTTP/1.1 client ----------------------------------------


class Connection:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    async def request(self, method, path, body=b"", headers=()):
        head = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1", "Content-Length: %d" % len(body)]
        head.extend(headers)
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed by the node")
        status = int(status_line.split(None, 2)[1])
        length, chunked, close = 0, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await self.reader.readexactly(length)
        return status, data, close

    def close(self):
        self.writer.close()


class Pool:
    """Keep-alive connections to one node, opened on demand."""

    def __init__(self, port):
        self.port = port
        self.idle = []
        self.opened = 0

    async def request(self, method, path, body=b"", headers=(), timeout=10.0):
        conn = self.idle.pop() if self.idle else None
        if conn is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(reader, writer)
            self.opened += 1
        try:
            status, data, close = await asyncio.wait_for(conn.request(method, path, body, headers), timeout)
        except BaseException:
            conn.close()
            raise
        if close:
            conn.close()
        else:
            self.idle.append(conn)
        return status, data

    def close(self):
        for conn in self.idle:
            conn.close()
        self.idle = []


# -- (a) replication lag --------------------------------------------------


def percentile(values, p):
    """The p-th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


class Watcher:
    """
    Polls one receiver for the acknowledged records it does not serve yet,
    oldest first.  Replicas arrive in order and in batches, so after a hit
    the next round asks for more records at once (twice as many after a
    round of hits only, as many as were hit after a partial one) and after
    a round of misses one record, ``interval`` seconds later.  A caught-up
    receiver costs about one GET per record plus one per interval, not one
    per record per interval.
    """

    MAX_WINDOW = 64

    def __init__(self, port, give_up, interval):
        self.pool = Pool(port)
        self.give_up = give_up
        self.interval = interval
        self.unseen = {}  # i -> (path, acked), in acknowledgement order
        self.found = {}  # i -> seconds from acknowledgement to a 200, or None
        self.errors = []
        self.requests = 0
        self.finished = False
        self._wake = asyncio.Event()

    def add(self, i, path, acked):
        self.unseen[i] = (path, acked)
        self._wake.set()

    def finish(self):
        self.finished = True
        self._wake.set()

    async def _get(self, path):
        self.requests += 1
        try:
            status, _ = await self.pool.request("GET", path)
        except Exception as e:  # a timeout or a reset: a miss, counted
            self.errors.append("GET %s: %r" % (path, e))
            status = None
        return status, time.perf_counter()

    async def run(self):
        window = 1
        while True:
            if not self.unseen:
                if self.finished:
                    self.pool.close()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            chosen = list(itertools.islice(self.unseen, window))
            if window == 1 and len(self.unseen) > 1 and time.perf_counter() - self.unseen[chosen[0]][1] > 0.1:
                chosen.append(next(reversed(self.unseen)))  # the oldest is late: look past it too
            answers = await asyncio.gather(*[self._get(self.unseen[i][0]) for i in chosen])
            hits = 0
            for i, (status, at) in zip(chosen, answers):
                acked = self.unseen[i][1]
                if status == 200:
                    self.found[i] = at - acked
                    del self.unseen[i]
                    hits += 1
                elif status not in (404, None):
                    raise BenchError("GET %s answered %d" % (self.unseen[i][0], status))
                elif at - acked > self.give_up:
                    self.found[i] = None
                    del self.unseen[i]
            if hits == len(chosen):
                window = min(2 * window, self.MAX_WINDOW)
            elif hits:
                window = hits
            else:
                window = 1
                await asyncio.sleep(self.interval)


async def measure_lag(emitter, receivers, rate, duration, give_up, tag, interval=0.005):
    """
    Paced POSTs on ``emitter`` (open loop: one task per write, at its
    scheduled time, over as many keep-alive connections as needed); for
    each acknowledged write, the seconds until every receiver serves it with
    ``GET ?local=1`` (None when one does not within ``give_up`` seconds).
    """
    writes = max(1, int(rate * duration))
    emitter_pool = Pool(emitter.port)
    watchers = [Watcher(r.port, give_up, interval) for r in receivers]
    watching = [asyncio.ensure_future(w.run()) for w in watchers]
    errors, post_latency, acked_ids = [], [], []
    scheduled = {}

    async def one(i):
        uid = "%s-%06d" % (tag, i)
        path = "/%s/%s" % (COLLECTION, uid)
        body = json.dumps({"value": "%s %s" % (TEXT, uid)}).encode()
        try:
            status, data = await emitter_pool.request("POST", path, body, ["Content-Type: application/json"])
        except Exception as e:
            errors.append("POST %s: %r" % (uid, e))
            return
        acked = time.perf_counter()
        if status != 200:
            errors.append("POST %s answered %d: %r" % (uid, status, data[:200]))
            return
        post_latency.append((i, acked - scheduled[i]))
        acked_ids.append(i)
        for w in watchers:
            w.add(i, path + "?local=1", acked)

    tasks = []
    start = time.perf_counter()
    for i in range(writes):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        scheduled[i] = at
        tasks.append(asyncio.ensure_future(one(i)))
    sent_for = time.perf_counter() - start
    await asyncio.gather(*tasks)
    emitter_pool.close()
    for w in watchers:
        w.finish()
    await asyncio.gather(*watching)
    lags = []  # (write number, lag or None), in acknowledgement order
    for i in acked_ids:
        found = [w.found.get(i) for w in watchers]
        lags.append((i, None if None in found else max(found)))
    for w in watchers:
        errors.extend(w.errors)
    return {
        "writes": writes,
        "send_seconds": sent_for,
        "acknowledged": len(acked_ids),
        "lags": lags,
        "errors": errors,
        "post_latency": post_latency,
        "connections": emitter_pool.opened,
        "polls_per_receiver_per_s": [w.requests / max(sent_for, 1e-9) for w in watchers],
    }


def lag_figures(lags, posts):
    """Percentiles (ms) of ``[(i, lag or None)]`` and ``[(i, POST latency)]``."""
    seen = [x for _, x in lags if x is not None]
    row = {"acknowledged": len(lags), "seen": len(seen), "not_seen": len(lags) - len(seen)}
    if seen:
        for p in (50, 90, 99):
            row["p%d" % p] = 1000 * percentile(seen, p)
        row["max"] = 1000 * max(seen)
    posts = [x for _, x in posts]
    if posts:
        row["post_ms_p50"] = 1000 * percentile(posts, 50)
        row["post_ms_p99"] = 1000 * percentile(posts, 99)
    return row


def _describe(row):
    return "%d/%d seen, lag p50 %.1f ms p90 %.1f ms p99 %.1f ms max %.1f ms; POST p50 %.1f ms p99 %.1f ms" % (
        row["seen"], row["acknowledged"], row.get("p50", float("nan")), row.get("p90", float("nan")),
        row.get("p99", float("nan")), row.get("max", float("nan")),
        row.get("post_ms_p50", float("nan")), row.get("post_ms_p99", float("nan")),
    )


def run_lag(args, topology):
    if topology == "mirror":
        graph, bridges, targets, label = {"A": ["B", "C"], "B": [], "C": []}, (), ["B", "C"], "mirror A->B, A->C"
    else:
        graph, bridges, targets, label = {"A": ["B"], "B": ["C"], "C": []}, ("A", "B"), ["C"], "bridge A(*)->B(*)->C"
    log("== lag, %s: %d writes/s, %ds of warm-up then %ds measured (lag to %s); load average before %s"
        % (label, args.rate, args.warmup, args.duration, " and ".join(targets), loadavg()))
    with Cluster(args, graph, bridges) as cluster:
        receivers = [cluster[t] for t in targets]
        tag = "lag-%s-%d" % (topology, os.getpid())
        # One steady stream: the first --warmup seconds are reported apart.
        result = asyncio.run(measure_lag(cluster["A"], receivers, args.rate, args.warmup + args.duration,
                                         args.give_up, tag, args.poll_interval))
        cluster.check_alive()
        status = cluster["A"].status()
    first = int(args.rate * args.warmup)
    row = {
        "topology": topology,
        "label": label,
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "writes": result["writes"] - first,
        "errors": len(result["errors"]),
        "achieved_rate": result["writes"] / result["send_seconds"] if result["send_seconds"] else None,
        "polls_per_receiver_per_s": result["polls_per_receiver_per_s"],
    }
    row.update(lag_figures([x for x in result["lags"] if x[0] >= first],
                           [x for x in result["post_latency"] if x[0] >= first]))
    if first:
        row["warmup_figures"] = lag_figures([x for x in result["lags"] if x[0] < first],
                                            [x for x in result["post_latency"] if x[0] < first])
    if result["errors"]:
        log("   %d errors, first: %s" % (len(result["errors"]), result["errors"][0]))
    log("   polling cost: %s GETs/s per receiver; writes sent at %.1f/s"
        % (", ".join("%.0f" % x for x in row["polls_per_receiver_per_s"]), row["achieved_rate"] or 0))
    if first:
        log("   warm-up  (first %ds): %s" % (args.warmup, _describe(row["warmup_figures"])))
    log("   measured (next %ds):  %s" % (args.duration, _describe(row)))
    row["emitter_peers"] = status.get("peers")
    return row


# -- (b) throughput -------------------------------------------------------


def run_wrk(args, port, duration, tag, script):
    argv = [
        "wrk", "-t2", "-c32", "-d%ds" % duration, "--timeout", "10s", "--latency",
        "-s", script, "http://127.0.0.1:%d" % port, "--", tag, TEXT,
    ]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=duration + 60)
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise BenchError("wrk failed (%d):\n%s" % (proc.returncode, output))
    if args.verbose:
        log(output)
    return parse_wrk(output)


def run_throughput(args, script):
    log("== throughput: wrk -t2 -c32 POST of new records on A for %ds (after a %ds warm-up), %d pair(s); load average before %s"
        % (args.wrk_duration, args.wrk_warmup, args.repeat, loadavg()))
    graphs = (("standalone", {"A": []}), ("two receivers", {"A": ["B", "C"], "B": [], "C": []}))
    runs = {"standalone": [], "two receivers": []}
    for rep in range(args.repeat):
        for name, graph in (graphs if rep % 2 == 0 else graphs[::-1]):
            runs[name].append(run_throughput_once(args, script, name, graph))
    rows = {}
    for name, figures in runs.items():
        ordered = sorted(figures, key=lambda f: f["rps"])
        rows[name] = dict(ordered[(len(ordered) - 1) // 2], runs=figures)

    def median_of(values):
        values = sorted(v for v in values if v is not None)
        return values[(len(values) - 1) // 2] if values else None

    pairs = list(zip(runs["standalone"], runs["two receivers"]))
    rows["ratios"] = [r["rps"] / s["rps"] for s, r in pairs]
    rows["ratio"] = median_of(rows["ratios"])
    rows["cpu_ratios"] = [r["cpu_ms_nodes"] / s["cpu_ms_nodes"] for s, r in pairs]
    rows["cpu_ratio"] = median_of(rows["cpu_ratios"])
    rows["machine_cpu_ratios"] = [r["cpu_ms_machine"] / s["cpu_ms_machine"] for s, r in pairs
                                  if r.get("cpu_ms_machine") and s.get("cpu_ms_machine")]
    rows["machine_cpu_ratio"] = median_of(rows["machine_cpu_ratios"])
    return rows


def run_throughput_once(args, script, name, graph):
    """One throughput run on a new cluster: figures of wrk and the CPU per POST."""
    with Cluster(args, graph) as cluster:
        port = cluster["A"].port
        if args.wrk_warmup:
            run_wrk(args, port, args.wrk_warmup, "w%d" % os.getpid(), script)
        if len(graph) > 1:
            cluster.wait_drained()
        cpu_before = {n: node.cpu_seconds() for n, node in cluster.nodes.items()}
        machine_before = machine_busy_seconds()
        figures = run_wrk(args, port, args.wrk_duration, "m%d" % os.getpid(), script)
        machine_after = machine_busy_seconds()
        cluster.check_alive()
        # Where the two cores went: each node's CPU per acknowledged POST on A.
        requests = figures.get("requests") or figures["rps"] * args.wrk_duration
        figures["cpu_ms_per_post"] = {
            n: 1000.0 * (node.cpu_seconds() - cpu_before[n]) / requests
            for n, node in cluster.nodes.items()
            if cpu_before[n] is not None and node.cpu_seconds() is not None
        }
        figures["cpu_ms_nodes"] = sum(figures["cpu_ms_per_post"].values())
        if machine_before is not None and machine_after is not None:
            figures["cpu_ms_machine"] = 1000.0 * (machine_after - machine_before) / requests
        if len(graph) > 1:
            figures["drain_seconds"] = cluster.wait_drained()
            figures["records"] = cluster.settled_counts()
        log("   %-13s %8.0f req/s  p50 %6.1f ms  p99 %6.1f ms  CPU ms per POST %s, nodes %.2f, machine %.2f%s%s" % (
            name, figures["rps"], figures.get("p50", float("nan")), figures.get("p99", float("nan")),
            " ".join("%s %.2f" % kv for kv in sorted(figures["cpu_ms_per_post"].items())),
            figures["cpu_ms_nodes"], figures.get("cpu_ms_machine", float("nan")),
            "  non-2xx %d" % figures["non_2xx"] if figures["non_2xx"] else "",
            "  backlog drained %.1fs after, records A/B/C %s" % (figures["drain_seconds"], figures["records"])
            if figures.get("drain_seconds") is not None else
            ("  backlog NOT drained" if len(graph) > 1 else ""),
        ))
        return figures


# -- output ---------------------------------------------------------------


def table(results, args):
    lines = []
    if results.get("lag"):
        lines.append(
            "Replication lag: POST acknowledged on A -> readable with GET ?local=1 on the last receiver "
            "(%d writes/s for %ds after %ds of warm-up, %s engine)" % (args.rate, args.duration, args.warmup, args.storage)
        )
        lines.append("")
        lines.append("| topology | writes | seen | lag p50 | lag p90 | lag p99 | lag max | POST p99 | target p99 < %d ms |"
                     % LAG_TARGET_MS)
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for row in results["lag"]:
            target = ""
            if row["topology"] == "mirror":
                target = "met" if row.get("p99", 1e9) < LAG_TARGET_MS and not row["not_seen"] else "MISSED"
            lines.append("| %s | %d | %d | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %s |" % (
                row["label"], row["writes"], row["seen"], row.get("p50", float("nan")),
                row.get("p90", float("nan")), row.get("p99", float("nan")), row.get("max", float("nan")),
                row.get("post_ms_p99", float("nan")), target or "-",
            ))
        lines.append("")
    t = results.get("throughput")
    if t:
        lines.append("Emitter POST throughput, wrk -t2 -c32 for %ds, unique uids, %s engine"
                     % (args.wrk_duration, args.storage))
        lines.append("")
        lines.append("| node A | req/s | p50 | p99 | non-2xx | CPU ms per POST (A / B / C) | nodes' CPU ms per POST | machine's CPU ms per POST |")
        lines.append("|---|---:|---:|---:|---:|---|---:|---:|")
        for name in ("standalone", "two receivers"):
            f = t[name]
            lines.append("| %s | %.0f | %.1f ms | %.1f ms | %d | %s | %.2f | %.2f |" % (
                name, f["rps"], f.get("p50", float("nan")), f.get("p99", float("nan")), f["non_2xx"],
                " / ".join("%.2f" % v for _, v in sorted(f.get("cpu_ms_per_post", {}).items())),
                f["cpu_ms_nodes"], f.get("cpu_ms_machine", float("nan"))))
        lines.append("")
        pairs = lambda key: ", ".join("%.2f" % r for r in t[key])  # noqa: E731
        lines.append("throughput two receivers / standalone: **%.2f** (pairs: %s; target >= %.1f: %s)" % (
            t["ratio"], pairs("ratios"), RATIO_TARGET, "met" if t["ratio"] >= RATIO_TARGET else "MISSED"))
        lines.append("nodes' CPU per POST, replicated / standalone: **%.2f** (pairs: %s; target <= %.1f: %s)" % (
            t["cpu_ratio"], pairs("cpu_ratios"), CPU_RATIO_TARGET, "met" if t["cpu_ratio"] <= CPU_RATIO_TARGET else "MISSED"))
        if t.get("machine_cpu_ratio") is not None:
            lines.append("whole machine's CPU per POST (wrk and other load included), replicated / standalone: "
                         "**%.2f** (pairs: %s; target <= %.1f: %s)" % (
                             t["machine_cpu_ratio"], pairs("machine_cpu_ratios"), CPU_RATIO_TARGET,
                             "met" if t["machine_cpu_ratio"] <= CPU_RATIO_TARGET else "MISSED"))
        drain = t["two receivers"].get("drain_seconds")
        records = t["two receivers"].get("records", [])
        lines.append("replication backlog drained %s after the run; records on A/B/C: %s%s" % (
            "%.1fs" % drain if drain is not None else "NOT within 120s",
            "/".join(str(n) for n in records),
            "" if len(set(records)) <= 1 else "  **RECORDS MISSING on a receiver**"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s of the lag test (200)")
    parser.add_argument("--duration", type=int, default=30, help="seconds of the lag test (30)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="seconds of writes at the same rate before the measured ones, reported apart (10)")
    parser.add_argument("--give-up", type=float, default=10.0, help="seconds a poller waits for one record (10)")
    parser.add_argument("--poll-interval", type=float, default=0.005,
                        help="seconds between GETs of a record a receiver does not serve yet (0.005)")
    parser.add_argument("--topologies", nargs="+", choices=TOPOLOGIES, default=list(TOPOLOGIES))
    parser.add_argument("--wrk-duration", type=int, default=20, help="seconds of each wrk run (20)")
    parser.add_argument("--wrk-warmup", type=int, default=3, help="seconds of wrk warm-up before each (3)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of throughput runs, standalone and replicated, in alternating order (1)")
    parser.add_argument("--only", choices=("lag", "throughput"), help="run one part only")
    parser.add_argument("--python", default=sys.executable, help="interpreter running the nodes")
    parser.add_argument("--storage", default="files",
                        help="storage engine of every node (files; memory shows what replication costs without disk)")
    parser.add_argument("--processes", default=None, help="--processes of the nodes (default: the node's own)")
    parser.add_argument("--node-args", default="", help="more options for every node, e.g. '--replication-interval 0' (one string)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--verbose", action="store_true", help="print wrk's output")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rate and --duration must be above 0, --warmup at least 0")
    if args.only != "lag" and not shutil.which("wrk"):
        parser.error("wrk is not on PATH (or run --only lag)")

    # SIGTERM and SIGHUP unwind like Ctrl-C, so every node is stopped.
    def interrupted(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    log("minstore replication benchmark: %s %s on %s, %d CPUs" % (
        platform.python_implementation(), platform.python_version(), platform.machine(), os.cpu_count()))
    log("nodes run with %s" % args.python)
    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "args": vars(args)}
    lua_dir = tempfile.mkdtemp(prefix="minstore-repl-bench-lua-")
    try:
        if args.only in (None, "lag"):
            results["lag"] = [run_lag(args, topology) for topology in args.topologies]
        if args.only in (None, "throughput"):
            script = os.path.join(lua_dir, "post.lua")
            with open(script, "w") as f:
                f.write(POST_LUA)
            results["throughput"] = run_throughput(args, script)
    except BENCH_ERRORS as e:
        log("FAILED: %s" % e)
        return 1
    except KeyboardInterrupt:
        log("interrupted; nodes stopped")
        return 130
    finally:
        shutil.rmtree(lua_dir, ignore_errors=True)
    results["loadavg_after"] = loadavg()
    log("")
    log(table(results, args))
    log("")
    log("load average at the end: %s (1, 5, 15 min; %d CPUs)" % (results["loadavg_after"], os.cpu_count()))
    if args.json:
        for row in results.get("lag", []):
            row.pop("emitter_peers", None)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
