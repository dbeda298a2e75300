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
  (only on A, only on B, newer on A, newer on B, deleted on A, deleted on B),
  and that both end equal;
* ``again``: one more sync once equal (the blocks the previous one dirtied
  are read again);
* ``one``: a sync with a single record only on B.

    python3 bench/sync_bench.py                       # 100k records, memory
    python3 bench/sync_bench.py --records 100000 --differences 100 --engine sqlite
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--differences", type=int, default=100, help="of each of the six kinds")
    parser.add_argument("--engine", choices=["memory", "sqlite"], default="memory")
    args = parser.parse_args()
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
