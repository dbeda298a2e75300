"""
The node: what a write, a read, a delete and a listing do, whatever the
transport.  The HTTP layer (L{minstore.api}) only parses and answers.

Storage is reached only through ``in_thread`` (the service's thread pool in
a running node, an inline call in unit tests).  Writes to one uid are
serialised by a per-uid lock; writes to different uids that arrive while a
storage write is in flight are committed together in the next one (group
commit), and each is acknowledged only once its batch is durable.

The threaded processes at the end of the chain (``lang`` and ``schema`` by
default) run in the same thread hop as the storage write of their batch:
the records go from the reactor to the writer thread once, are processed,
encoded, stored, and come back once.  A hop of their own cost each write a
wait for the reactor's next turn under load (measured in bench/RESULTS.md).

Secondary indexes (``--indexes``): the node gives the storage its
declarations at open and, when one is new over records already held, builds
it in the background, a step of ``INDEX_BUILD_STEP`` sequence numbers per
thread hop (each step holds the storage's write lock only for itself), while
reads and writes go on; until then its filters answer 503 ``index_building``.
"""

import base64
import hashlib
import json
import time
import uuid
from inspect import iscoroutine
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from minstore import __version__
from minstore.batch import BatchedCalls, Batcher
from minstore.errors import (
    BadRequest,
    IndexBuilding,
    InsufficientStorage,
    NotFound,
    PreconditionFailed,
    RecordExists,
    ServiceUnavailable,
    StorageFailed,
)
from minstore.interfaces import ABSENT, NEWER, IStorage, WriteItem
from minstore.lru import ByteLRU
from minstore.metrics import NodeMetrics
from minstore.process import run_pipeline
from minstore.records import (
    HybridLogicalClock,
    canonical_json,
    check_collection,
    check_uid,
    encode_record,
    make_record,
    make_tombstone,
)

from minstore.storage.indexes import (
    OPERATORS,
    bounds,
    decode_index_cursor,
    encode_index_cursor,
    fields_by_collection,
    parse_value,
)

MAX_LIST_LIMIT = 1000
#: /_changes: changes a page holds by default, and at most.
DEFAULT_CHANGES_LIMIT = 100
MAX_CHANGES_LIMIT = 1000
#: Sequence numbers an index build goes through per step (one thread hop,
#: one transaction under the storage's write lock).
INDEX_BUILD_STEP = 1000


def run_inline(f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """Call ``f`` now, as a Deferred: the ``in_thread`` of unit tests."""
    try:
        return succeed(f(*args))
    except BaseException:
        return fail()


class KeyedLock:
    """One lock per key, existing only while somebody holds it."""

    def __init__(self):
        self._waiters = {}

    def acquire(self, key):
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = []
            return succeed(None)
        d = Deferred()
        waiters.append(d)
        return d

    def release(self, key):
        waiters = self._waiters[key]
        if waiters:
            waiters.pop(0).callback(None)
        else:
            del self._waiters[key]

    def locked(self, key):
        return key in self._waiters

    def run(self, key, f, *args):
        """
        Deferred result of ``f(*args)`` (a Deferred, a coroutine or a value),
        run under the key's lock.
        """
        def release(result):
            self.release(key)
            return result

        if key in self._waiters:
            return self.acquire(key).addCallback(lambda _: _call(f, args)).addBoth(release)
        # Free, the common case: take it and call at once, with no Deferred
        # of the lock's own (nor a coroutine layer) on every write.
        self._waiters[key] = []
        try:
            result = _call(f, args)
        except BaseException:
            self.release(key)
            return fail()
        if isinstance(result, Deferred):
            return result.addBoth(release)
        self.release(key)
        return succeed(result)


def _call(f, args):
    result = f(*args)
    return ensureDeferred(result) if iscoroutine(result) else result


def etag_matches(header: str, version: str) -> bool:
    """Whether an If-Match / If-None-Match header value names this version."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == version:
            return True
    return False


def encode_cursor(uid: str) -> str:
    return base64.urlsafe_b64encode(uid.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        uid = base64.b64decode(
            cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True
        ).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        uid = ""
    if not uid:
        raise BadRequest("bad_parameter", "after: not a cursor from a listing's next")
    return uid


class _Write:
    """
    A write on its way to the storage: the bytes of a record or tombstone,
    or a record that the writer thread still has to put through the
    threaded processes and encode (``record``; ``current``, the L{Entry}
    it replaces, makes an unchanged PUT a no-op).
    """

    __slots__ = ("collection", "uid", "data", "deleted", "version", "forward", "record", "current", "condition")

    def __init__(
        self, collection, uid, version, data=None, deleted=False, forward=True, record=None, current=None, condition=None
    ):
        self.collection = collection
        self.uid = uid
        self.version = version
        self.data = data
        self.deleted = deleted
        self.forward = forward
        self.record = record
        self.current = current
        #: None, or the storage's ABSENT (a POST) or NEWER (a replica).
        self.condition = condition

    def item(self):
        return WriteItem(self.collection, self.uid, self.data, self.deleted, self.version, self.forward, self.condition)


def _now(result):
    """The result of a process called in a thread: a value, or a Deferred that has fired."""
    if isinstance(result, Deferred):
        fired = []
        result.addBoth(fired.append)
        if not fired:
            raise TypeError("a threaded process returned a Deferred that has not fired")
        result = fired[0]
        if isinstance(result, Failure):
            result.raiseException()
    return result


# Not frozen: one is made per request, and a frozen class's __init__ costs
# about 2.5 times a plain one (object.__setattr__ per field).
@attr.s(slots=True, auto_attribs=True)
class Entry:
    """
    A stored record or tombstone as read: its bytes and what the node needs;
    ``seq``, the storage's sequence number, when this node just stored it.
    """

    data: bytes = attr.ib(repr=False)
    version: str
    deleted: bool
    seq: Optional[int] = None

    @classmethod
    def parse(cls, data: bytes) -> "Entry":
        record = json.loads(data)
        return cls(data, record["version"], bool(record.get("deleted")))


class Node:
    log = Logger()

    def __init__(
        self,
        storage: IStorage,
        processes: Iterable[Any] = (),
        node_id: Optional[str] = None,
        clock: Optional[HybridLogicalClock] = None,
        in_thread: Callable[..., "Deferred[Any]"] = run_inline,
        metrics: Optional[NodeMetrics] = None,
        read_cache_bytes: int = 32 * 1024 * 1024,
        max_inflight_writes: int = 2,
        now: Callable[[], float] = time.time,
        indexes: Iterable[Any] = (),
        index_build_rate: float = 0,
        reactor: Any = None,
    ) -> None:
        self.storage = storage
        self.processes = list(processes)
        # The threaded processes at the end of the chain run in the writer
        # thread, in the storage write's hop; the others before, as
        # Deferred callbacks on the reactor (threaded ones among them
        # through in_thread).
        split = len(self.processes)
        while split and getattr(self.processes[split - 1], "threaded", False):
            split -= 1
        self._reactor_processes = self.processes[:split]
        self._writer_processes = self.processes[split:]
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.clock = clock or HybridLogicalClock(self.node_id, now=now)
        self.in_thread = in_thread
        self.metrics = metrics or NodeMetrics()
        self.now = now
        self.started = now()
        #: Their ``committed(stored)`` is called on the reactor thread after
        #: each stored batch, with the L{WriteItem}s stored and their
        #: sequence numbers (replication, sync).
        self.commit_observers: List[Any] = []
        #: Asks other nodes for what this one misses (set by the cluster);
        #: has ``get(collection, uid)`` and ``delete(collection, uid, if_match)``.
        self.remote: Any = None
        #: Extra sections of ``/_node/status``: name -> callable returning JSON.
        self.status_sections: Dict[str, Callable[[], Any]] = {}
        self._locks = KeyedLock()
        self._histograms: Dict[str, Any] = {}  # storage operation -> its histogram child
        self._cache = ByteLRU(read_cache_bytes)
        self._commit_seq = 0
        #: Group commit: writes that arrive while ``max_inflight_writes``
        #: storage writes are in flight go together in the next one.
        self._commits = Batcher(self._commit_batch, max_inflight_writes)
        self._commits.idle_observers.append(self._check_drained)
        #: Threaded processes of the records that arrive together run in one hop.
        self._process_calls = BatchedCalls(in_thread)
        #: Record reads that miss the read cache while one hop is in the
        #: thread pool go together in the next, as one storage.get_many:
        #: under load the hop (a Deferred, a thread's turn at the GIL), not
        #: SQLite's lookup (about 10 us), is a read's cost.  One hop at a
        #: time, not two: at 1,000,000 records, 2 in flight cost 245-312 us
        #: of CPU a GET, 1 cost 199-282 (bench/RESULTS.md).
        self._reads = Batcher(self._read_batch, max_inflight=1)
        self._active = 0
        self._drained: List["Deferred[None]"] = []
        self.stopping = False
        #: The declared secondary indexes (L{minstore.storage.indexes.Declaration}s).
        self.indexes = list(indexes)
        self._indexed_fields = fields_by_collection(self.indexes)
        #: Records a second an index build goes through at most (0: no limit).
        self.index_build_rate = index_build_rate
        self.reactor = reactor
        self._builder = succeed(None)
        self._build_pause = None
        self._build_progress = None  # (time, sequence numbers left) when the build began

    # -- storage access -------------------------------------------------

    def _storage(self, operation, f, *args):
        return self.in_thread(self._timed, operation, f, *args)

    def _timed(self, operation, f, *args):
        """``f(*args)``, its time observed as the storage operation's."""
        histogram = self._histograms.get(operation)
        if histogram is None:
            histogram = self._histograms[operation] = self.metrics.storage.labels(operation)
        start = time.perf_counter()
        try:
            return f(*args)
        finally:
            histogram.observe(time.perf_counter() - start)

    def open(self) -> None:
        """
        Open the storage (blocking: called once, before serving); versions
        continue from the later of the wall clock and the highest version held.
        """
        self.storage.open()
        held = self.storage.max_version()
        if held is not None:
            self.clock.resume(held)
        self.metrics.records.set_function(self.storage.count)
        self.storage.set_indexes(self.indexes)
        if self._building():
            self._builder = ensureDeferred(self._build_indexes())

    # -- secondary indexes ---------------------------------------------

    def _building(self):
        return [spec for spec, s in self.storage.index_states().items() if s["state"] != "ready"]

    def _left_to_build(self):
        return sum(s["until_seq"] - s["seq"] for s in self.storage.index_states().values() if s["state"] != "ready")

    async def _build_indexes(self):
        """Build the indexes declared over records already held, a step at a time, in the thread pool."""
        self.log.info("building indexes {specs} in the background", specs=", ".join(self._building()))
        self._build_progress = (self.now(), self._left_to_build())
        rate = self.index_build_rate
        step = max(1, min(INDEX_BUILD_STEP, int(rate))) if rate else INDEX_BUILD_STEP
        started = self.now()
        while not self.stopping:
            try:
                more = await self._storage("index_build", self.storage.build_indexes, step)
            except Exception:
                self.log.failure("building the indexes failed; they stay building (503) until the next start")
                return
            if not more:
                self.log.info("indexes built in {s:.1f} s", s=self.now() - started)
                return
            if rate and self.reactor is not None:
                self._build_pause = deferLater(self.reactor, step / rate, lambda: None)
                try:
                    await self._build_pause
                except CancelledError:
                    return
                finally:
                    self._build_pause = None

    def _retry_after(self):
        """Seconds a client should wait for the build, from its pace so far (1 to 60)."""
        if self._build_progress is None:
            return 1
        began, total = self._build_progress
        left = self._left_to_build()
        elapsed = self.now() - began
        done = total - left
        if done <= 0 or elapsed <= 0:
            return 1
        return int(min(60, max(1, left * elapsed / done + 0.999)))

    def _filter(self, collection, filters):
        """``(field, {op: value})`` of a listing's filter parameters ``[(name, text)]``."""
        fields = self._indexed_fields(collection)
        parsed = {}
        for name, text in filters:
            if name in fields:
                field, op = name, "eq"
            else:
                for prefix in OPERATORS:
                    if name.startswith(prefix) and name[len(prefix):] in fields:
                        field, op = name[len(prefix):], prefix[:-1]
                        break
                else:
                    base = next((name[len(p):] for p in OPERATORS if name.startswith(p)), name)
                    raise BadRequest(
                        "field_not_indexed",
                        "%s: no index on %s in %s (indexed there: %s); declare it with --indexes %s:%s"
                        % (name, base, collection, ", ".join(fields) or "none", collection, base),
                    )
            parsed.setdefault(field, {})[op] = parse_value(text)
        if len(parsed) > 1:
            raise BadRequest("bad_parameter", "one indexed field per request, not %s" % ", ".join(sorted(parsed)))
        return next(iter(parsed.items()))

    def _find(self, collection, limit, after, prefix, filters):
        if prefix:
            raise BadRequest("bad_parameter", "prefix does not combine with a filter on an indexed field")
        field, operators = self._filter(collection, filters)
        states = self.storage.index_states()
        specs = [s for s in ("%s:%s" % (collection, field), "*:%s" % field) if s in states]
        if not any(states[s]["state"] == "ready" for s in specs):
            raise IndexBuilding(
                "the index on %s of %s is being built (%s); retry later" % (field, collection, ", ".join(
                    "%s at %d of %d" % (s, states[s]["seq"], states[s]["until_seq"]) for s in specs)),
                self._retry_after(),
            )
        start, stop = bounds(operators)
        position = None
        if after:
            try:
                cursor_field, key, uid = decode_index_cursor(after)
            except ValueError:
                raise BadRequest("bad_parameter", "after: not a cursor from a filtered listing's next")
            if cursor_field != field:
                raise BadRequest("bad_parameter", "after: a cursor of a listing filtered on %s, not %s" % (cursor_field, field))
            position = (key, uid)

        def page(found):
            next_cursor = None
            if len(found) > limit:
                found = found[:limit]
                key, data = found[-1]
                next_cursor = encode_index_cursor(field, key, json.loads(data)["uid"])
            return [data for _, data in found], next_cursor

        d = self._storage("find", self.storage.find, collection, field, start, stop, position, limit + 1)
        return d.addCallback(page)

    def changes(
        self, since: int = 0, limit: int = DEFAULT_CHANGES_LIMIT, collection: Optional[str] = None
    ) -> "Deferred[Dict[str, Any]]":
        """
        Deferred ``{"changes": [...], "last_seq": n}``: this node's changes
        after ``since``, oldest first, each uid once at its newest.
        """
        if collection is not None:
            check_collection(collection)
        if not 1 <= limit <= MAX_CHANGES_LIMIT:
            raise BadRequest("bad_parameter", "limit: from 1 to %d" % (MAX_CHANGES_LIMIT,))

        def answer(result):
            changes, scanned = result
            return {
                "changes": [
                    {"seq": c.seq, "collection": c.collection, "uid": c.uid, "version": c.version, "deleted": c.deleted}
                    for c in changes
                ],
                "last_seq": scanned,
            }

        return self._storage("changes", self.storage.changes, since, limit, False, collection).addCallback(answer)

    def cached(self, collection: str, uid: str) -> Optional[Entry]:
        """The L{Entry} of a uid when the read cache has it, else None."""
        return self._recall((collection, uid))

    def _recall(self, key):
        hit = self._cache.get(key)
        return Entry(hit[0], *hit[1]) if hit is not None else None

    def _remember(self, key, entry):
        # The read cache holds plain tuples of bytes, str, bool and int, not
        # Entry objects: the cyclic GC stops tracking such tuples, so that
        # its full collections do not walk a cache of 100,000 records (they
        # did: GET p99 at 1,000,000 records was twice what it was with the
        # GC off).
        self._cache.put(key, entry.data, (entry.version, entry.deleted, entry.seq))

    def read(self, collection: str, uid: str) -> "Deferred[Optional[Entry]]":
        """Deferred L{Entry} of a record or tombstone held here, or None."""
        key = (collection, uid)
        hit = self._recall(key)
        if hit is not None:
            return succeed(hit)
        seq = self._commit_seq

        def parsed(data):
            if data is None:
                return None
            entry = Entry.parse(data)
            # A write committed while we read may be newer than what we read.
            if self._commit_seq == seq:
                self._remember(key, entry)
            return entry

        return self._reads.submit(key).addCallback(parsed)

    def _read_batch(self, keys):
        return self.in_thread(self._timed, "get", self._get_many, keys)

    def _get_many(self, keys):
        # An engine from a package written before get_many joined IStorage
        # is asked one key at a time.
        get_many = getattr(self.storage, "get_many", None)
        if get_many is None:
            return [self.storage.get(collection, uid) for collection, uid in keys]
        return get_many(keys)

    # -- writes ---------------------------------------------------------

    def _commit(self, collection, uid, data, deleted, version, forward=True):
        """Deferred L{Entry}, once the write is durable (in a group commit)."""
        return self._commits.submit(_Write(collection, uid, version, data, deleted, forward))

    def _commit_batch(self, writes):
        d = self.in_thread(self._process_and_write, writes)
        d.addCallbacks(self._committed, self._commit_failed, (writes,), None, (len(writes),))
        return d

    def _process_and_write(self, writes):
        """
        In the writer thread: finish the records of the batch (processes,
        check_sum, encoding), then store those that are to be stored.  Per
        write, its sequence number (stored), False (its condition did not
        hold: nothing stored), an L{Entry} (an unchanged PUT: nothing to
        store) or a L{Failure} (a process refused it); and the items stored
        with their sequence numbers.
        """
        outcomes = self._finish_records(writes)
        todo = [i for i, outcome in enumerate(outcomes) if outcome is None]
        items = [writes[i].item() for i in todo]
        stored = []
        if items:
            self.metrics.batch_size.observe(len(items))
            try:
                seqs = self._timed("write", self.storage.write, items)
            except (StorageFailed, OSError) as e:
                raise InsufficientStorage(
                    message="the write was not stored (%s); nothing of it is kept, retry later" % (e,)
                )
            for i, item, seq in zip(todo, items, seqs):
                outcomes[i] = False if seq is None else seq
                if seq is not None:
                    stored.append((item, seq))
        return outcomes, stored

    def _finish_records(self, writes):
        outcomes = [None] * len(writes)
        todo = [i for i, w in enumerate(writes) if w.record is not None]
        for process in self._writer_processes:
            if not todo:
                break
            records = [writes[i].record for i in todo]
            batch = getattr(process, "process_batch", None)
            if batch is not None:
                try:
                    results = list(batch(records))
                    if len(results) != len(records):
                        raise TypeError("%s.process_batch returned %d results for %d records"
                                        % (getattr(process, "name", process), len(results), len(records)))
                except Exception:
                    results = [Failure()] * len(records)
            else:
                results = []
                for record in records:
                    try:
                        results.append(_now(process(record)))
                    except Exception:
                        results.append(Failure())
            kept = []
            for i, result in zip(todo, results):
                if isinstance(result, BaseException):
                    result = Failure(result)
                if isinstance(result, Failure):
                    outcomes[i] = result
                else:
                    writes[i].record = result
                    kept.append(i)
            todo = kept
        for i in todo:
            w = writes[i]
            record = w.record
            if self.processes:
                # A process may have changed the value: check_sum and size are the stored value's.
                body = canonical_json(record["value"])
                record["check_sum"], record["size"] = hashlib.sha256(body).hexdigest(), len(body)
            if w.current is not None and json.loads(w.current.data).get("check_sum") == record["check_sum"]:
                outcomes[i] = w.current  # the same value once processed: PUT is idempotent
                continue
            w.data = encode_record(record)
        return outcomes

    def _commit_failed(self, failure, n):
        if failure.check(InsufficientStorage):
            self.log.error("storage write of {n} records failed: {error}", n=n, error=failure.value.message)
        else:
            self.log.failure("storage write of {n} records failed", failure, n=n)
        return failure

    def _committed(self, result, writes):
        outcomes, stored = result
        results = []
        for w, outcome in zip(writes, outcomes):
            if outcome is False:  # its condition did not hold
                if w.condition == ABSENT:
                    outcome = Failure(RecordExists(message="%s/%s exists already; PUT updates it" % (w.collection, w.uid)))
                elif w.condition is None:  # a shared database held a newer version (another node's)
                    outcome = Failure(PreconditionFailed(message="%s/%s: a newer version was written meanwhile" % (w.collection, w.uid)))
                self._cache.pop((w.collection, w.uid))
            elif type(outcome) is int:  # stored
                outcome = Entry(w.data, w.version, w.deleted, outcome)
                self._remember((w.collection, w.uid), outcome)
            results.append(outcome)
        if stored:
            self._commit_seq += 1
            for observer in self.commit_observers:
                try:
                    observer.committed(stored)
                except Exception:
                    self.log.failure("commit observer failed")
        return results

    def _locked(self, key, f, *args):
        """Run a write under the uid's lock, counted until it has finished."""
        if self.stopping:
            raise ServiceUnavailable(message="the node is stopping; retry on another node")
        self._active += 1

        def finished(result):
            self._active -= 1
            self._check_drained()
            return result

        return self._locks.run(key, f, *args).addBoth(finished)

    def pending(self) -> int:
        """Writes taken and not yet acknowledged."""
        return self._active + self._commits.queued()

    def _check_drained(self):
        if self._commits.idle() and not self._active:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self) -> "Deferred[None]":
        """A Deferred that fires once every write taken has been stored."""
        d: "Deferred[None]" = Deferred()
        self._drained.append(d)
        self._check_drained()
        return d

    def stop(self) -> "Deferred[None]":
        """Refuse new writes and wait for those taken."""
        self.stopping = True
        if self._build_pause is not None:
            self._build_pause.cancel()
        builder = self._builder
        return self.drain().addCallback(lambda _: builder)

    def _new_version(self, collection, uid, value, current=None):
        """
        Deferred L{Entry}: the value through the processes, then committed
        (the writer thread runs the last, threaded, processes: see the
        module's doc).
        """
        if current is not None:
            self.clock.observe(current.version)  # after what it replaces, whichever node wrote that
        version = self.clock.now()
        record = make_record(collection, uid, value, version, self.now())
        if not self._reactor_processes:
            return self._commit_record(record, collection, uid, version, current)
        d = run_pipeline(record, self._reactor_processes, self._process_calls)
        return d.addCallback(self._commit_record, collection, uid, version, current)

    def _commit_record(self, record, collection, uid, version, current):
        # A POST (no current record) is stored only if the uid is not live
        # when its batch is written: the check and the write are one step.
        condition = ABSENT if current is None else None
        return self._commits.submit(_Write(collection, uid, version, record=record, current=current, condition=condition))

    def create(self, collection: str, uid: str, value: Any) -> "Deferred[Entry]":
        """POST: store a new record; Deferred L{Entry}."""
        check_collection(collection)
        check_uid(uid)
        return self._locked((collection, uid), self._create, collection, uid, value)

    def _create(self, collection, uid, value):
        # No read first: the storage write itself stores it only when the
        # uid is not live (ABSENT), so a POST costs one thread hop.
        cached = self.cached(collection, uid)
        if cached is not None and not cached.deleted:
            raise RecordExists(message="%s/%s exists already; PUT updates it" % (collection, uid))
        return self._new_version(collection, uid, value)

    def update(self, collection: str, uid: str, value: Any, if_match: Optional[str] = None) -> "Deferred[Entry]":
        """PUT: replace an existing record's value; Deferred L{Entry}."""
        check_collection(collection)
        check_uid(uid)
        return self._locked((collection, uid), self._update, collection, uid, value, if_match)

    async def _update(self, collection, uid, value, if_match):
        current = await self.read(collection, uid)
        if current is None or current.deleted:
            raise NotFound(message="no record %s/%s; POST creates it" % (collection, uid))
        if if_match is not None and not etag_matches(if_match, current.version):
            raise PreconditionFailed(
                message="If-Match %s does not match version %s" % (if_match, current.version)
            )
        stored = json.loads(current.data)
        if stored.get("check_sum") == hashlib.sha256(canonical_json(value)).hexdigest():
            return current  # unchanged: PUT is idempotent
        return await self._new_version(collection, uid, value, current)

    def delete(
        self, collection: str, uid: str, if_match: Optional[str] = None, local: bool = False
    ) -> "Deferred[Entry]":
        """DELETE: leave a tombstone; Deferred L{Entry} of the tombstone."""
        check_collection(collection)
        check_uid(uid)
        d = self._locked((collection, uid), self._delete, collection, uid, if_match)

        def missing(failure):
            failure.trap(NotFound)
            if local or self.remote is None:
                return failure
            return self.remote.delete(collection, uid, if_match)

        return d.addErrback(missing)

    async def _delete(self, collection, uid, if_match):
        current = await self.read(collection, uid)
        if current is None or current.deleted:
            raise NotFound(message="no record %s/%s" % (collection, uid))
        if if_match is not None and not etag_matches(if_match, current.version):
            raise PreconditionFailed(
                message="If-Match %s does not match version %s" % (if_match, current.version)
            )
        self.clock.observe(current.version)
        version = self.clock.now()
        tombstone = encode_record(make_tombstone(collection, uid, version, self.now()))
        return await self._commit(collection, uid, tombstone, True, version)

    def apply_replica(self, data: bytes, forward: bool = False) -> "Deferred[bool]":
        """
        Store a record or tombstone made on another node, as it is, when it
        is newer than what this node holds; pass it on to this node's peers
        too when ``forward`` (a bridge).  Deferred bool: applied or not.
        """
        try:
            record = json.loads(data)
            collection, uid, version = record["collection"], record["uid"], record["version"]
        except (ValueError, KeyError, TypeError):
            raise BadRequest("bad_replica", "a replica is a record with collection, uid, version")
        check_collection(collection)
        check_uid(uid)
        self.clock.observe(version)
        deleted = bool(record.get("deleted"))
        return self._locked(
            (collection, uid), self._apply, collection, uid, data, version, deleted, forward
        )

    def apply_replicas(self, replicas: Iterable[bytes], forward: bool = False) -> "List[Deferred[bool]]":
        """
        L{apply_replica} for each of a peer's batch: those that need no read
        first are stored in one storage write.  A list of Deferreds.
        """
        with self._commits.held():
            results = []
            for data in replicas:
                try:
                    results.append(self.apply_replica(data, forward))
                except Exception:
                    results.append(fail())
            return results

    def _apply(self, collection, uid, data, version, deleted, forward):
        # No read first: the storage write stores it only when it is newer
        # than what is held (NEWER), in the same step.
        cached = self.cached(collection, uid)
        if cached is not None and cached.version >= version:
            return False
        w = _Write(collection, uid, version, data, deleted, forward, condition=NEWER)
        return self._commits.submit(w).addCallback(lambda outcome: isinstance(outcome, Entry))

    def forget(self, keys):
        """``[(collection, uid)]`` no longer held at all (purged tombstones): out of the read cache."""
        for key in keys:
            self._cache.pop(key)

    def retire(self, collection, uid, version):
        """
        Replace the live record held at exactly ``version`` by a tombstone of
        that same version, not passed on (a rejoining node's record that a
        peer purged: L{minstore.cluster.purge}).  Deferred bool: replaced.
        """
        return self._locked((collection, uid), self._retire, collection, uid, version)

    async def _retire(self, collection, uid, version):
        current = await self.read(collection, uid)
        if current is None or current.deleted or current.version != version:
            return False
        tombstone = encode_record(make_tombstone(collection, uid, version, self.now()))
        await self._commit(collection, uid, tombstone, True, version, forward=False)
        return True

    # -- reads ----------------------------------------------------------

    def get(self, collection: str, uid: str, local: bool = False) -> "Deferred[Entry]":
        """Deferred L{Entry} of a live record, looked up on peers when missing."""
        check_collection(collection)
        check_uid(uid)

        def found(entry):
            if entry is not None and not entry.deleted:
                return entry
            if local or self.remote is None:
                raise NotFound(message="no record %s/%s" % (collection, uid))
            d = self.remote.get(collection, uid)
            if entry is not None:
                # Deleted here: a peer's copy counts only if written after the delete
                # (one made before is a replica the tombstone has not reached yet).
                d.addCallback(newer_than, entry)
            else:
                d.addCallback(not_purged)
            return d

        def not_purged(remote):
            # Not held: a copy at or below the purge horizon may be of a record
            # whose tombstone was purged here (minstore.cluster.purge).
            purged = self.storage.purged_version()
            if purged is not None and remote.version <= purged:
                raise NotFound(message="no record %s/%s (deleted)" % (collection, uid))
            return remote

        def newer_than(remote, tombstone):
            if remote.version <= tombstone.version:
                raise NotFound(message="no record %s/%s (deleted)" % (collection, uid))
            return remote

        return self.read(collection, uid).addCallback(found)

    def list(
        self,
        collection: str,
        limit: int = 100,
        after: Optional[str] = None,
        prefix: Optional[str] = None,
        filters: Sequence[Tuple[str, str]] = (),
    ) -> "Deferred[Tuple[List[bytes], Optional[str]]]":
        """
        Deferred ``(records as bytes, next cursor or None)``, in uid order;
        with ``filters`` (``[(parameter name, text)]``: ``value.year``,
        ``min_value.year``, ...), those of one indexed field, in (value, uid) order.
        """
        check_collection(collection)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadRequest("bad_parameter", "limit: from 1 to %d" % (MAX_LIST_LIMIT,))
        if filters:
            return self._find(collection, limit, after, prefix, filters)
        after_uid = decode_cursor(after) if after else None

        def page(items):
            next_cursor = None
            if len(items) > limit:
                items = items[:limit]
                next_cursor = encode_cursor(json.loads(items[-1])["uid"])
            return items, next_cursor

        d = self._storage("list", self.storage.list, collection, after_uid, prefix, limit + 1)
        return d.addCallback(page)

    def status(self) -> Dict[str, Any]:
        status = {
            "node_id": self.node_id,
            "version": __version__,
            "uptime": round(self.now() - self.started, 3),
            "records": self.storage.count(),
            "last_seq": self.storage.last_seq(),
            "storage": getattr(self.storage, "name", type(self.storage).__name__),
            "processes": [getattr(p, "name", type(p).__name__) for p in self.processes],
            "pending_writes": self._commits.queued() + self._commits.inflight,
            "indexes": self.storage.index_states(),
        }
        for name, section in self.status_sections.items():
            status[name] = section()
        return status
