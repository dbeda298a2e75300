"""
The lang process's scorers, per call, on this interpreter; and the memory
of a node with the model loaded.

    python bench/lang_bench.py                 # µs a call of each scorer
    python bench/lang_bench.py --node-rss      # RSS of real nodes (and children)

Scorers: ``sparse`` (minstore.process.langscore.SparseScorer, pure Python,
what PyPy uses), ``py3langid-f32`` (py3langid 0.4's numpy over a float32 copy
of its table, what CPython uses) and ``py3langid`` (py3langid as it loads
itself: stock 0.4, or 0.3 and its other model where pip gives 0.3).  Each
classifies the same 95-character English sentence in a loop for
``--seconds``, ``--repeat`` times (after one warm-up round, which PyPy's JIT
needs); the median round is printed.

``--node-rss`` starts ``twistd -n minstore`` (files engine in a temporary
directory, 127.0.0.1, a free port) with the default processes, then with
``--processes schema``, waits for its health check, writes one record, and
prints the VmRSS of the node and of its children; then stops it (SIGTERM).
``--checkout DIR`` runs another checkout's minstore (e.g. the code before
this change) with this interpreter.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from minstore.launcher import NodeStartError, free_port, node_child  # noqa: E402  (standard library only)

SENTENCE = "The quick brown fox jumps over the lazy dog while the children are playing in the sunny garden."
assert len(SENTENCE) == 95


def scorers():
    sys.path.insert(0, HERE)
    from minstore.process import langscore

    made = {}
    t = time.perf_counter()
    made["sparse"] = (langscore.SparseScorer().classify, time.perf_counter() - t)
    if langscore.has_py3langid_04():
        t = time.perf_counter()
        made["py3langid-f32"] = (langscore.Py3langidScorer().classify, time.perf_counter() - t)
    try:
        from py3langid import langid
    except ImportError:
        return made
    t = time.perf_counter()
    if hasattr(langid, "_load_identifier"):
        stock, name = langid._load_identifier(norm_probs=True), "py3langid"
    else:
        stock = langid.LanguageIdentifier.from_pickled_model(langid.MODEL_FILE, norm_probs=True)
        name = "py3langid-0.3 (its own, other model)"
    stock.set_languages([l for l in stock.nb_classes if len(l) == 2])
    made[name] = (stock.classify, time.perf_counter() - t)
    return made


def per_call(classify, seconds):
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(100):
            classify(SENTENCE)
        n += 100
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def bench(args):
    print("%s %s, %s" % (platform.python_implementation(), platform.python_version(), sys.executable))
    for name, (classify, load) in scorers().items():
        per_call(classify, args.seconds)  # warm-up
        rounds = [per_call(classify, args.seconds) for _ in range(args.repeat)]
        median = statistics.median(rounds)
        print(
            "%-40s %8.1f µs a call (%s), %7d calls/s; answer %s; loaded in %.1f s"
            % (name, median * 1e6, "-".join("%.1f" % (r * 1e6) for r in sorted(rounds)),
               1 / median, classify(SENTENCE)[0], load)
        )


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid):
    """The child processes of ``pid``, whichever of its threads started them."""
    found = []
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return sorted(found)


def node_rss(args, processes):
    port = free_port()
    data = tempfile.mkdtemp(prefix="lang-bench-")
    # In the data directory, not this one: python -c puts its directory first on sys.path.
    node = node_child("node", port, os.path.join(data, "d"), os.path.join(data, "node.log"),
                      args=["--processes", processes], checkout=args.checkout, cwd=data)
    url = node.url
    node.start()
    try:
        try:
            node.wait_ready(timeout=60, interval=0.2)
        except NodeStartError:
            raise SystemExit("the node did not start: see %s/node.log" % data)
        body = json.dumps({"value": SENTENCE}).encode()
        request = urllib.request.Request(url + "/bench/1", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        time.sleep(1)
        kids = children(node.pid)
        total = rss_kb(node.pid) + sum(rss_kb(k) for k in kids)
        print("--processes %-12s node %6.1f MB, children %s; total %6.1f MB; lang of the POST: %s"
              % (processes, rss_kb(node.pid) / 1024.0,
                 ", ".join("%.1f MB" % (rss_kb(k) / 1024.0) for k in kids) or "none",
                 total / 1024.0, answer.get("lang")))
    finally:
        node.stop(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--seconds", type=float, default=2.0, help="length of a round (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds after the warm-up (default 5)")
    parser.add_argument("--node-rss", action="store_true", help="measure real nodes' memory instead")
    parser.add_argument("--checkout", default=HERE, help="the minstore checkout run by --node-rss")
    args = parser.parse_args()
    if args.node_rss:
        print("%s %s, minstore from %s" % (platform.python_implementation(), platform.python_version(), args.checkout))
        node_rss(args, "lang,schema")
        node_rss(args, "schema")
    else:
        bench(args)


if __name__ == "__main__":
    main()
