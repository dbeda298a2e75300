"""
Compare and synchronise (DESIGN section 4): range-based set reconciliation
between two peers, in the spirit of negentropy (A. Meyer); the records that
differ travel in the same messages, through the node's replica path.

The set.  What a node holds is the set of ``(collection, uid, version)`` of
its records and tombstones, in ``(collection, uid)`` order (the storage's
L{minstore.interfaces.IStorage.scan_versions}).  A range ``(lo, hi]`` (lo
excluded, hi included; BOTTOM and TOP: unbounded) has a fingerprint: the
number of items in it and the XOR of the first 8 bytes of the SHA-256 of
each item.  Equal fingerprints: the two sides hold the same versions there.

The exchange (``POST /_cluster/sync/ranges``), after negentropy: both
sides answer a message alike (L{SyncIndex.reply}), so each message goes one
level further down.  A message (binary, L{encode_message}) covers the key
space with consecutive ranges, each given by its upper bound (front-coded
against the previous one) and a mode:

* ``SKIP``: settled, nothing to say;
* ``FP`` (count, fingerprint): what the sender holds there.  The receiver
  answers SKIP when it holds the same; all its records there when the
  sender holds none; its ids (``IDS``) when it holds at most L{LEAF}; else
  the range cut into up to L{FANOUT} sub-ranges (at its block boundaries,
  or at item quantiles when few) with their fingerprints;
* ``IDS`` (ids): the sender's items there.  The receiver settles the range:
  it sends the records whose ids the sender lacks, and answers ``WANT``
  with the sender's ids it lacks (or SKIP);
* ``WANT`` (ids): send these.  The receiver sends its records whose ids
  are asked, as held now (after storing the records the message carried:
  one it has just received a newer version of is not sent back).

A message also carries records (pushes one way, pulls the other), stored
with L{minstore.node.Node.apply_replicas} before the answer is worked out
(byte for byte, only when newer than what is held, a tombstone included, in
the storage's feed), and how many of the previous message's records were
stored (the initiator's ``pushed``).  Fingerprints and ids are 4 bytes: the
64-bit hashes cut through a random odd salt each sync chooses
(multiply-shift, a universal hash), so that two different sets agree by
chance with a probability of about 2^-31 a range, never twice the same way.
The initiator starts with its own answer to "the whole key space differs"
and stops when its answer would say nothing (every range SKIP, no record).
Identical nodes: one round trip.  The peer keeps no state between requests.

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

Bounds.  Every request has a time-out on the node's clock; a request this
node sends holds at most L{REQUEST_META} bytes of ranges and
L{REQUEST_RECORDS} of records, an answer at most L{ANSWER_META} and
L{ANSWER_RECORDS} (past them, ranges are answered with fingerprints: asked
again next round); an answer over L{MAX_ANSWER} bytes, one it cannot parse
(L{decode_message}: counts, lengths, order of the bounds, modes, trailing
bytes, the salt) or that carries a record that is not one fails that sync
with a L{SyncError}, logged and counted, and stores nothing more; a peer that
goes L{MAX_DEPTH} rounds without a record does not converge.  A malformed
request is a 400 ``bad_sync_message``.

Pacing.  Each side works a message out in the thread pool L{CHUNK} ranges
at a time, and waits (on the node's clock) ``pace`` times as long as each
chunk took, so that clients keep their latency while a sync runs; a chunk
during which no client request came is not followed by a wait.

Tombstones (L{minstore.cluster.purge}).  Each message's header carries
its sender's purge horizon (the highest version of a tombstone it purged;
empty: none), both ways.  The initiator sends none of its items whose
version is at or below the peer's horizon and whose key the peer is not
known to hold (it sent no record of it in this sync: L{Withhold}); one
set aside whose key the peer then sends goes in the next message, the
others are withheld, or, while the node rejoins (its syncs send nothing),
taken for deleted once the sync has completed.  The peer withholds such
items only where the initiator holds nothing at all (a count of 0, no ids),
and says how many in its header.  Each side drops a received record of a
key it does not hold at or below its own horizon (the initiator counts
them), and the storage's NEWER check refuses them too.  A completed sync
confirms to the purge that the peer holds every tombstone this node held
when it began.
"""

import bisect
import hashlib
import json
import random
import threading
import time
import zlib
from collections import deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred, gatherResults, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.application.service import Service
from twisted.logger import Logger

from minstore.cluster.purge import MAX_HORIZON
from minstore.errors import BadRequest

#: Below every ``(collection, uid)``, and above every one (collection names are ASCII).
BOTTOM = ()
TOP = ("\U0010ffff",)
#: Expected items per block of the index.
BLOCK = 128
#: Sub-ranges a differing range is cut into.
FANOUT = 16
#: A range holding at most this many items is answered with their ids.
LEAF = 16
#: A differing range holding at most this many is cut at item quantiles (read whole), not at blocks.
SPLIT_BY_ITEMS = 512
#: A list of ids (or wants) is settled against at most this many items held; more: the range is cut.
SETTLE = 1024
#: The modes of a range in a message.
SKIP, FP, IDS, WANT = 0, 1, 2, 3
#: Bytes of a fingerprint or an id on the wire.
FP_BYTES = 4
MASK64 = (1 << 64) - 1
#: The first byte of a message: its format.
MAGIC = b"\x03"
#: Bounds of a message's parts.
MAX_RANGES = 1 << 17
MAX_IDS = 1 << 16
MAX_RECORDS = 1 << 20
MAX_KEY = 4096
MAX_COUNT = 1 << 48
#: About what one range costs in a message (for the budgets).
ENTRY_COST = 10
#: Bytes of a request body this node sends (peers accept up to --max-record-size):
#: metadata and records.
MAX_MESSAGE = 768 * 1024
REQUEST_META = 192 * 1024
REQUEST_RECORDS = 512 * 1024
#: Bytes of an answer this node accepts from a peer.
MAX_ANSWER = 4 * 1024 * 1024
#: Bytes of metadata and of records this node puts in one answer (past them: ranges answered with fingerprints).
ANSWER_META = 1024 * 1024
ANSWER_RECORDS = 1024 * 1024
#: Rounds in a row without a record, past which a peer is said not to converge.
MAX_DEPTH = 40
#: Rows read from storage at a time.
SCAN_CHUNK = 2048
#: Ranges of a message worked out in one call to the thread pool.
CHUNK = 256


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
                pieces = self._recompute(block) if dirty else [(block.lo, block.hi, n, fp)]
                for p_lo, p_hi, m, f in pieces:
                    if p_hi <= a or p_lo >= b:
                        continue
                    if p_lo >= a and p_hi <= b:
                        out.append((p_lo, p_hi, m, f))
                    else:
                        pa, pb = max(p_lo, a), min(p_hi, b)
                        out.append((pa, pb) + self._fold(pa, pb))
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
            pass  # cut at item quantiles: the parts then hold about LEAF each
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
            return [(hi,) + self._total([(lo, hi, len(items), _fold_items(items))])]
        count = max(2, min(FANOUT, -(-len(items) // LEAF)))
        parts, start = [], 0
        for k in range(count):
            end = len(items) * (k + 1) // count
            if end <= start:
                continue
            parts.append(((items[end - 1][0], items[end - 1][1]), end - start, _fold_items(items[start:end])))
            start = end
        last = parts[-1]
        parts[-1] = (hi, last[1], last[2])
        return parts

    def reply(self, entries, salt, meta_budget, record_budget, rule=None):
        """
        One side's answer to the other's ranges (see the module's doc):
        ``(out, records, meta, size)``, ``out`` a list of ``(lo, hi, mode,
        payload)``, ``records`` the bytes to send, ``meta`` and ``size``
        what they cost (about).  ``rule`` (a L{Withhold}), when given,
        decides which records may be sent (the purge horizon).
        """
        out, records = [], []
        meta = size = 0
        for lo, hi, mode, payload in entries:
            if mode == SKIP:
                out.append((lo, hi, SKIP, None))
                continue
            segments = self.segments(lo, hi)
            n, fp = self._total(segments)
            short = shorten(fp, salt)
            if mode == FP and payload == (n, short):
                out.append((lo, hi, SKIP, None))
                continue
            if meta >= meta_budget or size >= record_budget:
                # Out of room: say what is held here; they compare again next round.
                out.append((lo, hi, FP, (n, short)))
                meta += ENTRY_COST
                continue
            if mode != FP and n > SETTLE:
                # A list against many here: cut the range instead.
                mode, payload = FP, ((len(payload), None) if mode == IDS else None)
            if mode == FP:
                if payload is not None and payload[0] == 0:
                    # They hold nothing here: everything held, as far as it fits.
                    sent, done, last = self._records_of(
                        self._scan(lo, hi), records, record_budget - size, rule, exact=True
                    )
                    size += sent
                    if done:
                        out.append((lo, hi, SKIP, None))
                    elif last is None:
                        out.append((lo, hi, FP, (n, short)))
                    else:
                        rest_n, rest_fp = self.fingerprint(last, hi)
                        out.append((lo, last, SKIP, None))
                        out.append((last, hi, FP, (rest_n, shorten(rest_fp, salt))))
                    meta += ENTRY_COST
                elif n <= LEAF:
                    ids = [shorten(item_hash(c, u, v), salt) for c, u, v in self._scan(lo, hi)]
                    out.append((lo, hi, IDS, ids))
                    meta += ENTRY_COST + FP_BYTES * len(ids)
                else:
                    start = lo
                    for b, m, f in self.split(lo, hi, segments, n):
                        out.append((start, b, FP, (m, shorten(f, salt))))
                        start = b
                        meta += ENTRY_COST
                continue
            held = [(shorten(item_hash(c, u, v), salt), (c, u, v)) for c, u, v in self._scan(lo, hi)]
            if mode == IDS:
                # Settle: send what they lack (or hold another version of), want what we lack.
                theirs = set(payload)
                items = [item for h, item in held if h not in theirs]
                mine = set(h for h, _ in held)
                wants = [h for h in payload if h not in mine]
            else:  # WANT: the records asked, of the versions held now
                wanted = set(payload)
                items = [item for h, item in held if h in wanted]
                wants = []
            # An empty list of ids: they hold nothing here (known exactly).
            sent, done, _ = self._records_of(
                items, records, record_budget - size, rule, exact=(mode == IDS and not payload)
            )
            size += sent
            if not done:
                out.append((lo, hi, FP, (n, short)))
                meta += ENTRY_COST
            elif wants:
                out.append((lo, hi, WANT, wants))
                meta += ENTRY_COST + FP_BYTES * len(wants)
            else:
                out.append((lo, hi, SKIP, None))
        return out, records, meta, size

    def _records_of(self, items, records, budget, rule=None, exact=False):
        """
        Append the bytes held of ``items`` (``(collection, uid, version)``)
        to ``records``, in order, up to ``budget`` bytes, those that ``rule``
        lets go (``exact``: the other side holds nothing in their range):
        ``(bytes, all sent, the last key sent)``.
        """
        size, last = 0, None
        for item in items:
            key = (item[0], item[1])
            if rule is not None and not rule.may_send(key, item[2], exact):
                continue
            data = self.storage.get(*key)
            if data is None:
                continue
            if size + len(data) > budget:
                return size, False, last
            records.append(data)
            size += len(data)
            last = key
        return size, True, last


class Withhold:
    """
    Which of its records one side of a sync may send (the purge horizon,
    L{minstore.cluster.purge}): none of an item that the other side may
    have purged, the version at or below the other side's ``horizon`` and
    the key not known to be held there (``held``: the keys the other side
    sent records of in this sync).  Such items are set ``aside`` instead.
    With ``exact_only`` (the peer's side), only where the other side is
    known to hold nothing in the range (it said so: a count of 0, no ids);
    elsewhere the other side (the node that syncs) judges what it receives.
    With ``pull_only`` (a rejoining node), no record is sent at all.
    """

    def __init__(self, horizon, exact_only=False, pull_only=False, held=frozenset()):
        self.horizon = horizon
        self.exact_only = exact_only
        self.pull_only = pull_only
        self.held = held
        #: ``(key, version)`` not sent, being at or below the horizon.
        self.aside = []

    def may_send(self, key, version, exact):
        if (
            self.horizon is not None
            and version <= self.horizon
            and key not in self.held
            and (exact or not self.exact_only)
        ):
            self.aside.append((key, version))
            return False
        return not self.pull_only


def _fold_items(items):
    fp = 0
    for c, u, v in items:
        fp ^= item_hash(c, u, v)
    return fp


def shorten(h, salt):
    """A 64-bit hash cut to FP_BYTES, through the sync's salt (multiply-shift: a universal hash)."""
    return ((h * salt) & MASK64) >> (64 - 8 * FP_BYTES)


def key_bytes(key):
    return ("%s\0%s" % key).encode("utf-8")


def _varint(out, n):
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


class Message:
    """
    A decoded sync message: its salt, the count the sender stored, the
    sender's purge horizon (None: nothing purged) and how many records it
    withheld below the receiver's, its ranges and records.
    """

    def __init__(self, salt, stored, entries, records, horizon=None, withheld=0):
        self.salt = salt
        self.stored = stored
        self.horizon = horizon
        self.withheld = withheld
        #: ``(lo, hi, mode, payload)``, consecutive from BOTTOM to TOP.
        self.entries = entries
        self.records = records

    @property
    def record_bytes(self):
        return sum(len(r) for r in self.records)


def encode_message(salt, stored, entries, records, horizon=None, withheld=0):
    """The bytes of a message (see the module's doc); consecutive SKIPs are merged."""
    out = bytearray(MAGIC)
    out += salt.to_bytes(8, "big")
    _varint(out, stored)
    purged = horizon.encode("utf-8") if horizon is not None else b""
    _varint(out, len(purged))
    out += purged
    _varint(out, withheld)
    merged = []
    for lo, hi, mode, payload in entries:
        if mode == SKIP and merged and merged[-1][1] == SKIP:
            merged[-1] = (hi, SKIP, None)
        else:
            merged.append((hi, mode, payload))
    _varint(out, len(merged))
    previous = b""
    for hi, mode, payload in merged:
        if hi == TOP:
            _varint(out, 0)
        else:
            kb = key_bytes(hi)
            shared = 0
            limit = min(len(kb), len(previous))
            while shared < limit and kb[shared] == previous[shared]:
                shared += 1
            _varint(out, shared + 1)
            _varint(out, len(kb) - shared)
            out += kb[shared:]
            previous = kb
        out.append(mode)
        if mode == FP:
            _varint(out, payload[0])
            out += payload[1].to_bytes(FP_BYTES, "big")
        elif mode in (IDS, WANT):
            _varint(out, len(payload))
            for h in payload:
                out += h.to_bytes(FP_BYTES, "big")
    _varint(out, len(records))
    for data in records:
        _varint(out, len(data))
        out += data
    return bytes(out)


class _Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("the message ends early")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self, limit):
        n = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise ValueError("the message ends early")
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise ValueError("a number is too long")
        if n > limit:
            raise ValueError("a number over %d" % limit)
        return n


def decode_message(data):
    """A L{Message} from bytes; ValueError when malformed or over the bounds."""
    if len(data) > MAX_ANSWER:
        raise ValueError("%d bytes (at most %d)" % (len(data), MAX_ANSWER))
    r = _Reader(data)
    if r.take(len(MAGIC)) != MAGIC:
        raise ValueError("not a sync message of format %d" % MAGIC[0])
    salt = int.from_bytes(r.take(8), "big")
    if not salt & 1:
        raise ValueError("the salt is even")
    stored = r.varint(MAX_RECORDS)
    purged = r.take(r.varint(MAX_KEY))
    try:
        horizon = purged.decode("utf-8") if purged else None
    except UnicodeDecodeError:
        raise ValueError("the purge horizon is not UTF-8")
    withheld = r.varint(MAX_RECORDS)
    count = r.varint(MAX_RANGES)
    if count == 0:
        raise ValueError("no ranges")
    entries, lo, previous = [], BOTTOM, b""
    for k in range(count):
        shared = r.varint(len(previous) + 1)
        if shared == 0:
            hi = TOP
        else:
            suffix = r.take(r.varint(MAX_KEY))
            kb = previous[: shared - 1] + suffix
            if kb <= previous:
                raise ValueError("ranges out of order")
            try:
                text = kb.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("a bound is not UTF-8")
            if "\0" not in text:
                raise ValueError("a bound is not collection and uid")
            c, u = text.split("\0", 1)
            hi = (c, u)
            previous = kb
        if (hi == TOP) != (k == count - 1):
            raise ValueError("the ranges do not end at the top")
        mode = r.take(1)[0]
        if mode == SKIP:
            payload = None
        elif mode == FP:
            payload = (r.varint(MAX_COUNT), int.from_bytes(r.take(FP_BYTES), "big"))
        elif mode in (IDS, WANT):
            payload = [int.from_bytes(r.take(FP_BYTES), "big") for _ in range(r.varint(MAX_IDS))]
        else:
            raise ValueError("unknown mode %d" % mode)
        entries.append((lo, hi, mode, payload))
        lo = hi
    records = [r.take(r.varint(MAX_ANSWER)) for _ in range(r.varint(MAX_RECORDS))]
    if r.pos != len(data):
        raise ValueError("%d bytes after the message" % (len(data) - r.pos))
    return Message(salt, stored, entries, records, horizon, withheld)


def is_idle(entries, records):
    """Nothing left to say: every range settled, no record to send."""
    return not records and all(mode == SKIP for _, _, mode, _ in entries)


class _Run:
    """One sync with one peer: its figures."""

    def __init__(self, peer):
        self.peer = peer
        self.round_trips = 0
        self.metadata_bytes = 0
        self.record_bytes = 0
        self.pulled = 0
        self.pushed = 0

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

    def __init__(
        self, node, index, client, peers, clock, in_thread, timeout=10.0, now=time.perf_counter, pace=0.0, purge=None,
        clients=None,
    ):
        """
        @param peers: a callable giving the node's current peer URLs.
        @param timeout: seconds each request to a peer may take.
        @param pace: after each chunk of work in the thread pool, wait this
            many times as long as it took (on ``clock``), so that clients
            keep their latency while a sync runs (0: no wait).
        @param clients: a callable giving how many client requests the node
            has seen so far; when given, a chunk during which none came is
            not followed by a wait (nobody to give way to).
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
        self.pace = pace
        self.clients = clients
        self.last = {}  # peer -> its last report, with when and counters
        self._running = {}  # peer -> Deferred of the report, while one runs
        node.commit_observers.append(index)

    # -- both sides -------------------------------------------------------------

    def horizon(self):
        """This node's purge horizon, told in each message it sends."""
        return self.purge.horizon() if self.purge is not None else None

    def _screen(self, records):
        """
        In a thread: the peer's ``records`` as ``(kept, keys, refused)``:
        those to store, the ``(collection, uid)`` of each (the peer holds
        them), and how many were left out, being of a key not held here at
        or below this node's horizon (the storage's NEWER check refuses them
        too: the last guard).  A record that does not parse is kept (its
        store fails, bad_replica).
        """
        purged = self.storage.purged_version()
        kept, keys, refused = [], [], 0
        for data in records:
            try:
                record = json.loads(data)
                key, version = (record["collection"], record["uid"]), record["version"]
                if type(key[0]) is not str or type(key[1]) is not str or type(version) is not str:
                    raise TypeError("not a record")
            except (ValueError, KeyError, TypeError):
                kept.append(data)
                continue
            keys.append(key)
            if purged is not None and version <= purged and self.storage.get(*key) is None:
                refused += 1
                continue
            kept.append(data)
        return kept, keys, refused

    async def _apply(self, records):
        """Store a peer's records (only the newer); ``(how many stored, their keys, how many refused)``."""
        if not records:
            return 0, [], 0
        kept, keys, refused = await self.in_thread(self._screen, records)
        if not kept:
            return 0, keys, refused
        results = await gatherResults(self.node.apply_replicas(kept), consumeErrors=True).addErrback(
            lambda f: f.value.subFailure
        )
        return sum(1 for stored in results if stored), keys, refused

    async def _reply(self, entries, salt, meta_budget, record_budget, rule=None):
        """This side's answer to a message's ranges, worked out in the thread pool a chunk at a time (paced)."""
        out, records, meta, size = [], [], 0, 0
        for i in range(0, len(entries), CHUNK):
            start = self.now()
            seen = self.clients() if self.clients is not None else None
            o, r, m, s = await self.in_thread(
                self.index.reply, entries[i : i + CHUNK], salt, meta_budget - meta, record_budget - size, rule
            )
            out.extend(o)
            records.extend(r)
            meta += m
            size += s
            if self.pace and (seen is None or self.clients() != seen):
                await deferLater(self.clock, (self.now() - start) * self.pace, lambda: None)
        return out, records

    # -- the peer's side -------------------------------------------------------

    def answer_ranges(self, body):
        """Deferred bytes: the answer to an initiator's message (BadRequest when it is malformed)."""
        try:
            message = decode_message(body)
        except ValueError as e:
            raise BadRequest("bad_sync_message", "not a sync message: %s" % (e,))

        horizon = message.horizon
        if horizon is not None and len(horizon) > MAX_HORIZON:
            raise BadRequest("bad_sync_message", "not a sync message: purged: a version of at most %d characters" % MAX_HORIZON)

        async def answer():
            stored, _, _ = await self._apply(message.records)
            # Records the node that syncs may have purged are not sent where
            # it holds nothing; elsewhere it judges what it receives.
            rule = Withhold(horizon, exact_only=True)
            out, records = await self._reply(message.entries, message.salt, ANSWER_META, ANSWER_RECORDS, rule)
            return encode_message(message.salt, stored, out, records, self.horizon(), len(rule.aside))

        return ensureDeferred(answer())

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

    def _rule(self, run):
        """What this node may send the peer now (None: no purge, everything)."""
        if self.purge is None:
            return None
        p = run.purge
        return Withhold(p["horizon"], pull_only=p["pull_only"], held=run.received)

    async def _reconcile(self, run):
        salt = random.getrandbits(64) | 1
        #: Keys the peer sent a record of (it holds them); ours set aside, below its horizon.
        run.received = set()
        aside = {}
        rule = self._rule(run)
        out, records = await self._reply([(BOTTOM, TOP, FP, None)], salt, REQUEST_META, REQUEST_RECORDS, rule)
        stored = idle = 0
        while not is_idle(out, records):
            body = encode_message(salt, stored, out, records, self.horizon())
            sent = sum(len(r) for r in records)
            answer = await self._ask(run, self.client.sync_ranges, body)
            try:
                message = decode_message(answer)
                if message.salt != salt:
                    raise ValueError("another sync's salt")
                if message.stored > len(records):
                    raise ValueError("%d stored of %d sent" % (message.stored, len(records)))
                if self.purge is not None:
                    self.purge.peer_said(run, message.horizon, message.withheld)
            except ValueError as e:
                raise SyncError("malformed answer from %s: %s" % (run.peer, str(e)[:200]))
            received = message.record_bytes
            run.metadata_bytes += len(body) - sent + len(answer) - received
            run.record_bytes += sent + received
            run.pushed += message.stored
            try:
                stored, keys, refused = await self._apply(message.records)
            except BadRequest as e:
                raise SyncError("%s sent a record that is not one: %s" % (run.peer, e))
            run.pulled += stored
            idle = 0 if (records or message.records) else idle + 1
            if idle > MAX_DEPTH:
                raise SyncError("%s: no agreement after %d rounds without a record" % (run.peer, idle))
            again = []
            if self.purge is not None:
                self.purge.refused(run, refused)
                run.received.update(keys)
                if rule is not None:
                    aside.update(rule.aside)
                # Set aside, and the peer holds the key after all (it sent a version): ours goes.
                again = [key for key in aside if key in run.received]
                for key in again:
                    del aside[key]
                if run.purge["pull_only"]:
                    again = []
            rule = self._rule(run)
            out, records = await self._reply(message.entries, salt, REQUEST_META, REQUEST_RECORDS, rule)
            if again:
                records = [data for data in await self.in_thread(self._read, again) if data is not None] + records
        if rule is not None:
            aside.update(rule.aside)
        for key, version in aside.items():
            if key not in run.received:
                self.purge.set_aside(run, key, version)

    def _read(self, keys):
        return [self.storage.get(*key) for key in keys]

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
    At start, when the node has peers, reads the fingerprints once (in the
    thread pool); with an interval, syncs with every peer in turn, then
    waits the interval (the reactor's clock), errors logged.

    A node without peers reads them when a sync first needs them (a peer
    that lists it): the read takes about 11 s of a core at 1,000,000
    records, which a node that may never sync should not spend while it
    starts serving.
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

        if not list(self.sync.peers()):
            self.log.info("sync index: no peers, read when a sync first needs it")
        else:
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
