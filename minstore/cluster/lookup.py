"""
Lookups across nodes: a GET or DELETE that misses here asks the peers in
parallel; each peer answers from its own storage or asks its own peers in
turn, skipping nodes already asked, until one deadline.  The first hit wins;
only when every node reached misses is the answer 404.
"""

import json

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from minstore.errors import MinstoreError, NotFound
from minstore.node import Entry

#: No lookup walks further than this many nodes deep, whatever the graph.
MAX_HOPS = 16


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
        self, collection, uid, visited, method="GET", if_match=None, timeout=None, asked=()
    ):
        """
        Deferred record (or tombstone, for a DELETE) bytes, or None.

        ``visited`` are the ids of the nodes on the walk so far (a node that
        finds its own id there answers 404 at once); ``asked`` the URLs of
        the peers some node on the walk is asking already, which this node
        skips, so a full mesh of N nodes costs about 2N requests, not N!.
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

            calls.append(d.addCallbacks(checked, unreachable))
        hit = first_hit(calls)
        hit.addTimeout(timeout, self.clock, onTimeoutCancel=lambda _result, _timeout: None)
        return hit

    # The node's ``remote``: what a client's GET or DELETE does after a miss.

    def get(self, collection, uid):
        d = self.ask_peers(collection, uid, [self.node.node_id])
        return d.addCallback(self._found, collection, uid)

    def delete(self, collection, uid, if_match=None):
        d = self.ask_peers(collection, uid, [self.node.node_id], "DELETE", if_match)
        return d.addCallback(self._found, collection, uid)

    @staticmethod
    def _found(data, collection, uid):
        if data is None:
            raise NotFound(message="no node holds %s/%s" % (collection, uid))
        return Entry.parse(data)

    # What a node does when a peer asks it.

    async def answer(self, collection, uid, visited, method="GET", if_match=None, asked=()):
        """The bytes to answer a peer's lookup with, or None for a 404."""
        if self.node.node_id in visited:
            return None
        entry = await self.node.read(collection, uid)
        if entry is not None and not entry.deleted:
            if method == "GET":
                return entry.data
            try:
                tombstone = await self.node.delete(collection, uid, if_match, local=True)
            except NotFound:
                pass  # deleted meanwhile: look further
            else:
                return tombstone.data
        found = await self.ask_peers(
            collection,
            uid,
            list(visited) + [self.node.node_id],
            method,
            if_match,
            self.timeout * 0.8,
            asked,
        )
        if found is not None and method == "GET" and entry is not None:
            # Deleted here: a copy made before the delete is one the
            # tombstone has not reached yet, not a record to serve.
            if Entry.parse(found).version <= entry.version:
                return None
        return found
