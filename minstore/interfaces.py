"""
The two extension points of a node: storage engines and processes.
"""

from collections import namedtuple
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zope.interface import Attribute, Interface

#: ``condition`` of a L{WriteItem}: store only when no live record of the
#: uid is held (a POST; a tombstone does not count).
ABSENT = "absent"
#: ``condition`` of a L{WriteItem}: store only when what is held of the uid
#: (record or tombstone) has an older version, or nothing is held and the
#: version is above L{IStorage.purged_version} (a replica).
NEWER = "newer"

#: One item of a batch given to L{IStorage.write}.  ``data`` is the record's
#: (or tombstone's) canonical JSON, ``version`` its version string;
#: ``forward`` says whether the item is to be sent on to this node's peers
#: (a client's write, or a replica received from a bridge): replication
#: reads the items flagged so; ``condition`` is None, L{ABSENT} or L{NEWER}.
WriteItem = namedtuple("WriteItem", "collection uid data deleted version forward condition")
WriteItem.__new__.__defaults__ = (True, None)

#: One entry of the change feed (L{IStorage.changes}): the newest change of
#: a uid, with the sequence number the engine gave it.
Change = namedtuple("Change", "seq collection uid version deleted forward data")


class IStorage(Interface):
    """
    A storage engine: records, tombstones, the node's sequence of changes
    and the replication checkpoints, kept together.

    Threads: the methods marked I{blocking} do I/O and are called from the
    node's thread pool (or at start, before the node serves), never on the
    reactor thread; an engine must be safe to call from several threads at
    once.  The methods marked I{memory} answer from memory and are the only
    ones the node calls on the reactor thread.  The node serialises writes
    to one uid, so an engine need not.

    Records are opaque bytes (the record's JSON).  A tombstone is stored like
    a record but flagged ``deleted``: reads return it, listings skip it, the
    feed carries it.

    The sequence: every item stored gets the next number of a per-node
    sequence (1, 2, ...), and the feed (L{changes}) holds, for each uid,
    its newest change with its number.  One durable step per batch covers
    the records, their sequence entries and, when given, checkpoints: when
    L{write} returns, all of it survives a crash; when it raises, none of
    it is ever read, served or replayed, and the numbers it would have used
    are given to the next batch.
    """

    name = Attribute("The engine's name, as given to --storage.")

    def open() -> None:
        """
        I{blocking}, once before use: create or recover the engine's files.
        Damage that cannot be recovered past raises L{minstore.errors.StorageFailed}
        with a one-line reason naming the file.
        """

    def close() -> None:
        """I{blocking}, once when the node stops: release files."""

    def get(collection: str, uid: str) -> Optional[bytes]:
        """I{blocking}: the stored bytes of a record or tombstone, or None."""

    def get_many(keys: Sequence[Tuple[str, str]]) -> List[Optional[bytes]]:
        """
        I{blocking}: L{get} of each ``(collection, uid)`` of ``keys``, in
        their order (a key given twice is answered twice), in as few
        statements as the engine can: the node sends the reads that miss its
        cache together, in one hop to the thread pool and one call of this.
        """

    def write(
        batch: Sequence["WriteItem"], checkpoints: Optional[Dict[str, int]] = None
    ) -> List[Optional[int]]:
        """
        I{blocking}: store a list of L{WriteItem}s in one durable step, with
        ``checkpoints`` (``{peer: seq}``) when given.  Returns a list with,
        per item, the sequence number it was stored with, or None when its
        ``condition`` did not hold (nothing stored for it).  Items are
        applied in order; a uid twice in one batch keeps the last stored.

        Fails with L{minstore.errors.StorageFailed} on a full disk or an
        I/O error: then nothing of the batch is stored.
        """

    def list(collection: str, after: Optional[str], prefix: Optional[str], limit: int) -> List[bytes]:
        """
        I{blocking}: up to ``limit`` live records (bytes) of a collection, in
        uid order, with uids greater than ``after`` (or from the start when
        None) that start with ``prefix`` (any when None).
        """

    def changes(
        after: int, limit: int, forwarded_only: bool = False, collection: Optional[str] = None
    ) -> Tuple[List["Change"], int]:
        """
        I{blocking}: ``(changes, scanned)``: up to ``limit`` L{Change}s with a
        sequence number above ``after``, in sequence order (the newest change
        per uid: a uid written again since has moved to its new number);
        only the items stored with ``forward`` when ``forwarded_only``; only
        one collection's when given.  ``scanned`` is the sequence number up to
        which the feed was read: the last change's when ``limit`` were
        found, else the highest number stored when the read began.
        """

    def scan_versions(
        after: Optional[Tuple[str, str]], upto: Optional[Tuple[str, str]], limit: int
    ) -> List[Tuple[str, str, str]]:
        """
        I{blocking}: up to ``limit`` ``(collection, uid, version)`` of the
        records and tombstones held, in ``(collection, uid)`` order (code
        point order), with keys above ``after`` and at most ``upto`` (each a
        ``(collection, uid)`` tuple, or None: no bound).  What sync
        fingerprints and compares (L{minstore.cluster.sync}).
        """

    def purge_tombstones(
        before_version: str, upto_seq: int, upto_forwarded_seq: int, limit: int
    ) -> List[Tuple[str, str, str]]:
        """
        I{blocking}: remove, in one durable step, up to ``limit`` tombstones
        (lowest sequence numbers first) whose version sorts below
        ``before_version`` and whose sequence number is at most
        ``upto_seq``, or at most ``upto_forwarded_seq`` for those stored
        with ``forward``.  Returns their ``(collection, uid, version)``.
        A removed tombstone is gone from L{get}, L{changes} and
        L{scan_versions}; live counts and index entries do not change (a
        tombstone has none); L{purged_version} becomes at least the highest
        version removed, in the same step.  What decides that a tombstone
        may go (every peer holds it) is L{minstore.cluster.purge}'s.

        An engine whose store several nodes share (``shared`` true) removes
        nothing and returns ``[]``: one node's peers confirming a tombstone
        says nothing of the other nodes' peers.
        """

    def purged_version() -> Optional[str]:
        """
        I{memory}: the highest version of a tombstone L{purge_tombstones}
        removed (None when none), kept durably.  A L{NEWER} item of a uid
        that is not held is stored only when its version is above it: it
        may be an older version of a record whose tombstone was purged.
        """

    def count_changes(after: int, forwarded_only: bool = False) -> int:
        """I{blocking}: how many L{Change}s L{changes} would give after ``after``, without a limit."""

    def checkpoints() -> Dict[str, int]:
        """I{blocking}: the saved ``{peer: seq}`` checkpoints."""

    def save_checkpoints(checkpoints: Dict[str, int]) -> None:
        """I{blocking}: replace the saved checkpoints with ``{peer: seq}``, durably."""

    def last_seq() -> int:
        """I{memory}: the highest sequence number stored (0 when none)."""

    def max_version() -> Optional[str]:
        """I{memory}: the highest version held, record or tombstone (None when empty)."""

    def count() -> int:
        """I{memory}: the number of live records held."""

    def collections() -> List[str]:
        """I{memory}: the names of the collections holding at least one live record."""

    # -- secondary indexes (see minstore.storage.indexes) ------------------

    def set_indexes(declarations: Sequence[Any]) -> None:
        """
        I{blocking}: declare the secondary indexes, a list of
        L{minstore.storage.indexes.Declaration}s (``(collection or "*",
        field)``).  The node calls it once after L{open}, before it serves
        (an engine must also accept a later call: it replaces the
        declarations).  From then on every L{write} keeps the entries of
        every declared index in its own durable step: an entry
        ``(collection, field, key, uid)`` per live record that has the field
        (``key`` from L{minstore.storage.indexes.encode_key}); a tombstone
        or a record without the field has none.

        A declaration new to the engine while it holds records is
        I{building} until L{build_indexes} has gone through them; one new
        on an empty engine is I{ready} at once.  The state is kept
        durably: a reopen with the same declaration resumes a build where
        it was.  A declaration no longer given is dropped with its entries
        (declared again later, it is built again).
        """

    def build_indexes(limit: int) -> bool:
        """
        I{blocking}: index up to ``limit`` sequence numbers' worth of the
        records held from before a building declaration was made, in one
        durable step that holds the write lock only for it.  Returns True
        while some declaration is still building, False when all are ready.
        """

    def index_states() -> Dict[str, Dict[str, Any]]:
        """
        I{memory}: ``{"COLLECTION:FIELD": {"state": "ready"|"building",
        "seq": n, "until_seq": m}}`` of the declarations (a build has
        indexed up to sequence ``seq`` of the ``until_seq`` it must reach).
        """

    def find(
        collection: str,
        field: str,
        start: Optional[bytes],
        stop: Optional[bytes],
        after: Optional[Tuple[bytes, str]],
        limit: int,
    ) -> List[Tuple[bytes, bytes]]:
        """
        I{blocking}: up to ``limit`` ``(key, data)`` of the live records of a
        collection whose entry for ``field`` has ``start <= key < stop``
        (None: no bound), in (key, uid) order, after ``after`` (a ``(key,
        uid)`` pair, or None from the start).  Read from the index only, in
        one snapshot: never a scan of the collection.
        """


class IProcess(Interface):
    """
    A step of the pipeline a record goes through on the node that takes the
    client's write, before it is stored.
    """

    name = Attribute("The process's name, as given to --processes.")
    threaded = Attribute(
        "True when the process is CPU-heavy, synchronous and thread-safe: the "
        "node then runs it off the reactor thread.  The threaded processes at "
        "the end of the chain run in the writer thread, with the batch of "
        "records stored together, just before the storage write; a threaded "
        "process followed by one that is not runs in the thread pool."
    )

    def __call__(record: Dict[str, Any]) -> Any:
        """
        Return the record (a dict), transformed, or (a process that is not
        threaded only) a Deferred of it.  Raise L{minstore.errors.Rejected}
        (or fail the Deferred with it) to refuse the record with a 400 and a
        reason.

        A threaded process may also have ``process_batch(records)``, which
        the writer thread calls, when it has it, with every record of a
        batch at once: it returns a list of the same length, each item the
        record (transformed) or an exception refusing that record.

        A process may also have ``start()`` and ``stop()`` (returning None
        or a Deferred): the node calls them when it starts and, after its
        last write, when it stops.
        """


class IProcessFactory(Interface):
    """What a third-party package registers to add a process."""

    name = Attribute("The process's name.")

    def __call__(options: Dict[str, Any]) -> Any:
        """An L{IProcess}, given the node's parsed options (a dict)."""
