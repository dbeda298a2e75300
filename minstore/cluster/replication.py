"""
Mirroring and bridge: every write this node must pass on reaches every peer
of its servers.list, durably, in order per uid, coalesced to the newest
version of each uid, with exponential back-off and jitter while a peer is
down.

The writes to pass on are the storage's own change feed
(L{minstore.interfaces.IStorage.changes}, the items stored with
``forward``): a client's write, or a replica received from a bridge.  A
L{PeerReplicator} per peer keeps only a checkpoint, the sequence number up
to which the peer has everything; it reads the next batch of the feed after
it, sends it to the peer's ``POST /_cluster/replicas`` (with ``bridge=1``
when this node is a bridge), and moves the checkpoint once the peer has
stored it.  Nothing proportional to a peer's backlog is held in memory: a
peer that is down for a million writes costs one batch.

The checkpoints are saved in the storage at most once a
L{Replication.CHECKPOINT_INTERVAL} while peers acknowledge batches, at once
when peers are added or removed, and at stop, so after a restart the node
resends only what was not acknowledged (after a crash, also what was
acknowledged in the last interval: replicas are idempotent, the receiver
keeps the newer version).
"""

import random
from collections import OrderedDict

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from minstore.records import version_timestamp

#: Records sent in one request to a peer.
BATCH_RECORDS = 256
#: Bytes sent in one request to a peer (a batch holds at least one record).
BATCH_BYTES = 1024 * 1024
#: After this many failures in a row a peer is shown as down, not retrying.
DOWN_AFTER = 5
#: Least seconds between two exact counts of a peer's backlog while it has one.
BACKLOG_COUNT_INTERVAL = 1.0


def backoff_delay(attempt, base, cap, rng=random.random):
    """
    Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling
    from ``base`` up to ``cap``, then a random half of it taken off so that
    nodes retrying the same peer spread out ("equal jitter").
    """
    delay = min(cap, base * (2 ** (attempt - 1)))
    return delay / 2 + rng() * delay / 2


def _batch_of(changes):
    """The first changes of a feed read that fit in one request."""
    batch, size = [], 0
    for change in changes:
        if batch and size + len(change.data) > BATCH_BYTES:
            break
        batch.append(change)
        size += len(change.data)
    return batch


class PeerReplicator:
    log = Logger()

    def __init__(self, url, replication, checkpoint):
        self.url = url
        self.replication = replication
        #: Every forwarded change up to this sequence number is stored by the peer.
        self.checkpoint = checkpoint
        self.state = "up"
        self.failures = 0
        self.last_error = None
        self.last_success = None
        self.sent = 0
        self.errors = 0
        #: Forwarded changes after the checkpoint: exact after a read that
        #: reached the end of the feed, else counted at most once a
        #: BACKLOG_COUNT_INTERVAL.
        self.backlog = 0
        self._backlog_counted = None
        #: The batch being sent, with the seq it reaches (one batch, bounded
        #: by BATCH_RECORDS/BYTES).  Dropped when the send fails: the retry
        #: reads the feed again, so it carries the newest version of each uid
        #: written meanwhile (ten updates while the peer is down: one change).
        self._batch = None
        self._batch_end = None
        self._oldest = None  # version time of the oldest undelivered change
        self._sending = None
        self._retry = None
        self._pause = None  # the wait for send_interval to pass
        self._next_send = 0.0
        self._stopped = False
        self._more = True  # the feed may hold changes after the checkpoint

    def oldest_age(self, now):
        if self._oldest is None:
            return 0.0
        return max(0.0, now - self._oldest)

    def behind(self):
        """Whether the feed may hold forwarded changes this peer has not stored."""
        return self._more or self.replication.storage.last_seq() > self.checkpoint

    def kick(self):
        """Send what is owed, unless a send or a retry wait is under way."""
        if self._stopped or self._sending is not None or self._retry is not None or self._pause is not None:
            return
        if not self.behind():
            return
        r = self.replication
        now = r.clock.seconds()
        if now < self._next_send:
            # At most one request per send_interval: under load, batches
            # grow instead of requests multiplying (each costs the emitter
            # about as much as a few records).
            self._pause = r.clock.callLater(self._next_send - now, self._paused)
            return
        self._sending = ensureDeferred(self._send())

        def done(_):
            self._sending = None
            self.kick()

        def failed(failure):
            self.log.failure("replication to {peer}: unexpected error", failure, peer=self.url)

        self._sending.addErrback(failed).addBoth(done)

    async def _read(self):
        """Read the next batch after the checkpoint (in the thread pool)."""
        r = self.replication
        count = self._backlog_counted is None or r.clock.seconds() - self._backlog_counted >= BACKLOG_COUNT_INTERVAL
        changes, scanned, backlog = await r.in_thread(r.read_feed, self.checkpoint, count)
        batch = _batch_of(changes)
        if len(batch) < len(changes):
            scanned = batch[-1].seq
        if backlog is not None:
            self.backlog = backlog
            if len(changes) >= BATCH_RECORDS:
                self._backlog_counted = r.clock.seconds()
        else:
            self.backlog = max(self.backlog, len(changes))  # at least this many: counted again later
        if not batch:
            self.backlog = 0
            self._oldest = None
        else:
            self._oldest = version_timestamp(batch[0].version)
        return batch, scanned

    async def _send(self):
        r = self.replication
        try:
            batch, scanned = await self._read()
        except Exception as e:
            self._failed("reading the change feed: %s: %s" % (type(e).__name__, e))
            return
        if self._stopped:
            return
        if not batch:
            self._more = False
            if scanned > self.checkpoint:
                self.checkpoint = scanned  # only changes not to pass on
                r.delivered(self, ())
            return
        self._batch, self._batch_end = batch, scanned
        self._next_send = r.clock.seconds() + r.send_interval
        try:
            await r.client.send_replicas(
                self.url, [c.data for c in batch], bridge=r.bridge(), timeout=r.timeout
            )
        except Exception as e:
            self._batch = self._batch_end = None
            self._failed("%s: %s" % (type(e).__name__, e))
            return
        if self.failures:
            self.log.info("replication to {peer} is back after {n} failures", peer=self.url, n=self.failures)
        self.failures = 0
        self.state = "up"
        self.last_success = r.clock.seconds()
        self.sent += len(batch)
        self.backlog = max(0, self.backlog - len(batch))
        self.checkpoint = max(self.checkpoint, self._batch_end)
        self._batch = self._batch_end = None
        self._more = True  # read on: the next read says whether anything is left
        r.delivered(self, batch)

    def _failed(self, error):
        r = self.replication
        self.failures += 1
        self.errors += 1
        self.last_error = error
        self.state = "down" if self.failures >= DOWN_AFTER else "retrying"
        delay = backoff_delay(self.failures, r.retry_base, r.retry_cap, r.rng)
        if self.failures == 1 or self.failures == DOWN_AFTER:
            self.log.warn(
                "replication to {peer} failed ({error}); about {backlog} writes wait, "
                "retrying in {delay:.2f}s",
                peer=self.url,
                error=self.last_error,
                backlog=self.backlog,
                delay=delay,
            )
        if not self._stopped:
            self._retry = r.clock.callLater(delay, self._retry_now)

    def notify(self):
        """New forwarded changes were stored."""
        self._more = True
        self.kick()

    def _retry_now(self):
        self._retry = None
        self.kick()

    def _paused(self):
        self._pause = None
        self.kick()

    def stop(self):
        self._stopped = True
        for call in (self._retry, self._pause):
            if call is not None and call.active():
                call.cancel()
        self._retry = self._pause = None
        if self._sending is not None:
            self._sending.cancel()

    def status(self, now):
        return {
            "url": self.url,
            "state": self.state,
            "backlog": self.backlog,
            "oldest_undelivered_age": round(self.oldest_age(now), 3),
            "checkpoint": self.checkpoint,
            "sent": self.sent,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_success": self.last_success,
        }


class Replication:
    """
    One L{PeerReplicator} per peer, over the node's storage feed.  The node
    calls ``committed`` on the reactor thread after each stored batch.
    """

    log = Logger()

    #: Seconds between two saves of the checkpoints while peers acknowledge
    #: batches (a save per batch cost a thread hop and a commit each).
    CHECKPOINT_INTERVAL = 1.0

    def __init__(
        self,
        node,
        client,
        clock,
        in_thread,
        timeout=5.0,
        retry_base=0.1,
        retry_cap=30.0,
        rng=random.random,
        send_interval=0.0,
    ):
        self.node = node
        self.storage = node.storage
        self.client = client
        self.clock = clock
        self.in_thread = in_thread
        self.timeout = timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.rng = rng
        #: Least time between the starts of two sends to one peer.
        self.send_interval = send_interval
        self.servers = None
        self.peers = OrderedDict()  # url -> PeerReplicator
        self._waiters = []  # [(seq, Deferred, set of peer urls at or past it)]
        self._saving = False
        self._save_again = False
        self._save_timer = None
        self._stopped = False
        node.commit_observers.append(self)

    def bridge(self):
        return bool(self.servers and self.servers.bridge)

    def read_feed(self, after, count_backlog):
        """
        In a thread: the next forwarded changes after a checkpoint, and the
        backlog: exact when the read reached the end of the feed, counted
        when asked, else None.
        """
        changes, scanned = self.storage.changes(after, BATCH_RECORDS, forwarded_only=True)
        if len(changes) < BATCH_RECORDS:
            backlog = len(changes)
        elif count_backlog:
            backlog = self.storage.count_changes(after, True)
        else:
            backlog = None
        return changes, scanned, backlog

    # -- wiring -----------------------------------------------------------

    def start(self, servers):
        """Resume every peer from its saved checkpoint (blocking: at start, after the storage opened)."""
        checkpoints = self.storage.checkpoints()
        self.servers = servers
        added = []
        for url in servers.peers:
            checkpoint = checkpoints.get(url)
            if checkpoint is None:
                # A peer seen for the first time gets the writes from now
                # on (sync gives it the rest).
                checkpoint = self.storage.last_seq()
                added.append(url)
            self.peers[url] = PeerReplicator(url, self, checkpoint)
        if added or set(checkpoints) - set(self.peers):
            self.storage.save_checkpoints(self._checkpoints())
        for replicator in self.peers.values():
            if replicator.checkpoint < self.storage.last_seq():
                self.log.info(
                    "resuming replication to {peer} from seq {seq}",
                    peer=replicator.url,
                    seq=replicator.checkpoint,
                )
            replicator.kick()

    def _checkpoints(self):
        return {url: r.checkpoint for url, r in self.peers.items()}

    def stop(self):
        """
        Stop sending; the Deferred of the final save of the checkpoints
        (in the thread pool, which stops after it).
        """
        self._stopped = True
        self._cancel_save()
        for replicator in self.peers.values():
            replicator.stop()
        for _, d, _ in self._waiters:
            if not d.called:
                d.callback(None)
        self._waiters = []
        checkpoints = self._checkpoints()
        d = self.in_thread(self.storage.save_checkpoints, checkpoints)
        return d.addErrback(lambda f: self.log.failure("saving replication checkpoints failed", f))

    def reconfigure(self, servers):
        """Take a re-read servers.list: start new peers, forget removed ones."""
        old = self.servers
        self.servers = servers
        added = [u for u in servers.peers if u not in self.peers]
        removed = [u for u in self.peers if u not in servers.peers]
        for url in removed:
            self.peers.pop(url).stop()
        for url in added:
            self.peers[url] = PeerReplicator(url, self, self.storage.last_seq())
        if added or removed:
            # At once, not on the timer: an added peer must be saved (a
            # restart would otherwise take it for a new one and skip what
            # it was owed).
            self._cancel_save()
            self._save_checkpoints()
        self._check_waiters()
        return {
            "added": added,
            "removed": removed,
            "bridge": servers.bridge,
            "bridge_changed": bool(old) and old.bridge != servers.bridge,
        }

    # -- the write path ---------------------------------------------------

    def committed(self, stored):
        """The node stored a batch: ``[(WriteItem, seq)]``."""
        if self._stopped:
            return
        if any(item.forward for item, _ in stored):
            for replicator in self.peers.values():
                replicator.notify()

    def delivered(self, replicator, batch):
        if self._waiters:
            self._check_waiters()
        self._schedule_save()

    def _check_waiters(self):
        kept = []
        for seq, d, stored in self._waiters:
            if d.called:
                continue
            for url, r in self.peers.items():
                if r.checkpoint >= seq:
                    stored.add(url)
            if len(stored & set(self.peers)) >= len(self.peers):
                d.callback(None)
            else:
                kept.append((seq, d, stored))
        self._waiters = kept

    def wait_stored(self, seq, timeout):
        """
        For ``sync=1``: a Deferred firing with ``(stored, expected)``, the
        number of peers whose checkpoint has passed ``seq`` (so they hold
        that write, or a newer version of its uid) when all have, or when
        ``timeout`` seconds have passed.
        """
        expected = len(self.peers)
        stored = set(url for url, r in self.peers.items() if seq is None or r.checkpoint >= seq)
        if len(stored) >= expected:
            return succeed((len(stored), expected))
        d = Deferred()
        self._waiters.append((seq, d, stored))
        d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, t: None)
        return d.addCallback(lambda _: (len(stored & set(self.peers)), expected))

    def _schedule_save(self):
        """Save the checkpoints CHECKPOINT_INTERVAL from now, unless a save is already due."""
        if self._save_timer is None and not self._stopped:
            self._save_timer = self.clock.callLater(self.CHECKPOINT_INTERVAL, self._save_due)

    def _save_due(self):
        self._save_timer = None
        self._save_checkpoints()

    def _cancel_save(self):
        if self._save_timer is not None:
            if self._save_timer.active():
                self._save_timer.cancel()
            self._save_timer = None

    def _save_checkpoints(self):
        # One save in flight at a time; a save asked meanwhile follows it.
        if self._stopped:
            return
        if self._saving:
            self._save_again = True
            return
        self._saving = True
        checkpoints = self._checkpoints()

        def saved(result):
            self._saving = False
            if self._save_again:
                self._save_again = False
                self._save_checkpoints()
            return None

        def failed(failure):
            self.log.failure("saving replication checkpoints failed", failure)

        self.in_thread(self.storage.save_checkpoints, checkpoints).addErrback(failed).addBoth(saved)

    # -- status and metrics -------------------------------------------------

    def status(self):
        now = self.clock.seconds()
        return [r.status(now) for r in self.peers.values()]

    def collect(self):
        """Prometheus collector: backlog, lag and counters per peer."""
        now = self.clock.seconds()
        backlog = GaugeMetricFamily(
            "minstore_replication_backlog", "Writes not yet stored by the peer.", labels=["peer"]
        )
        lag = GaugeMetricFamily(
            "minstore_replication_lag_seconds",
            "Age of the oldest write the peer has not stored.",
            labels=["peer"],
        )
        up = GaugeMetricFamily("minstore_replication_peer_up", "1 when the last send succeeded.", labels=["peer"])
        sent = CounterMetricFamily("minstore_replication_sent", "Records stored by the peer.", labels=["peer"])
        errors = CounterMetricFamily("minstore_replication_errors", "Failed sends to the peer.", labels=["peer"])
        for url, r in self.peers.items():
            backlog.add_metric([url], r.backlog)
            lag.add_metric([url], r.oldest_age(now))
            up.add_metric([url], 1 if r.state == "up" else 0)
            sent.add_metric([url], r.sent)
            errors.add_metric([url], r.errors)
        return [backlog, lag, up, sent, errors]
