#!/usr/bin/env python3
"""
Instructions a request costs a node's Python, counted by valgrind's
callgrind: a figure that does not move with the machine's load (this VM's
wrk figures spread by 20-40 % between runs of the same code).

    python3 bench/instructions.py                  # every case
    python3 bench/instructions.py --case hit --case bare

Each case feeds requests to a node's real site (the one ``twistd minstore``
serves: the guard, the API, twisted.web's HTTP channel) through an
in-memory transport, so no socket, system call or thread is counted:

  hit    GET of a record the read cache holds (1,000 records, memory engine)
  miss   GET with the read cache off (sqlite engine, 1,000 records), 14
         requests per storage hop, as a loaded node's reads batch
  post   POST of a new record (memory engine, no processes), 10 per write
  lang   the same with the lang process (a ~200-byte English text each)
  bare   a bare twisted.web Resource answering a fixed record: the floor

A case runs twice under callgrind, with N and 5N requests; the difference
divided by 4N is the cost of a request, start-up and warm-up cancelled.
Needs ``valgrind`` (Debian package); takes 30-60 s a case.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

RECORD = (
    b'{"check_sum":"' + b"a" * 64 + b'","collection":"bench","size":122,"timestamp":1764700000.123,'
    b'"uid":"u0000001","value":"' + b"x" * 120 + b'","version":"1764700000123-000000-abcdef123456"}'
)
CASES = ("hit", "miss", "post", "lang", "bare")


def _transport(port):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    return StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8001), peerAddress=IPv4Address("TCP", "127.0.0.1", port)
    )


def _node_site(storage, read_cache_bytes, in_thread, processes=()):
    from twisted.internet.task import Clock

    from minstore.api import RecordAPI
    from minstore.auth import Guard, GuardResource
    from minstore.node import Node
    from minstore.service import QuietSite

    kwargs = {"read_cache_bytes": read_cache_bytes}
    if in_thread is not None:
        kwargs["in_thread"] = in_thread
    node = Node(storage, processes, node_id="bench", **kwargs)
    node.open()
    site = QuietSite(GuardResource(Guard(), RecordAPI(node).resource()), reactor=Clock())
    site.max_body = 1 << 20
    return node, site


class Hops:
    """An ``in_thread`` whose calls wait until ``run()``: a storage hop carries what queued."""

    def __init__(self):
        self.pending = []

    def __call__(self, f, *args):
        from twisted.internet.defer import Deferred

        d = Deferred()
        self.pending.append((d, f, args))
        return d

    def run(self):
        while self.pending:
            batch, self.pending = self.pending, []
            for d, f, args in batch:
                d.callback(f(*args))


def _channels(site, n):
    channels = []
    for i in range(n):
        channel = site.buildProtocol(None)
        transport = _transport(40000 + i)
        channel.makeConnection(transport)
        channels.append((channel, transport))
    return channels


def _check(transport, expect=b"HTTP/1.1 200 "):
    answer = transport.value()
    if not answer.startswith(expect):
        raise SystemExit("unexpected answer: %r" % (answer[:300],))
    transport.clear()


def _get_requests(count):
    rng = random.Random(7)
    return [
        b"GET /bench/u%07d HTTP/1.1\r\nHost: 127.0.0.1:8001\r\n\r\n" % rng.randrange(count) for _ in range(1000)
    ]


def make_case(case, data_dir):
    """A function running ``n`` requests of the case."""
    from minstore.records import encode_record, make_record
    from minstore.storage import make_storage
    from minstore.storage.memory import MemoryStorage

    if case == "bare":
        from twisted.internet.task import Clock
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Fixed(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"content-type", b"application/json; charset=utf-8")
                request.setHeader(b"etag", b'"1764700000123-000000-abcdef123456"')
                return RECORD

        class Quiet(Site):
            def log(self, request):
                pass

        (channel, transport), = _channels(Quiet(Fixed(), reactor=Clock()), 1)
        request = _get_requests(1)[0]

        def run(n):
            for _ in range(n):
                channel.dataReceived(request)
                _check(transport)

        return run

    if case in ("hit", "miss"):
        hops = Hops() if case == "miss" else None
        storage = make_storage("sqlite", data_dir) if case == "miss" else MemoryStorage()
        node, site = _node_site(storage, 0 if case == "miss" else 32 << 20, hops)
        if hops is not None:
            hops.run()
        from minstore.interfaces import WriteItem

        items = []
        for i in range(1000):
            uid = "u%07d" % i
            record = make_record("bench", uid, "x" * 120, "1764700000123-%06d-bench" % i, 1764700000.0)
            items.append(WriteItem("bench", uid, encode_record(record), False, record["version"]))
        storage.write(items)
        requests = _get_requests(1000)
        channels = _channels(site, 14 if case == "miss" else 1)
        position = [0]

        def run(n):
            done = 0
            while done < n:
                for channel, _ in channels:
                    channel.dataReceived(requests[position[0] % 1000])
                    position[0] += 1
                if hops is not None:
                    hops.run()
                for _, transport in channels:
                    _check(transport)
                done += len(channels)

        if case == "hit":
            run(2000)  # every record into the read cache
        return run

    if case in ("post", "lang"):
        hops = Hops()
        processes, text = (), None
        if case == "lang":
            from minstore.process.lang import LanguageDetection
            from run import TEXT  # bench/run.py's ~200 bytes of English

            processes, text = [LanguageDetection()], TEXT.encode()
        node, site = _node_site(MemoryStorage(), 32 << 20, hops, processes)
        hops.run()
        channels = _channels(site, 10)
        post_body = b'{"value": "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm sill."}'
        counter = [0]

        def body(i):
            # lang's texts differ by their number (as bench/run.py's); post's body is the one of earlier figures.
            return post_body if text is None else b'{"value": "%s %d"}' % (text, i)

        def run(n):
            done = 0
            while done < n:
                for channel, _ in channels:
                    counter[0] += 1
                    data = body(counter[0])
                    channel.dataReceived(
                        b"POST /bench/p%09d HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (counter[0], len(data), data)
                    )
                hops.run()
                for _, transport in channels:
                    _check(transport)
                done += len(channels)

        return run

    raise SystemExit("unknown case %r" % (case,))


def child(case, n):
    """Run in the measured process: warm up, then ``n`` requests."""
    sys.path.insert(0, REPO)
    with tempfile.TemporaryDirectory(prefix="minstore-instructions-") as data_dir:
        run = make_case(case, data_dir)
        run(300)
        t0 = time.process_time()
        run(n)
        print("seconds %.6f" % (time.process_time() - t0))


def callgrind(case, n):
    """Instructions of the whole child process running ``n`` requests."""
    with tempfile.TemporaryDirectory(prefix="minstore-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out, sys.executable,
             os.path.abspath(__file__), "--child", case, "--n", str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900,
        )
        err = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise SystemExit("callgrind of %s failed:\n%s" % (case, err[-2000:]))
        for line in err.splitlines():
            if "Collected :" in line:
                return int(line.split(":")[-1].strip())
    raise SystemExit("no instruction count in callgrind's output:\n" + err[-2000:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=CASES, help="case to count (repeatable; default all)")
    p.add_argument("--n", type=int, default=560, help="requests of the short run (default 560; the long one: 5x)")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.n)
    print("minstore at %s" % (subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                             stdout=subprocess.PIPE).stdout.decode().strip() or "?"))
    for case in args.case or CASES:
        short = callgrind(case, args.n)
        long = callgrind(case, 5 * args.n)
        print("%-5s %9.0f instructions a request" % (case, (long - short) / (4.0 * args.n)), flush=True)


if __name__ == "__main__":
    main()
