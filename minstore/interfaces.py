"""
The two extension points of a node: storage engines and processes.
"""

from zope.interface import Attribute, Interface


class IStorage(Interface):
    """
    A storage engine.  Every method is synchronous and blocking: the node
    calls them from its thread pool, never from the reactor thread, so an
    engine must be safe to call from several threads at once.  The node
    serialises writes to one uid, so an engine need not.

    Records are opaque bytes (the record's JSON); a tombstone is stored like
    a record but flagged ``deleted`` so that reads and listings skip it
    while replication can still compare its version.
    """

    name = Attribute("The engine's name, as given to --storage.")

    def open():
        """Create or recover the engine's files; called once before use."""

    def close():
        """Release files; called once when the node stops."""

    def get(collection, uid):
        """The stored bytes of a record or tombstone, or None."""

    def write(batch):
        """
        Store a batch of ``(collection, uid, data, deleted)`` tuples.  When
        this returns, every item is durable and visible; a crash during the
        call leaves each item either wholly old or wholly new.
        """

    def is_live(collection, uid):
        """
        Whether a live record of that uid is held, from memory only: the
        one method the node may call on the reactor thread, so it must not
        block.  None means "cannot tell without reading" (the node reads).
        """

    def holds(collection, uid):
        """
        Whether a record or a tombstone of that uid is held, from memory
        only, like L{is_live}: False lets the node store a replica of a uid
        it has never seen without reading first.  None means "cannot tell".
        """

    def list(collection, after, prefix, limit):
        """
        Up to ``limit`` live records (bytes) of a collection, in uid order,
        with uids greater than ``after`` (or from the start when None) that
        start with ``prefix`` (any when None).
        """

    def count():
        """The number of live records held."""

    def collections():
        """The names of the collections holding at least one record."""


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

    def __call__(record):
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

    def __call__(options):
        """An L{IProcess}, given the node's parsed options (a dict)."""
