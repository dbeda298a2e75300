#!/usr/bin/env python3
"""
Summarise py-spy samples (``py-spy record -f raw``, as ``bench/run.py
--py-spy DIR`` writes them) of a node: where its time goes.

    python3 bench/spy_summary.py DIR/post.txt [--top 30] [--compare DIR/get.txt]

Prints the share of samples per thread kind, the functions with the most
inclusive samples (a function counted once per stack it appears in), the
leaves (self time), and the share of a few named buckets: Klein/werkzeug
routing, twisted.web request handling, Deferred machinery, the node's own
code, the lang process, JSON, metrics, storage, thread hand-offs.
Standard library only.
"""

import argparse
import collections
import re
import sys

#: Ordered: the first bucket whose pattern is found in a stack wins for the
#: "by bucket (first match)" view.
BUCKETS = [
    ("lang process (py3langid)", r"py3langid/|process/lang\.py"),
    ("schema process", r"process/schema\.py|jsonschema/"),
    ("storage engine (files/memory)", r"minstore/storage/"),
    ("metrics (prometheus_client)", r"prometheus_client/|minstore/metrics\.py"),
    ("thread pool hand-off", r"twisted/python/threadpool\.py|twisted/_threads/|twisted/internet/threads\.py|callFromThread|threading\.py"),
    ("werkzeug routing", r"werkzeug/routing/"),
    ("klein", r"klein/"),
    ("minstore api.py", r"minstore/api\.py"),
    ("minstore node.py", r"minstore/node\.py"),
    ("minstore other", r"minstore/"),
    ("twisted.web http", r"twisted/web/"),
    ("deferreds", r"twisted/internet/defer\.py"),
    ("reactor / tcp", r"twisted/internet/"),
]

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def read(path):
    """[(thread, [frames outermost first], count)]"""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                count = int(count)
            except ValueError:
                continue
            frames = stack.split(";")
            thread = frames[0] if frames and frames[0].startswith("thread") else "?"
            if thread != "?":
                frames = frames[1:]
            stacks.append((thread, frames, count))
    return stacks


def short(frame):
    m = FRAME.match(frame)
    if not m:
        return frame
    return "%s (%s)" % (m.group("func"), m.group("file"))


def thread_kind(frames):
    joined = ";".join(frames)
    if "ThreadPool._worker" in joined or "threadpool.py" in joined or "_threads/" in joined:
        return "thread pool"
    if "ReactorBase.run" in joined or "mainLoop" in joined:
        return "reactor thread"
    return "other"


def summarise(path, top):
    stacks = read(path)
    total = sum(c for _, _, c in stacks)
    if not total:
        print("%s: no samples" % path)
        return {}
    print("== %s: %d samples" % (path, total))
    kinds = collections.Counter()
    inclusive = collections.Counter()
    leaves = collections.Counter()
    first_bucket = collections.Counter()
    any_bucket = collections.Counter()
    for thread, frames, count in stacks:
        kinds[thread_kind(frames)] += count
        seen = set()
        for frame in frames:
            name = short(frame)
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
        if frames:
            leaves[short(frames[-1])] += count
        joined = ";".join(frames)
        # Innermost frame decides the bucket: walk from the leaf outwards.
        chosen = None
        for frame in reversed(frames):
            for bucket, pattern in BUCKETS:
                if re.search(pattern, frame):
                    chosen = bucket
                    break
            if chosen:
                break
        first_bucket[chosen or "other (stdlib, interpreter)"] += count
        for bucket, pattern in BUCKETS:
            if re.search(pattern, joined):
                any_bucket[bucket] += count

    def pct(n):
        return "%5.1f%%" % (100.0 * n / total)

    print("-- by thread")
    for kind, n in kinds.most_common():
        print("  %s  %s" % (pct(n), kind))
    print("-- self time by bucket (the innermost matching frame of each sample)")
    for bucket, n in first_bucket.most_common():
        print("  %s  %s" % (pct(n), bucket))
    print("-- inclusive by bucket (a sample counts in every bucket on its stack)")
    for bucket, n in any_bucket.most_common():
        print("  %s  %s" % (pct(n), bucket))
    print("-- top %d inclusive functions" % top)
    for name, n in inclusive.most_common(top):
        print("  %s  %s" % (pct(n), name))
    print("-- top %d leaves (self)" % top)
    for name, n in leaves.most_common(top):
        print("  %s  %s" % (pct(n), name))
    return {name: n / total for name, n in inclusive.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="py-spy raw (collapsed stack) files")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--grep", help="only print inclusive shares of functions matching this regex")
    args = p.parse_args(argv)
    for path in args.files:
        shares = summarise(path, args.top)
        if args.grep:
            print("-- inclusive, matching %r" % args.grep)
            for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
                if re.search(args.grep, name):
                    print("  %5.1f%%  %s" % (100 * share, name))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
