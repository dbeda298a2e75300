"""
Compare and synchronise (DESIGN section 4): range-based set reconciliation
between two peers, in the spirit of negentropy (A. Meyer), then a pull and a
push of the records that differ, through the node's replica path.

The set.  What a node holds is the set of ``(collection, uid, version)`` of
its records and tombstones, in ``(collection, uid)`` order (the storage's
L{minstore.interfaces.IStorage.scan_versions}).  A range ``(lo, hi]`` (lo
excluded, hi included; None on the wire: unbounded) has a fingerprint: the
number of items in it and the XOR of the first 8 bytes of the SHA-256 of
each item.  Equal fingerprints: the two sides hold the same versions there.

The exchange (``POST /_cluster/sync/ranges``).  The node that syncs (the
initiator) sends ranges with its fingerprints; the peer answers each range:

* ``0``: same fingerprint, nothing to do;
* ``{"items": [[collection, uid, version], ...], "more": key}``: its items
  there, when it holds at most L{ITEMS} of them, or when the initiator holds
  none (then in pages of L{PAGE}, ``more`` the key the next page follows);
* ``{"split": [[hi, n, fingerprint], ...]}``: it holds many and they differ:
  the range cut in up to L{FANOUT} consecutive sub-ranges at its own
  boundaries, with its fingerprints; the initiator drops the sub-ranges that
  match its own and sends the others in the next round;
* ``null``: not answered (the answer reached its size cap): ask again.

A range answered with items is settled by the initiator alone: it pulls the
keys where the peer's version is newer or only the peer's (``POST
/_cluster/sync/records`` answers their bytes, NDJSON), and pushes those
where its own is newer or only its own (``POST /_cluster/replicas``, as
replication does).  Both sides store what they receive with
L{minstore.node.Node.apply_replicas}: byte for byte, only when newer than
what is held (a tombstone included), in the storage's feed.  The peer keeps
no state between requests.

The fingerprints (L{SyncIndex}).  Each node cuts its key space into blocks
at content-defined boundaries (a key whose CRC-32 is a multiple of L{BLOCK}
ends a block), so two nodes holding nearly the same keys have nearly the
same blocks, and a range that a peer cut at its block boundaries costs the
other side no scan either.  A block keeps its count and XOR; each write the
node stores marks its block dirty (and cuts it when the key is a boundary),
and a dirty block is recomputed from storage (about L{BLOCK} items, one
indexed range read) the next time a fingerprint needs it.  The first
fingerprint (at start, in the thread pool) reads the whole key space once.
A range that cuts a block reads the part it covers.

Bounds.  Every request has a time-out on the node's clock; a request body
this node sends is at most L{MAX_MESSAGE} bytes, an answer it accepts at
most L{MAX_ANSWER}; an answer it cannot parse, or one that does not fit the
ranges asked, fails that sync with a L{SyncError}, logged and counted, and
stores nothing more.

Tombstones (L{minstore.cluster.purge}).  Each answer of a round carries
the peer's purge horizon (``"purged"``, the highest version of a tombstone
it purged, when it has purged any); the initiator pushes none of its items
that the peer does not hold at or below that horizon (they may be records
deleted there), pulls none that it does not hold at or below its own, and
while it rejoins (away longer than the grace period) only pulls, and takes
such items of its own for deleted.  A completed sync confirms to the
purge that the peer holds every tombstone this node held when it began.
"""

import bisect
import hashlib
import json
import threading
import time
import zlib
from collections import deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.application.service import Service
from twisted.logger import Logger

from minstore.errors import BadRequest

#: Below every ``(collection, uid)``, and above every one (collection names are ASCII).
BOTTOM = ()
TOP = ("\U0010ffff",)
#: Expected items per block of the index.
BLOCK = 128
#: Sub-ranges a differing range is cut into.
FANOUT = 16
#: A range holding at most this many items is answered with their list.
ITEMS = 32
#: A differing range holding at most this many is cut at item quantiles (read whole), not at blocks.
SPLIT_BY_ITEMS = FANOUT * ITEMS * 4
#: Items per answer to an initiator that holds none of a range.
PAGE = 1000
#: Ranges in one request.
MAX_RANGES = 128
#: Bytes of a request body this node sends (peers accept up to --max-record-size).
MAX_MESSAGE = 256 * 1024
#: Bytes of an answer this node accepts from a peer.
MAX_ANSWER = 4 * 1024 * 1024
#: Bytes of items or records this node puts in one answer (past it: ``null``, ask again).
ANSWER_BUDGET = 1024 * 1024
#: Keys pulled or pushed in one request.
TRANSFER_KEYS = 500
#: Bytes of records pushed in one request.
PUSH_BYTES = 512 * 1024
#: Splits deeper than this are a peer that does not converge.
MAX_DEPTH = 40
#: Rows read from storage at a time.
SCAN_CHUNK = 2048


class SyncError(Exception):
    """A sync that failed: the peer's answer was malformed, or it did not answer in time."""


def item_hash(collection, uid, version):
    digest = hashlib.sha256(("%s\0%s\0%s" % (collection, uid, version)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def is_boundary(key):
    return zlib.crc32(("%s\0%s" % key).encode("utf-8")) % BLOCK == 0


def _bound(key, edge):
    """The storage's bound for a key of a range: None for BOTTOM and TOP."""
    return None if key == edge else key


def key_json(key):
    return None if key in (BOTTOM, TOP) else list(key)


def parse_key(value, missing):
    """A key from the wire: ``[collection, uid]``, or None (``missing``)."""
    if value is None:
        return missing
    if type(value) is list and len(value) == 2 and type(value[0]) is str and type(value[1]) is str:
        return (value[0], value[1])
    raise ValueError("a key is [collection, uid] or null, not %r" % (value,)[:200])


def parse_fingerprint(n, fp):
    if type(n) is not int or n < 0 or type(fp) is not str or len(fp) != 16:
        raise ValueError("a fingerprint is a count and 16 hex digits")
    return n, int(fp, 16)


def fp_hex(fp):
    return "%016x" % fp


class _Block:
    __slots__ = ("lo", "hi", "n", "fp", "gen", "dirty", "alive")

    def __init__(self, lo, hi, n=0, fp=0, dirty=True):
        self.lo, self.hi, self.n, self.fp = lo, hi, n, fp
        self.gen = 0
        self.dirty = dirty
        self.alive = True


class SyncIndex:
    """
    The blocks of a node's key space with their fingerprints (see the
    module's doc).  ``committed`` runs on the reactor thread (a commit
    observer of the node); the other methods read storage and run in the
    thread pool.
    """

    def __init__(self, storage):
        self.storage = storage
        self._lock = threading.Lock()
        self._blocks = [_Block(BOTTOM, TOP)]
        self._his = [TOP]
        #: Items read from storage, blocks recomputed (for the status and tests).
        self.scanned = 0
        self.recomputed = 0

    # -- on the reactor thread ------------------------------------------------

    def committed(self, stored):
        with self._lock:
            for item, _ in stored:
                self._touch((item.collection, item.uid))

    def _touch(self, key):
        i = bisect.bisect_left(self._his, key)
        block = self._blocks[i]
        block.gen += 1
        block.dirty = True
        if key != block.hi and is_boundary(key):
            block.alive = False
            self._blocks[i : i + 1] = [_Block(block.lo, key), _Block(key, block.hi)]
            self._his[i : i + 1] = [key, block.hi]

    # -- in a thread ------------------------------------------------------------

    def blocks(self):
        with self._lock:
            return len(self._blocks)

    def _scan(self, lo, hi):
        """The ``(collection, uid, version)`` held in ``(lo, hi]``, read a chunk at a time."""
        after, upto = _bound(lo, BOTTOM), _bound(hi, TOP)
        while True:
            rows = self.storage.scan_versions(after, upto, SCAN_CHUNK)
            self.scanned += len(rows)
            for row in rows:
                yield row
            if len(rows) < SCAN_CHUNK:
                return
            after = (rows[-1][0], rows[-1][1])

    def _fold(self, lo, hi):
        n = fp = 0
        for c, u, v in self._scan(lo, hi):
            n += 1
            fp ^= item_hash(c, u, v)
        return n, fp

    def _recompute(self, block):
        """A dirty block read again: its pieces ``(lo, hi, n, fp)``, cached unless written meanwhile."""
        with self._lock:
            lo, hi, gen = block.lo, block.hi, block.gen
        self.recomputed += 1
        pieces = []
        start, n, fp = lo, 0, 0
        for c, u, v in self._scan(lo, hi):
            n += 1
            fp ^= item_hash(c, u, v)
            key = (c, u)
            if key != hi and is_boundary(key):
                pieces.append((start, key, n, fp))
                start, n, fp = key, 0, 0
        pieces.append((start, hi, n, fp))
        with self._lock:
            if block.alive and block.gen == gen:
                i = bisect.bisect_left(self._his, hi)
                if self._blocks[i] is block:
                    block.alive = False
                    self._blocks[i : i + 1] = [_Block(a, b, m, f, dirty=False) for a, b, m, f in pieces]
                    self._his[i : i + 1] = [b for _, b, _, _ in pieces]
        return pieces

    def segments(self, lo, hi):
        """``(lo, hi]`` as consecutive ``(lo, hi, n, fp)``: whole blocks, and the parts of cut ones."""
        with self._lock:
            i = bisect.bisect_right(self._his, lo)
            covered = []
            while i < len(self._blocks) and self._blocks[i].lo < hi:
                b = self._blocks[i]
                covered.append((b, b.dirty, b.n, b.fp))
                i += 1
        out = []
        for block, dirty, n, fp in covered:
            if block.lo >= lo and block.hi <= hi:
                if dirty:
                    out.extend(self._recompute(block))
                else:
                    out.append((block.lo, block.hi, n, fp))
            else:
                a, b = max(block.lo, lo), min(block.hi, hi)
                out.append((a, b) + self._fold(a, b))
        return out

    @staticmethod
    def _total(segments):
        n = fp = 0
        for _, _, m, f in segments:
            n += m
            fp ^= f
        return n, fp

    def fingerprint(self, lo, hi):
        return self._total(self.segments(lo, hi))

    def fingerprints(self, ranges):
        return [self.fingerprint(lo, hi) for lo, hi in ranges]

    def warm(self):
        """Read every dirty block (the first time: the whole key space); how many items are held."""
        return self.fingerprint(BOTTOM, TOP)[0]

    def split(self, lo, hi, segments, n):
        """``(lo, hi]`` holding ``n`` items cut into up to FANOUT ``(hi, n, fp)``."""
        parts = []
        if n <= SPLIT_BY_ITEMS:
            pass  # cut at item quantiles: the parts then hold about ITEMS each
        elif len(segments) > FANOUT:
            target = n / FANOUT
            count, fp = 0, 0
            for _, b, m, f in segments:
                count += m
                fp ^= f
                if count >= target and b != hi:
                    parts.append((b, count, fp))
                    count, fp = 0, 0
            parts.append((hi, count, fp))
        elif len(segments) > 1:
            parts = [(b, m, f) for _, b, m, f in segments]
        if len(parts) > 1:
            return parts
        # Few items, or within one block: cut at item quantiles.
        items = list(self._scan(lo, hi))
        if len(items) < 2:
            return None
        count = max(2, min(FANOUT, -(-len(items) // ITEMS)))
        parts, start = [], 0
        for k in range(count):
            end = len(items) * (k + 1) // count
            if end <= start:
                continue
            fp = 0
            for c, u, v in items[start:end]:
                fp ^= item_hash(c, u, v)
            parts.append(((items[end - 1][0], items[end - 1][1]), end - start, fp))
            start = end
        last = parts[-1]
        parts[-1] = (hi, last[1], last[2])
        return parts

    def answer(self, ranges):
        """The peer's side of a round: the answers to ``[(lo, hi, n, fp)]`` (see the module's doc)."""
        out, budget = [], ANSWER_BUDGET
        for lo, hi, their_n, their_fp in ranges:
            if budget <= 0:
                out.append(None)
                continue
            segments = self.segments(lo, hi)
            n, fp = self._total(segments)
            if n == their_n and fp == their_fp:
                out.append(0)
                continue
            if n <= ITEMS or their_n == 0:
                items, more = [], None
                for c, u, v in self._scan(lo, hi):
                    if len(items) == PAGE:
                        more = [items[-1][0], items[-1][1]]
                        break
                    items.append([c, u, v])
                answer = {"items": items, "more": more}
                budget -= sum(len(c) + len(u) + len(v) + 12 for c, u, v in items)
                out.append(answer)
                continue
            parts = self.split(lo, hi, segments, n)
            if parts is None:  # fewer items than the count said: written meanwhile
                out.append(None)
                continue
            out.append({"split": [[key_json(b), m, fp_hex(f)] for b, m, f in parts]})
            budget -= 64 * len(parts)
        return out

    def records(self, keys):
        """The peer's side of a pull: the bytes held of the keys, up to ANSWER_BUDGET (at least one)."""
        out, size = [], 0
        for collection, uid in keys:
            data = self.storage.get(collection, uid)
            if data is None:
                continue
            if out and size + len(data) > ANSWER_BUDGET:
                break
            out.append(data)
            size += len(data)
        return out


def parse_ranges_request(body):
    """``[(lo, hi, n, fp)]`` from an initiator's message; BadRequest when malformed."""
    try:
        message = json.loads(body)
        ranges = message["ranges"]
        if type(ranges) is not list or len(ranges) > MAX_RANGES:
            raise ValueError("ranges: a list of at most %d" % MAX_RANGES)
        out = []
        for r in ranges:
            if type(r) is not list or len(r) != 4:
                raise ValueError("a range is [lo, hi, n, fingerprint]")
            lo, hi = parse_key(r[0], BOTTOM), parse_key(r[1], TOP)
            if not lo < hi:
                raise ValueError("a range's lo is below its hi")
            out.append((lo, hi) + parse_fingerprint(r[2], r[3]))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise BadRequest("bad_sync_message", "not a sync message: %s" % (e,))


def parse_keys_request(body):
    try:
        keys = json.loads(body)["keys"]
        if type(keys) is not list or len(keys) > TRANSFER_KEYS:
            raise ValueError("keys: a list of at most %d" % TRANSFER_KEYS)
        return [parse_key(k, None) for k in keys if k is not None]
    except (ValueError, KeyError, TypeError) as e:
        raise BadRequest("bad_sync_message", "not a sync message: %s" % (e,))


class _Run:
    """One sync with one peer: its figures, and the keys waiting to be pulled or pushed."""

    def __init__(self, peer):
        self.peer = peer
        self.round_trips = 0
        self.metadata_bytes = 0
        self.record_bytes = 0
        self.pulled = 0
        self.pushed = 0
        self.to_pull = []
        self.to_push = []

    def report(self, seconds, error=None):
        return {
            "peer": self.peer,
            "round_trips": self.round_trips,
            "metadata_bytes": self.metadata_bytes,
            "record_bytes": self.record_bytes,
            "pulled": self.pulled,
            "pushed": self.pushed,
            "seconds": round(seconds, 6),
            "error": error,
        }


class Sync:
    """
    Runs syncs with peers (``sync``, ``sync_all``) and answers theirs
    (``answer_ranges``, ``answer_records``); keeps each peer's last outcome.
    """

    log = Logger()

    def __init__(self, node, index, client, peers, clock, in_thread, timeout=10.0, now=time.perf_counter, purge=None):
        """
        @param peers: a callable giving the node's current peer URLs.
        @param timeout: seconds each request to a peer may take.
        @param purge: the node's L{minstore.cluster.purge.Purger}, or None (tombstones never purged).
        """
        self.purge = purge
        self.node = node
        self.index = index
        self.storage = node.storage
        self.client = client
        self.peers = peers
        self.clock = clock
        self.in_thread = in_thread
        self.timeout = timeout
        self.now = now
        self.last = {}  # peer -> its last report, with when and counters
        self._running = {}  # peer -> Deferred of the report, while one runs
        node.commit_observers.append(index)

    # -- the peer's side -------------------------------------------------------

    def answer_ranges(self, body):
        ranges = parse_ranges_request(body)
        d = self.in_thread(self.index.answer, ranges)
        extra = self.purge.wire() if self.purge is not None else {}
        return d.addCallback(lambda answers: json.dumps(dict(extra, ranges=answers)).encode("utf-8"))

    def answer_records(self, body):
        keys = parse_keys_request(body)
        return self.in_thread(self.index.records, keys).addCallback(
            lambda records: b"".join(r + b"\n" for r in records)
        )

    # -- the initiator's side ------------------------------------------------

    def sync(self, peer):
        """Deferred report of a sync with ``peer`` (one already running with it is joined)."""
        running = self._running.get(peer)
        if running is not None:
            d = Deferred()
            running.append(d)
            return d
        waiters = self._running[peer] = []
        d = ensureDeferred(self._sync(peer))

        def done(report):
            del self._running[peer]
            for w in waiters:
                w.callback(report)
            return report

        return d.addCallback(done)

    def sync_all(self):
        """Deferred list of reports: every peer in turn."""
        async def run():
            return [await self.sync(peer) for peer in list(self.peers())]

        return ensureDeferred(run())

    async def _sync(self, peer):
        run = _Run(peer)
        start = self.now()
        error = None
        if self.purge is not None:
            self.purge.sync_begins(run)
        try:
            await self._reconcile(run)
            if self.purge is not None:
                await self.purge.sync_completed(run)
        except Exception as e:
            error = self._describe(e)
            self.log.error("sync with {peer} failed: {error}", peer=peer, error=error)
        report = run.report(self.now() - start, error)
        if error is None:
            self.log.info(
                "sync with {peer}: {pulled} pulled, {pushed} pushed, {round_trips} round trips, "
                "{metadata_bytes} bytes of metadata in {seconds:.3f}s",
                **report
            )
        self._remember(report)
        return report

    def _describe(self, e):
        if isinstance(e, SyncError):
            return str(e)
        if isinstance(e, (CancelledError, TimeoutError)):
            return "no answer within %gs" % (self.timeout,)
        return "%s: %s" % (type(e).__name__, e)

    def _remember(self, report):
        last = self.last.setdefault(report["peer"], {"syncs": 0, "failures": 0})
        last["syncs"] += 1
        if report["error"] is not None:
            last["failures"] += 1
        last.update(report)
        last["at"] = self.clock.seconds()

    async def _ask(self, run, call, body):
        if len(body) > MAX_MESSAGE:
            raise SyncError("a message to %s would be %d bytes" % (run.peer, len(body)))
        d = ensureDeferred(call(run.peer, body, timeout=self.timeout))
        d.addTimeout(self.timeout, self.clock)
        answer = await d
        run.round_trips += 1
        if len(answer) > MAX_ANSWER:
            raise SyncError("%s answered %d bytes (at most %d)" % (run.peer, len(answer), MAX_ANSWER))
        return answer

    async def _reconcile(self, run):
        # (lo, hi, depth, our fingerprint or None)
        pending = deque([(BOTTOM, TOP, 0, None)])
        while pending:
            batch = [pending.popleft() for _ in range(min(MAX_RANGES, len(pending)))]
            missing = [(lo, hi) for lo, hi, _, fp in batch if fp is None]
            computed = iter(await self.in_thread(self.index.fingerprints, missing) if missing else ())
            batch = [(lo, hi, depth, fp if fp is not None else next(computed)) for lo, hi, depth, fp in batch]
            body = json.dumps(
                {"ranges": [[key_json(lo), key_json(hi), fp[0], fp_hex(fp[1])] for lo, hi, _, fp in batch]}
            ).encode("utf-8")
            answer = await self._ask(run, self.client.sync_ranges, body)
            run.metadata_bytes += len(body) + len(answer)
            try:
                message = json.loads(answer)
                answers = message["ranges"]
                if type(answers) is not list or len(answers) != len(batch):
                    raise ValueError("not one answer per range")
                if self.purge is not None:
                    self.purge.peer_said(run, message)
            except (ValueError, KeyError, TypeError) as e:
                raise SyncError("malformed answer from %s: %s" % (run.peer, e))
            subranges = []
            for (lo, hi, depth, mine), a in zip(batch, answers):
                try:
                    if a == 0 and type(a) is int:
                        continue
                    if a is None:
                        pending.append((lo, hi, depth, mine))
                    elif type(a) is dict and "items" in a:
                        items, more = self._parse_items(a, lo, hi, mine)
                        await self._settle(run, lo, more or hi, items)
                        if more is not None:
                            pending.append((more, hi, depth, (0, 0)))
                    elif type(a) is dict and "split" in a:
                        if depth >= MAX_DEPTH:
                            raise ValueError("ranges split %d times" % depth)
                        subranges.extend(self._parse_split(a["split"], lo, hi, depth + 1))
                    else:
                        raise ValueError("unknown answer %r" % (a,))
                except (ValueError, KeyError, TypeError) as e:
                    raise SyncError("malformed answer from %s: %s" % (run.peer, str(e)[:200]))
            if subranges:
                ours = await self.in_thread(self.index.fingerprints, [(lo, hi) for lo, hi, _, _, _ in subranges])
                for (lo, hi, depth, theirs_n, theirs_fp), mine in zip(subranges, ours):
                    if mine == (theirs_n, theirs_fp):
                        continue
                    if theirs_n == 0:
                        await self._settle(run, lo, hi, [])
                    else:
                        pending.append((lo, hi, depth, mine))
            await self._transfer(run, final=False)
        await self._transfer(run, final=True)

    @staticmethod
    def _parse_items(a, lo, hi, mine):
        more = parse_key(a.get("more"), None)
        raw = a["items"]
        if type(raw) is not list:
            raise ValueError("items: not a list")
        items, previous = [], lo
        for it in raw:
            if type(it) is not list or len(it) != 3 or type(it[2]) is not str:
                raise ValueError("an item is [collection, uid, version]")
            key = parse_key(it[:2], None)
            if not previous < key <= hi:
                raise ValueError("items out of order or out of their range")
            items.append((key, it[2]))
            previous = key
        if more is not None:
            if mine[0] != 0 or not items or more != items[-1][0] or not more < hi:
                raise ValueError("a page of items where none was asked")
        return items, more

    @staticmethod
    def _parse_split(raw, lo, hi, depth):
        if type(raw) is not list or not 2 <= len(raw) <= 4 * FANOUT:
            raise ValueError("split: 2 to %d sub-ranges" % (4 * FANOUT))
        out, previous = [], lo
        for k, part in enumerate(raw):
            if type(part) is not list or len(part) != 3:
                raise ValueError("a sub-range is [hi, n, fingerprint]")
            bound = parse_key(part[0], TOP)
            if k == len(raw) - 1:
                if bound != hi:
                    raise ValueError("the last sub-range does not end the range")
            elif not previous < bound < hi:
                raise ValueError("sub-ranges out of order or out of their range")
            n, fp = parse_fingerprint(part[1], part[2])
            out.append((previous, bound, depth, n, fp))
            previous = bound
        return out

    async def _settle(self, run, lo, hi, theirs):
        """``(lo, hi]`` where the peer holds ``theirs``: note what to pull and push."""
        theirs = dict(theirs)
        after = _bound(lo, BOTTOM)
        upto = _bound(hi, TOP)
        while True:
            rows = await self.in_thread(self.storage.scan_versions, after, upto, SCAN_CHUNK)
            for c, u, v in rows:
                key = (c, u)
                other = theirs.pop(key, None)
                if other is None or v > other:
                    if self.purge is None or self.purge.may_push(run, key, v, other):
                        run.to_push.append(key)
                elif v < other:
                    run.to_pull.append(key)
            if len(rows) < SCAN_CHUNK:
                break
            after = (rows[-1][0], rows[-1][1])
            await self._transfer(run, final=False)
        run.to_pull.extend(theirs if self.purge is None else self.purge.may_pull(run, theirs))

    async def _transfer(self, run, final):
        while len(run.to_pull) >= TRANSFER_KEYS or (final and run.to_pull):
            keys, run.to_pull = run.to_pull[:TRANSFER_KEYS], run.to_pull[TRANSFER_KEYS:]
            await self._pull(run, keys)
        while len(run.to_push) >= TRANSFER_KEYS or (final and run.to_push):
            keys, run.to_push = run.to_push[:TRANSFER_KEYS], run.to_push[TRANSFER_KEYS:]
            await self._push(run, keys)

    async def _pull(self, run, keys):
        while keys:
            body = json.dumps({"keys": [list(k) for k in keys]}).encode("utf-8")
            answer = await self._ask(run, self.client.sync_records, body)
            run.metadata_bytes += len(body)
            lines = [line for line in answer.split(b"\n") if line.strip()]
            if not lines:
                return  # the peer holds none of them (any more)
            run.record_bytes += sum(len(line) for line in lines)
            got = set()
            for line in lines:
                try:
                    record = json.loads(line)
                    got.add((record["collection"], record["uid"]))
                except (ValueError, KeyError, TypeError):
                    raise SyncError("%s sent a record that is not one: %r" % (run.peer, line[:100]))
            results = await gatherResults(self.node.apply_replicas(lines), consumeErrors=True).addErrback(
                lambda f: f.value.subFailure
            )
            run.pulled += len(results)
            rest = [k for k in keys if k not in got]
            if len(rest) == len(keys):
                raise SyncError("%s sent records that were not asked" % (run.peer,))
            keys = rest

    def _read_records(self, keys):
        return [data for data in (self.storage.get(c, u) for c, u in keys) if data is not None]

    async def _push(self, run, keys):
        records = await self.in_thread(self._read_records, keys)
        while records:
            batch, size = [], 0
            while records and (not batch or size + len(records[0]) <= PUSH_BYTES):
                batch.append(records.pop(0))
                size += len(batch[-1])
            d = ensureDeferred(self.client.send_replicas(run.peer, batch, timeout=self.timeout))
            d.addTimeout(self.timeout, self.clock)
            await d
            run.round_trips += 1
            run.record_bytes += size
            run.pushed += len(batch)

    # -- status and metrics -------------------------------------------------

    def status(self):
        return {
            "blocks": self.index.blocks(),
            "peers": [dict(self.last[p], peer=p) for p in self.last],
        }

    def collect(self):
        runs = CounterMetricFamily("minstore_sync_runs", "Syncs run with the peer.", labels=["peer", "outcome"])
        seconds = GaugeMetricFamily("minstore_sync_last_seconds", "Duration of the last sync.", labels=["peer"])
        nbytes = GaugeMetricFamily(
            "minstore_sync_last_bytes", "Bytes the last sync sent and received.", labels=["peer", "kind"]
        )
        diffs = GaugeMetricFamily(
            "minstore_sync_last_differences", "Records the last sync pulled and pushed.", labels=["peer"]
        )
        for peer, last in self.last.items():
            runs.add_metric([peer, "ok"], last["syncs"] - last["failures"])
            runs.add_metric([peer, "error"], last["failures"])
            seconds.add_metric([peer], last["seconds"])
            nbytes.add_metric([peer, "metadata"], last["metadata_bytes"])
            nbytes.add_metric([peer, "records"], last["record_bytes"])
            diffs.add_metric([peer], last["pulled"] + last["pushed"])
        return [runs, seconds, nbytes, diffs]


class SyncService(Service):
    """
    At start, reads the fingerprints once (in the thread pool); with an
    interval, syncs with every peer in turn, then waits the interval
    (the reactor's clock), errors logged.
    """

    log = Logger()

    def __init__(self, sync, interval, clock):
        self.sync = sync
        self.interval = interval
        self.clock = clock
        self._loop = None
        self._warm = None

    def startService(self):
        Service.startService(self)
        start = time.perf_counter()

        def warmed(n):
            self.log.info(
                "sync index: {n} items in {blocks} blocks, read in {seconds:.2f}s",
                n=n,
                blocks=self.sync.index.blocks(),
                seconds=time.perf_counter() - start,
            )

        self._warm = self.sync.in_thread(self.sync.index.warm).addCallbacks(
            warmed, lambda f: self.log.failure("reading the sync index failed", f)
        )
        if self.interval:
            self._loop = LoopingCall(self._round)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def _round(self):
        d = self.sync.sync_all()
        return d.addErrback(lambda f: self.log.failure("periodic sync failed", f))

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return succeed(None)
