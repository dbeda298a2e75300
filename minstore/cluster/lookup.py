"""
Lookups across nodes: a GET or DELETE that misses here asks the peers in
parallel; each peer answers from its own storage or asks its own peers in
turn, skipping nodes already asked, until one deadline.  The first hit wins;
only when every node reached misses is the answer 404.

A hit counts only when it is newer than what the walk already holds
(DESIGN section 4): the asking node sends the version it holds of the uid
(a tombstone's, since a GET or DELETE asks only when it holds no live
record) as ``newer_than``, each node on the walk raises it to its own
copy's version when that is higher, a node answers a GET only with a copy
of a higher version and carries out a DELETE only on such a copy, and
every asking node checks the answers again.  So a peer that has not yet
received a delete never brings the record back, and a DELETE is never
carried out, with a peer's clock, on a copy older than the tombstone held
here (the tombstone's replica reaches that peer in time).
"""

import json

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from minstore.errors import MinstoreError, NotFound
from minstore.node import Entry

#: No lookup walks further than this many nodes deep, whatever the graph.
MAX_HOPS = 16

#: ``held`` of L{Lookups.get} and L{Lookups.delete} when the caller did not
#: say what this node holds: read it.
READ = object()


def is_newer(version, newer_than):
    """Whether a copy of ``version`` counts against ``newer_than`` (None: anything counts)."""
    return newer_than is None or version > newer_than


def newer_only(data, newer_than):
    """A peer's answer, or None when it is not newer than ``newer_than``."""
    if data is None or newer_than is None:
        return data
    try:
        version = json.loads(data)["version"]
    except (ValueError, KeyError, TypeError):
        return None
    return data if isinstance(version, str) and version > newer_than else None


def first_hit(deferreds):
    """
    A Deferred firing with the first result that is not None, or None once
    every Deferred has fired without one (failures count as misses, except
    a MinstoreError such as a 412, which is passed on when nothing hits).
    """
    result = Deferred()
    pending = [len(deferreds)]
    errors = []

    def done(value):
        pending[0] -= 1
        if not result.called:
            if value is not None:
                result.callback(value)
            elif pending[0] == 0:
                if errors:
                    result.errback(errors[0])
                else:
                    result.callback(None)

    def failed(failure):
        if failure.check(MinstoreError):
            errors.append(failure)
        done(None)

    if not deferreds:
        result.callback(None)
    for d in deferreds:
        d.addCallbacks(done, failed)
    return result


def _is_record_of(data, collection, uid):
    """Whether a peer's answer is a record (or tombstone) of ``collection/uid``."""
    try:
        record = json.loads(data)
    except (ValueError, TypeError):
        return False
    return (
        isinstance(record, dict)
        and isinstance(record.get("version"), str)
        and record.get("collection") == collection
        and record.get("uid") == uid
    )


class Lookups:
    log = Logger()

    def __init__(self, node, peers, client, clock, timeout=2.0):
        """
        @param peers: a callable returning the current peer URLs.
        @param client: a L{minstore.cluster.peers.PeerClient}.
        @param clock: the reactor (an IReactorTime) for the deadline.
        """
        self.node = node
        self.peers = peers
        self.client = client
        self.clock = clock
        self.timeout = timeout

    def ask_peers(
        self, collection, uid, visited, method="GET", if_match=None, timeout=None, asked=(), newer_than=None
    ):
        """
        Deferred record (or tombstone, for a DELETE) bytes, or None.

        ``visited`` are the ids of the nodes on the walk so far (a node that
        finds its own id there answers 404 at once); ``asked`` the URLs of
        the peers some node on the walk is asking already, which this node
        skips, so a full mesh of N nodes costs about 2N requests, not N!.
        ``newer_than``: the version the walk holds; a peer's answer that is
        not newer is a miss (checked here too, whatever the peer did with it).
        """
        timeout = self.timeout if timeout is None else timeout
        peers = [peer for peer in self.peers() if peer not in asked]
        if not peers or len(visited) > MAX_HOPS or timeout <= 0.01:
            return succeed(None)
        asked = list(asked) + peers
        calls = []
        for peer in peers:
            d = ensureDeferred(
                self.client.lookup(
                    peer,
                    collection,
                    uid,
                    visited,
                    method=method,
                    if_match=if_match,
                    timeout=timeout,
                    asked=asked,
                    newer_than=newer_than,
                )
            )

            def unreachable(failure, peer=peer):
                if failure.check(MinstoreError):
                    return failure
                self.log.debug("lookup on {peer} failed: {e}", peer=peer, e=failure.getErrorMessage())
                return None

            def checked(data, peer=peer):
                if data is None or _is_record_of(data, collection, uid):
                    return data
                # Not the client's error, nor a hit: that peer misses it.
                self.log.warn(
                    "lookup of {collection}/{uid} on {peer}: the answer is not that record;"
                    " counted as a miss",
                    collection=collection,
                    uid=uid,
                    peer=peer,
                )
                metrics = getattr(self.node, "metrics", None)
                if metrics is not None:
                    metrics.lookup_bad_answers.labels(peer).inc()
                return None

            d.addCallbacks(checked, unreachable)
            calls.append(d.addCallback(newer_only, newer_than))
        hit = first_hit(calls)
        hit.addTimeout(timeout, self.clock, onTimeoutCancel=lambda _result, _timeout: None)
        return hit

    # The node's ``remote``: what a client's GET or DELETE does after a miss.

    def get(self, collection, uid, held=READ):
        """
        Deferred L{Entry} of a live record a peer holds that is newer than
        ``held``, the version this node holds (a tombstone's; None: nothing;
        L{READ}: read it here).
        """
        return self._with_held(collection, uid, held, "GET", None)

    def delete(self, collection, uid, if_match=None, held=READ):
        """
        Deferred L{Entry} of the tombstone left on the peer holding a live
        record newer than ``held`` (as for L{get}).
        """
        return self._with_held(collection, uid, held, "DELETE", if_match)

    def _with_held(self, collection, uid, held, method, if_match):
        if held is not READ:
            return self._walk(held, collection, uid, method, if_match)

        def read(entry):
            if entry is not None and not entry.deleted:
                # Stored here since the caller looked (a replica): a hit here.
                if method == "GET":
                    return entry
                return self.node.delete(collection, uid, if_match, local=True)
            return self._walk(None if entry is None else entry.version, collection, uid, method, if_match)

        return self.node.read(collection, uid).addCallback(read)

    def _walk(self, held, collection, uid, method, if_match):
        d = self.ask_peers(collection, uid, [self.node.node_id], method, if_match, newer_than=held)
        return d.addCallback(self._found, collection, uid)

    @staticmethod
    def _found(data, collection, uid):
        if data is None:
            raise NotFound(message="no node holds %s/%s" % (collection, uid))
        return Entry.parse(data)

    # What a node does when a peer asks it.

    async def answer(self, collection, uid, visited, method="GET", if_match=None, asked=(), newer_than=None):
        """
        The bytes to answer a peer's lookup with, or None for a 404: only a
        copy newer than ``newer_than`` (the version the asking node holds)
        is answered, and a DELETE is carried out only on such a copy.
        """
        if self.node.node_id in visited:
            return None
        entry = await self.node.read(collection, uid)
        if entry is not None:
            if not entry.deleted and is_newer(entry.version, newer_than):
                if method == "GET":
                    return entry.data
                try:
                    tombstone = await self.node.delete(collection, uid, if_match, local=True)
                except NotFound:
                    pass  # deleted meanwhile: look further
                else:
                    return tombstone.data
            if is_newer(entry.version, newer_than):
                # Deleted here: a copy made before this tombstone is one
                # it has not reached yet, not a record to serve or delete.
                newer_than = entry.version
        return await self.ask_peers(
            collection,
            uid,
            list(visited) + [self.node.node_id],
            method,
            if_match,
            self.timeout * 0.8,
            asked,
            newer_than,
        )
