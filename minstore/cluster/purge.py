"""
Tombstone collection (DESIGN section 4, "Compare and synchronise"): a
tombstone is purged only once it is older than ``--tombstone-grace`` and
every peer of servers.list has confirmed holding it; a deleted record never
comes back, whichever node was away, for however long.

Confirmation.  A peer has confirmed a tombstone stored with sequence number
``s`` when

* a sync with that peer that began when this node's sequence was at or past
  ``s`` has completed (it left the peer holding, for every uid this node
  held then, the newer version: ``synced[peer]``, this node's sequence when
  the last completed sync with it began); or
* the tombstone was stored with ``forward`` (replication sends it) and the
  peer's replication checkpoint has passed ``s``, when the checkpoint is one
  that counts: the peer has completed a sync with this node once, or was a
  peer when this node's store was empty (a peer added later starts its
  checkpoint at the sequence of the day it was added, past tombstones it was
  never sent).

So the purge of a run removes the tombstones below the version of ``now -
grace`` with a sequence number at most ``min(synced)`` over the peers, or,
for forwarded ones, at most ``min(max(synced, counted checkpoint))``
(L{minstore.interfaces.IStorage.purge_tombstones}), at most L{PER_RUN} a run,
every ``min(60, grace / 4)`` seconds, in the thread pool.  A peer that is down
confirms nothing: nothing is purged while it is.  A node without peers
purges what is older than the grace period.

The purge horizon.  What a node purged may come back from a peer that held
the record and missed the delete (restored from an old backup, removed from
servers.list and put back): the engine keeps the highest version it ever
purged (L{minstore.interfaces.IStorage.purged_version}), and

* its storage refuses a replica (replication, a bridge, a sync's pull or
  push) of a uid it does not hold whose version is at or below it, in the
  same step as the write (L{minstore.interfaces.NEWER});
* a lookup's answer from a peer for such a uid does not count;
* a node tells its horizon in the header of each sync message it sends
  (both directions), and the node that syncs pushes none of its items that
  the peer does not hold and whose version is at or below the peer's
  horizon, and stores none of the peer's that it does not hold at or below
  its own; the peer sends none of its items below the horizon of the node
  that syncs where that node holds nothing at all (and says how many).

Rejoining.  A node keeps, per peer, when it last had contact (the start of
the last completed sync with it, the last replication send it acknowledged)
in ``DATA/purge.json``, with ``synced``.  A node that starts with every
recorded contact older than the grace period (it was away that long, or is
a backup put back) starts *rejoining*: its syncs only pull, it purges
nothing, and an item that a peer does not hold and whose version is at or
below that peer's horizon is taken for a deleted record whose tombstone was
purged there: it is replaced here by a tombstone of the same version, not
passed on (L{minstore.node.Node.retire}).  Once a sync with every peer has
completed, it is a node like the others.  Outside rejoining such an item is
only withheld (logged and counted): a peer's horizon also covers records it
never received (a peer of another cluster, joined to this one), which a
node that was not away keeps.  The price of the rule: a record written more
than the grace period ago that never reached a peer, on a node that
rejoins, is taken for a deleted one.
"""

import json
import os
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from minstore._util import fsync_dir
from minstore.interfaces import WriteItem
from minstore.records import version_timestamp

#: Tombstones purged per storage call, and at most per run.
BATCH = 500
PER_RUN = 5000
#: Seconds between two runs at most.
MAX_INTERVAL = 60.0
#: The file of the bookkeeping, in the data directory.
STATE_FILE = "purge.json"
#: Longest purge horizon a peer may tell (a version is about 40 characters).
MAX_HORIZON = 200


def version_before(seconds):
    """The least version string of the wall-clock ``seconds``: every version made before sorts below it."""
    return "%013d" % max(0, int(seconds * 1000))


class FileState:
    """The purge bookkeeping, durably in one JSON file (written whole, renamed over)."""

    def __init__(self, path):
        self.path = path

    def load(self):
        try:
            with open(self.path, "rb") as f:
                state = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # damaged: as if new (nothing purged on it: no rejoining, no trust)
        return state if type(state) is dict else {}

    def save(self, state):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(state, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path) or ".")


class MemoryState:
    """The bookkeeping in memory (unit tests, a node with the memory engine keeps it on disk still)."""

    def __init__(self, state=None):
        self.state = dict(state or {})

    def load(self):
        return json.loads(json.dumps(self.state))

    def save(self, state):
        self.state = json.loads(json.dumps(state))


class Purger:
    """
    The confirmation rule, the purge runs, the sync hooks (``horizon``,
    ``sync_begins``, ``peer_said``, ``set_aside``, ``refused``,
    ``sync_completed``) and the rejoining state; see the module's doc.
    """

    log = Logger()

    def __init__(
        self,
        node,
        index,
        peers,
        checkpoints,
        contacts,
        clock,
        in_thread,
        grace,
        state,
        batch=BATCH,
        per_run=PER_RUN,
    ):
        """
        @param peers: a callable giving the node's current peer URLs.
        @param checkpoints: a callable giving the peers' replication checkpoints, ``{url: seq}``.
        @param contacts: a callable giving, per peer, when its last replication send was acknowledged (or None).
        @param index: the node's L{minstore.cluster.sync.SyncIndex}, told of each purged key.
        @param state: where the bookkeeping is kept (L{FileState}, L{MemoryState}).
        """
        self.node = node
        self.storage = node.storage
        self.index = index
        self.peers = peers
        self.checkpoints = checkpoints
        self.contacts = contacts
        self.clock = clock
        self.in_thread = in_thread
        self.grace = grace
        self.state = state
        self.batch = batch
        self.per_run = per_run
        self.interval = min(MAX_INTERVAL, max(0.05, grace / 4.0))
        #: peer -> {"synced": seq, "contact": time, "first_seen": seq}
        self.known = {}
        #: None, or the peers a sync must still complete with.
        self.rejoining = None
        self.purged = 0
        self.runs = 0
        self.errors = 0
        self.withheld = 0
        self.retired = 0
        self.last_run = None
        self.last_purged = 0
        self.last_error = None
        self._saved_at = None
        self._dirty = False
        self._running = None

    # -- bookkeeping -------------------------------------------------------

    def load(self):
        """Blocking, at start: read the bookkeeping, decide whether this node is rejoining."""
        state = self.state.load()
        known = state.get("peers") if type(state.get("peers")) is dict else {}
        peers = list(self.peers())
        for url, entry in known.items():
            if url in peers and type(entry) is dict:
                self.known[url] = dict(
                    (k, v) for k, v in entry.items() if k in ("synced", "contact", "first_seen") and type(v) in (int, float)
                )
        self._see_peers(peers)
        # The last contact: with a peer (a completed sync, an acknowledged
        # send), or the last write held (a version carries its time).
        marks = [e["contact"] for e in self.known.values() if "contact" in e]
        held = self.storage.max_version()
        if held is not None:
            try:
                marks.append(version_timestamp(held))
            except ValueError:
                pass
        now = self.clock.seconds()
        if peers and marks and now - max(marks) > self.grace:
            self.rejoining = set(peers)
            self.log.warn(
                "no contact with any peer nor write for {age:.0f}s (more than --tombstone-grace {grace:g}s): "
                "rejoining; syncs only pull until one has completed with every peer ({peers})",
                age=now - max(marks),
                grace=self.grace,
                peers=", ".join(peers),
            )
        self._dirty = True

    def _see_peers(self, peers):
        """Peers new to the bookkeeping are noted with the sequence of now; removed ones forgotten."""
        for url in peers:
            if url not in self.known:
                self.known[url] = {"first_seen": self.storage.last_seq()}
                self._dirty = True
        for url in list(self.known):
            if url not in peers:
                del self.known[url]
                self._dirty = True
        if self.rejoining is not None:
            self.rejoining &= set(peers)
            if not self.rejoining:
                self._rejoined()

    def _snapshot(self):
        return {"peers": dict((url, dict(e)) for url, e in self.known.items())}

    async def _save(self, force=False):
        now = self.clock.seconds()
        if not (self._dirty or force):
            return
        if not force and self._saved_at is not None and now - self._saved_at < self.interval:
            return
        self._dirty = False
        self._saved_at = now
        await self.in_thread(self.state.save, self._snapshot())

    def _note_contacts(self):
        for url, at in (self.contacts() or {}).items():
            entry = self.known.get(url)
            if entry is not None and at is not None and at > entry.get("contact", -1):
                entry["contact"] = at
                self._dirty = True

    # -- the confirmation rule ----------------------------------------------

    def cutoffs(self):
        """``(before_version, upto_seq, upto_forwarded_seq)`` a purge may go to now."""
        peers = list(self.peers())
        self._see_peers(peers)
        top = self.storage.last_seq()
        if not peers:
            upto = upto_forwarded = top
        else:
            checkpoints = self.checkpoints() or {}
            upto = upto_forwarded = top
            for url in peers:
                entry = self.known[url]
                synced = entry.get("synced", 0)
                counted = "synced" in entry or entry.get("first_seen") == 0
                checkpoint = checkpoints.get(url, 0) if counted else 0
                upto = min(upto, synced)
                upto_forwarded = min(upto_forwarded, max(synced, checkpoint))
        return version_before(self.clock.seconds() - self.grace), upto, upto_forwarded

    def run(self):
        """Deferred count purged by one run (a run already going is joined)."""
        if self._running is not None:
            d = Deferred()
            self._running.addBoth(lambda result: (d.callback(result), result)[1])
            return d
        d = self._running = ensureDeferred(self._run())

        def done(result):
            self._running = None
            return result

        return d.addBoth(done)

    async def _run(self):
        self.runs += 1
        self.last_run = self.clock.seconds()
        self._note_contacts()
        count = 0
        try:
            if self.rejoining is None and not getattr(self.storage, "shared", False):
                before, upto, upto_forwarded = self.cutoffs()
                while count < self.per_run:
                    removed = await self.in_thread(
                        self.storage.purge_tombstones, before, upto, upto_forwarded, min(self.batch, self.per_run - count)
                    )
                    if not removed:
                        break
                    count += len(removed)
                    self.index.committed([(WriteItem(c, u, None, True, v), None) for c, u, v in removed])
                    self.node.forget([(c, u) for c, u, _ in removed])
                    if len(removed) < self.batch:
                        break
            await self._save()
        except Exception as e:
            self.errors += 1
            self.last_error = "%s: %s" % (type(e).__name__, e)
            self.log.error("purging tombstones failed: {error}", error=self.last_error)
        self.last_purged = count
        self.purged += count
        if count:
            self.log.info(
                "purged {count} tombstones older than {grace:g}s that every peer holds ({total} in all)",
                count=count,
                grace=self.grace,
                total=self.purged,
            )
        return count

    # -- the sync hooks (minstore.cluster.sync.Sync) --------------------------

    def horizon(self):
        """What this node tells in each sync message it sends: its purge horizon (None: nothing purged)."""
        return self.storage.purged_version()

    def sync_begins(self, run):
        run.purge = dict(
            seq=self.storage.last_seq(),
            at=self.clock.seconds(),
            horizon=None,
            pull_only=self.rejoining is not None,
            retire=[],
            withheld=0,
        )

    def peer_said(self, run, horizon, withheld=0):
        """
        An answer's header: the peer's horizon (None: it purged nothing;
        ValueError when malformed), and how many records it did not send
        because this node may have purged them (counted here, as withheld).
        """
        run.purge["withheld"] += withheld
        if horizon is None:
            return
        if type(horizon) is not str or not horizon or len(horizon) > MAX_HORIZON:
            raise ValueError("purged: a version of at most %d characters" % MAX_HORIZON)
        if run.purge["horizon"] is None or horizon > run.purge["horizon"]:
            run.purge["horizon"] = horizon

    def set_aside(self, run, key, version):
        """
        Our ``version`` of ``key``, at or below the peer's horizon, that the
        peer does not hold (the sync has completed without the peer sending
        any version of it): taken for deleted while rejoining, else withheld.
        """
        if run.purge["pull_only"]:
            run.purge["retire"].append((key, version))
        else:
            run.purge["withheld"] += 1

    def refused(self, run, count):
        """``count`` records the peer sent not stored: keys not held here, at or below this node's horizon."""
        run.purge["withheld"] += count

    async def sync_completed(self, run):
        """The sync with ``run.peer`` completed: retire what rejoining says, note the confirmation."""
        p = run.purge
        retired = 0
        for (collection, uid), version in p["retire"]:
            if await self.node.retire(collection, uid, version):
                retired += 1
        self.retired += retired
        self.withheld += p["withheld"]
        if retired or p["withheld"]:
            self.log.info(
                "sync with {peer}: {retired} records taken for deleted and {withheld} withheld: "
                "older than the purge horizon of the side that does not hold them",
                peer=run.peer,
                retired=retired,
                withheld=p["withheld"],
            )
        entry = self.known.get(run.peer)
        if entry is None:
            return
        entry["contact"] = max(entry.get("contact", p["at"]), p["at"])
        if not p["pull_only"]:
            entry["synced"] = max(entry.get("synced", 0), p["seq"])
        self._dirty = True
        if self.rejoining is not None:
            self.rejoining.discard(run.peer)
            if not self.rejoining:
                self._rejoined()
        await self._save(force=True)

    def _rejoined(self):
        self.rejoining = None
        self.log.info("rejoined: a sync has completed with every peer; syncs push again")

    # -- status and metrics -------------------------------------------------

    def status(self):
        return {
            "grace": self.grace,
            "interval": self.interval,
            "runs": self.runs,
            "last_run": self.last_run,
            "last_purged": self.last_purged,
            "purged": self.purged,
            "purged_version": self.storage.purged_version(),
            "rejoining": sorted(self.rejoining) if self.rejoining is not None else None,
            "withheld": self.withheld,
            "retired": self.retired,
            "errors": self.errors,
            "last_error": self.last_error,
            "shared_store": bool(getattr(self.storage, "shared", False)),
        }

    def collect(self):
        purged = CounterMetricFamily("minstore_tombstones_purged", "Tombstones purged (confirmed by every peer, older than the grace period).")
        purged.add_metric([], self.purged)
        runs = CounterMetricFamily("minstore_tombstone_purge_runs", "Runs of the tombstone purge.", labels=["outcome"])
        runs.add_metric(["ok"], self.runs - self.errors)
        runs.add_metric(["error"], self.errors)
        rejoining = GaugeMetricFamily("minstore_rejoining", "1 while the node rejoins (its syncs only pull).")
        rejoining.add_metric([], 1 if self.rejoining is not None else 0)
        skipped = CounterMetricFamily(
            "minstore_sync_purge_horizon_items",
            "Items sync did not send, or took for deleted, being older than a purge horizon.",
            labels=["kind"],
        )
        skipped.add_metric(["withheld"], self.withheld)
        skipped.add_metric(["retired"], self.retired)
        return [purged, runs, rejoining, skipped]


class PurgeService(Service):
    """Loads the bookkeeping at start (before the node serves), then runs the purge every interval."""

    log = Logger()

    def __init__(self, purger, clock):
        self.purger = purger
        self.clock = clock
        self._loop = None

    def startService(self):
        Service.startService(self)
        start = time.perf_counter()
        self.purger.load()
        self.log.info(
            "tombstone purge every {interval:g}s, grace {grace:g}s{rejoining} (bookkeeping read in {s:.3f}s)",
            interval=self.purger.interval,
            grace=self.purger.grace,
            rejoining=", rejoining" if self.purger.rejoining is not None else "",
            s=time.perf_counter() - start,
        )
        self._loop = LoopingCall(self._round)
        self._loop.clock = self.clock
        self._loop.start(self.purger.interval, now=False)

    def _round(self):
        # Errors are the purger's own (logged, counted): the loop goes on.
        return self.purger.run().addErrback(lambda f: self.log.failure("tombstone purge failed", f))

    def stopService(self):
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.purger._running is None:
            return succeed(None)
        # The run under way finishes (its storage call is in the pool) before the storage closes.
        return self.purger.run().addBoth(lambda _: None)
