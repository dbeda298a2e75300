"""
Fuzz a node's API from its own /openapi.json (schemathesis, valid and
invalid requests) for a time budget; exit 1 on any finding: a 5xx, or a
status code or content type the document does not declare.

    python bench/fuzz.py --seconds 60                  # a node in memory
    python bench/fuzz.py --seconds 60 --url http://127.0.0.1:8001

Against a real node, run it on a scratch node (``--storage memory``): the
requests create, change and delete records.  tests.test_fuzz runs the
in-memory form with a fixed number of examples.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.fuzzing import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    parser.add_argument("--url", help="a running node's base URL (default: a node in memory)")
    parser.add_argument("--examples", type=int, default=50, help="examples per operation and round")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="first round's seed")
    args = parser.parse_args()
    print("fuzzing %s for %gs, seed %d" % (args.url or "a node in memory", args.seconds, args.seed))
    start = time.monotonic()
    failures, sent = run(max_examples=args.examples, seconds=args.seconds, seed=args.seed, url=args.url)
    print("%d requests in %.1fs, %d findings" % (sent, time.monotonic() - start, len(failures)))
    for operation, text in failures:
        print("\n== %s\n%s" % (operation, text))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
