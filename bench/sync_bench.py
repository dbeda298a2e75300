#!/usr/bin/env python3
"""
Benchmark sync's reconciliation (DESIGN section 4, minstore.cluster.sync)
in one process: two real nodes (Node, RecordAPI, Sync) over the memory or
sqlite engine, talking real HTTP in memory (treq's StubTreq through
tests.fakes.FakeNetwork), storage called inline (so the seconds are the
CPU both sides spend, one after the other, without the network).

For ``--records`` N on both nodes it prints, as JSON lines:

* ``build``: the first read of the fingerprints (what a node does at start);
* ``identical``: a sync of identical nodes;
* ``differences``: a sync where ``--differences`` D of every kind differ
  (only on A, only on B, newer on A, newer on B, deleted on one side, A or
  B in turn: 5 D in all), and that both end equal;
* ``again``: one more sync once equal (the blocks the previous one dirtied
  are read again);
* ``one``: a sync with a single record only on B.

With ``--nodes``: the issue's figure with real nodes.  Copies of
bench/scale.py's filled data directory (``--cache``; filled first when
missing) for A and B, the same D of every kind written by the engine's
``write(batch)`` before start, three ``twistd minstore`` nodes on loopback
ports (C empty; A's servers.list holds B and C), ``POST /_node/sync`` on A
with B (``differences``), again (``identical``), then wrk GET runs on A
alternating without a sync and while A sends C a full copy (C stopped at
the end of each such run), and the medians' ratio of their p99.

    python3 bench/sync_bench.py                       # 100k records, memory
    python3 bench/sync_bench.py --nodes --records 1000000 --differences 100
    python3 bench/sync_bench.py --records 100000 --differences 100 --engine sqlite
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from twisted.internet.task import Clock  # noqa: E402

from minstore.api import RecordAPI  # noqa: E402
from minstore.cluster.peers import PeerClient  # noqa: E402
from minstore.cluster.sync import Sync, SyncIndex  # noqa: E402
from minstore.interfaces import NEWER, WriteItem  # noqa: E402
from minstore.node import Node, run_inline  # noqa: E402
from minstore.storage.memory import MemoryStorage  # noqa: E402
from minstore.storage.sqlite import SQLiteStorage  # noqa: E402
from tests.fakes import FakeNetwork, replica, tombstone, url  # noqa: E402


def make(name, peers, net, clock, engine, tmp):
    storage = MemoryStorage() if engine == "memory" else SQLiteStorage(os.path.join(tmp, name))
    node = Node(storage, node_id=name, now=clock.seconds)
    node.open()
    s = Sync(node, SyncIndex(storage), PeerClient(net, name), lambda: [url(p) for p in peers], clock, run_inline)
    net.add(url(name), RecordAPI(node, node_sync=s).resource())
    return s


def load(storage, records, chunk=5000):
    for i in range(0, len(records), chunk):
        items = []
        for data in records[i : i + chunk]:
            r = json.loads(data)
            items.append(WriteItem(r["collection"], r["uid"], data, bool(r.get("deleted")), r["version"], False, NEWER))
        storage.write(items)


def run_sync(a, b):
    result = []
    a.sync(url("b")).addBoth(result.append)
    report = result[0]
    if not isinstance(report, dict) or report["error"]:
        raise SystemExit("sync failed: %r" % (report,))
    return report


def held(storage):
    return storage.scan_versions(None, None, 10 ** 9)


# -- real nodes (--nodes) ---------------------------------------------------


def nodes_main(args):
    """Two (three) twistd nodes on copies of a 1M-record data directory: see the module's doc."""
    import shutil
    import subprocess
    import time as _time

    sys.path.insert(0, HERE)
    from run import Server, free_port, parse_wrk, request
    from scale import GET_LUA, cached_data_dir
    from minstore.records import HybridLogicalClock, encode_record, make_record, make_tombstone
    from minstore.storage import make_storage

    log = lambda text: (sys.stderr.write(text + "\n"), sys.stderr.flush())  # noqa: E731
    work = tempfile.mkdtemp(prefix="sync-nodes-")
    ports = {name: free_port() for name in ("a", "b", "c")}
    urls = {name: "http://127.0.0.1:%d" % port for name, port in ports.items()}
    servers = {"a": ["b", "c"], "b": ["a"], "c": ["a"]}
    source, _ = cached_data_dir(args, args.engine, args.records)
    n, d = args.records, args.differences
    uids = ["u%07d" % i for i in range(1, n + 1)]
    step = max(1, n // (4 * d + 1))
    picks = iter(uids[::step])
    dirs = {}
    for name in ("a", "b"):
        dirs[name] = os.path.join(work, name)
        log("   copying %s to %s" % (source, dirs[name]))
        shutil.copytree(source, dirs[name])
        os.unlink(os.path.join(dirs[name], "node_id"))
    dirs["c"] = os.path.join(work, "c")
    os.makedirs(dirs["c"])
    # d of each kind: only on A, only on B, newer on A, newer on B, deleted on one side (A or B in turn).
    clock = HybridLogicalClock("syncbench")
    now = _time.time()
    writes = {"a": [], "b": []}
    for i in range(d):
        for side in ("a", "b"):
            r = make_record("c", "only-%s-%05d" % (side, i), "only on " + side, clock.now(), now)
            writes[side].append(r)
        for side in ("a", "b"):
            r = make_record("c", next(picks), "newer on " + side, clock.now(), now)
            writes[side].append(r)
        writes["a" if i % 2 else "b"].append(make_tombstone("c", next(picks), clock.now(), now))
    for name, records in writes.items():
        storage = make_storage(args.engine, dirs[name])
        storage.open()
        storage.write([WriteItem(r["collection"], r["uid"], encode_record(r), bool(r.get("deleted")),
                                 r["version"], False, NEWER) for r in records])
        storage.close()

    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    nodes = {}

    def start(name):
        path = os.path.join(work, name + ".servers")
        with open(path, "w") as f:
            f.write("".join(urls[p] + "\n" for p in servers[name]))
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "minstore", "--port", "tcp:%d:interface=127.0.0.1" % ports[name], "--data", dirs[name],
                "--storage", args.engine, "--processes", "", "--servers", path]
        nodes[name] = Server(name, argv, ports[name], os.path.join(work, name + ".log"), env, REPO).start()

    def call(name, method, path, timeout=600):
        status, body = request("127.0.0.1", ports[name], method, path, timeout=timeout)
        return status, json.loads(body)

    def warmed(name):
        """Wait for the node's first read of the fingerprints (its index has blocks)."""
        t0 = _time.monotonic()
        while _time.monotonic() - t0 < 600:
            if nodes[name].proc.poll() is not None:
                raise SystemExit("%s exited:\n%s" % (name, nodes[name].log_tail()))
            try:
                status, body = call(name, "GET", "/_node/status", timeout=5)
                if status == 200 and (body["sync"]["blocks"] > 1 or name == "c"):
                    return _time.monotonic() - t0
            except OSError:
                pass
            _time.sleep(0.2)
        raise SystemExit("%s: no index after 600 s" % name)

    def loadavg():
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])

    lua = os.path.join(work, "get.lua")
    with open(lua, "w") as f:
        f.write(GET_LUA % {"collection": "c"})  # scale.py's random GETs, in collection c

    def wrk(name, seconds):
        out = subprocess.run(["wrk", "-t2", "-c16", "-d%ds" % seconds, "--timeout", "10s", "--latency", "-s", lua,
                              urls[name], "--", str(n)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=seconds + 60)
        return parse_wrk(out.stdout.decode("utf-8", "replace"))

    try:
        for name in ("a", "b", "c"):
            start(name)
        for name in ("a", "b", "c"):
            print(json.dumps({"figure": "start", "node": name, "seconds_to_index": round(warmed(name), 1),
                              "load": loadavg()}), flush=True)
        load = loadavg()
        status, body = call("a", "POST", "/_node/sync?peer=" + urls["b"])
        report = body["peers"][0]
        print(json.dumps(dict(report, figure="differences", records=n, differences_per_kind=d, load_before=load,
                              load_after=loadavg(), code=status)), flush=True)
        status, body = call("a", "POST", "/_node/sync?peer=" + urls["b"])
        print(json.dumps(dict(body["peers"][0], figure="identical", records=n, load=loadavg())), flush=True)
        for uid in ("only-b-00000", "only-a-00000"):
            for name in ("a", "b"):
                code, _ = request("127.0.0.1", ports[name], "GET", "/c/%s?local=1" % uid)
                if code != 200:
                    raise SystemExit("%s does not hold %s after the sync" % (name, uid))

        # Client GET p99 on A: without a sync, while A sends C (empty) a full copy, without again.
        status, body = call("a", "GET", "/_node/status")
        runs = []
        for phase in ("without", "with", "without", "with", "without"):
            if phase == "with":
                if nodes["c"].proc.poll() is not None:
                    nodes["c"].proc.wait()
                    start("c")
                    warmed("c")
                syncing = subprocess.Popen(
                    [sys.executable, "-c", "import urllib.request,sys; urllib.request.urlopen(urllib.request."
                     "Request(sys.argv[1], method='POST'), timeout=3600).read()",
                     urls["a"] + "/_node/sync?peer=" + urls["c"]], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                _time.sleep(2)
            figures = wrk("a", args.wrk_seconds)
            still = None
            if phase == "with":
                still = syncing.poll() is None
                nodes["c"].stop()  # ends the sync (connection refused)
                syncing.wait()
            runs.append(dict(figures, phase=phase, sync_still_running=still, load=loadavg()))
            print(json.dumps(dict(runs[-1], figure="get")), flush=True)
        without = [r["p99"] for r in runs if r["phase"] == "without"]
        with_ = [r["p99"] for r in runs if r["phase"] == "with"]
        import statistics
        print(json.dumps({"figure": "get_p99", "without_ms": without, "with_ms": with_,
                          "ratio": round(statistics.median(with_) / statistics.median(without), 3)}), flush=True)
        status, body = call("a", "GET", "/_node/status")
        print(json.dumps({"figure": "copy_to_c", "last": [p for p in body["sync"]["peers"] if p["peer"] == urls["c"]]}))
    finally:
        for server in nodes.values():
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--differences", type=int, default=100, help="of each of the six kinds")
    parser.add_argument("--engine", choices=["memory", "sqlite", "files"], default="memory")
    parser.add_argument("--nodes", action="store_true", help="real twistd nodes on copies of a filled data directory")
    parser.add_argument("--cache", default="/tmp/minstore-scale", help="(--nodes) where bench/scale.py keeps its fills")
    parser.add_argument("--batch", type=int, default=1000, help="(--nodes) WriteItems per write of a new fill")
    parser.add_argument("--wrk-seconds", type=int, default=8, help="(--nodes) seconds of each GET run")
    parser.add_argument("--keep", action="store_true", help="(--nodes) keep the work directory")
    args = parser.parse_args()
    args.refill = False
    if args.nodes:
        if args.engine == "memory":
            args.engine = "sqlite"
        return nodes_main(args)
    n, d = args.records, args.differences

    tmp = tempfile.mkdtemp(prefix="sync-bench-")
    clock = Clock()
    net = FakeNetwork()
    a = make("a", ["b"], net, clock, args.engine, tmp)
    b = make("b", ["a"], net, clock, args.engine, tmp)
    common = [replica("u%07d" % i, i) for i in range(n)]
    load(a.storage, common)
    load(b.storage, common)

    for name, s in (("a", a), ("b", b)):
        start = time.perf_counter()
        count = s.index.warm()
        print(json.dumps({"figure": "build", "node": name, "engine": args.engine, "items": count,
                          "blocks": s.index.blocks(), "seconds": round(time.perf_counter() - start, 3)}))

    report = run_sync(a, b)
    print(json.dumps(dict(report, figure="identical", records=n)))

    # d of each kind, spread over the key space.
    step = max(1, n // (4 * d + 1))
    picks = iter(range(0, n, step))
    on_a, on_b = [], []
    for i in range(d):
        on_a.append(replica("only-a-%05d" % i, n + i))
        on_b.append(replica("only-b-%05d" % i, n + i))
        on_a.append(replica("u%07d" % next(picks), 10 ** 9 + i, "newer-a"))
        on_b.append(replica("u%07d" % next(picks), 10 ** 9 + i, "newer-b"))
        (on_a if i % 2 else on_b).append(tombstone("u%07d" % next(picks), 10 ** 9 + i))
    for s, records in ((a, on_a), (b, on_b)):
        for data in records:
            s.node.apply_replica(data)
    report = run_sync(a, b)
    equal = held(a.storage) == held(b.storage)
    print(json.dumps(dict(report, figure="differences", records=n, differences_per_kind=d, equal=equal)))

    report = run_sync(a, b)
    print(json.dumps(dict(report, figure="again", records=n)))

    b.node.apply_replica(replica("one-more", 2 * 10 ** 9))
    report = run_sync(a, b)
    print(json.dumps(dict(report, figure="one", records=n, equal=held(a.storage) == held(b.storage))))


if __name__ == "__main__":
    main()
