"""
Mirroring and bridge: every write this node must pass on reaches every peer
of its servers.list, durably, in order per uid, coalesced to the newest
version of each uid, with exponential back-off and jitter while a peer is
down.

A L{PeerReplicator} per peer keeps the changes the peer has not stored yet
(newest per uid, in sequence order) and sends them in batches to the peer's
``POST /_cluster/replicas``, with ``bridge=1`` when this node is a bridge.
When the peer has stored a batch, its checkpoint moves to the batch's last
sequence number.  The checkpoints are saved at most once a
L{Replication.CHECKPOINT_INTERVAL} while peers acknowledge batches, at once
when peers are added or removed, and at stop (L{ClusterService}), so after a
restart the node resends only what was not acknowledged (after a crash, also
what was acknowledged in the last interval: replicas are idempotent).
"""

import random
from collections import OrderedDict

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

#: Records sent in one request to a peer.
BATCH_RECORDS = 256
#: Bytes sent in one request to a peer (a batch holds at least one record).
BATCH_BYTES = 1024 * 1024
#: After this many failures in a row a peer is shown as down, not retrying.
DOWN_AFTER = 5


def backoff_delay(attempt, base, cap, rng=random.random):
    """
    Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling
    from ``base`` up to ``cap``, then a random half of it taken off so that
    nodes retrying the same peer spread out ("equal jitter").
    """
    delay = min(cap, base * (2 ** (attempt - 1)))
    return delay / 2 + rng() * delay / 2


class PeerReplicator:
    log = Logger()

    def __init__(self, url, replication, checkpoint):
        self.url = url
        self.replication = replication
        self.checkpoint = checkpoint
        self.pending = OrderedDict()  # key -> Change, in sequence order
        self.state = "up"
        self.failures = 0
        self.last_error = None
        self.last_success = None
        self.sent = 0
        self.errors = 0
        self._sending = None
        self._retry = None
        self._pause = None  # the wait for send_interval to pass
        self._next_send = 0.0
        self._stopped = False

    def add(self, change):
        if change.seq <= self.checkpoint:
            return
        self.pending.pop(change.key, None)
        self.pending[change.key] = change

    def oldest_age(self, now):
        for change in self.pending.values():
            return max(0.0, now - change.time)
        return 0.0

    def kick(self):
        """Send what is pending, unless a send or a retry wait is under way."""
        if self._stopped or self._sending is not None or self._retry is not None or self._pause is not None:
            return
        if not self.pending:
            return
        r = self.replication
        now = r.clock.seconds()
        if now < self._next_send and len(self.pending) < BATCH_RECORDS:
            # At most one request per send_interval: under load, batches
            # grow instead of requests multiplying (each costs the emitter
            # about as much as a few records).
            self._pause = r.clock.callLater(self._next_send - now, self._paused)
            return
        self._next_send = now + r.send_interval
        self._sending = ensureDeferred(self._send())

        def done(_):
            self._sending = None
            self.kick()

        self._sending.addBoth(done)

    def _next_batch(self):
        batch, size = [], 0
        for change in self.pending.values():
            if batch and (len(batch) >= BATCH_RECORDS or size + len(change.data) > BATCH_BYTES):
                break
            batch.append(change)
            size += len(change.data)
        return batch

    async def _send(self):
        batch = self._next_batch()
        r = self.replication
        try:
            await r.client.send_replicas(
                self.url, [c.data for c in batch], bridge=r.bridge(), timeout=r.timeout
            )
        except Exception as e:
            self.failures += 1
            self.errors += 1
            self.last_error = "%s: %s" % (type(e).__name__, e)
            self.state = "down" if self.failures >= DOWN_AFTER else "retrying"
            delay = backoff_delay(self.failures, r.retry_base, r.retry_cap, r.rng)
            if self.failures == 1 or self.failures == DOWN_AFTER:
                self.log.warn(
                    "replication to {peer} failed ({error}); {backlog} writes wait, "
                    "retrying in {delay:.2f}s",
                    peer=self.url,
                    error=self.last_error,
                    backlog=len(self.pending),
                    delay=delay,
                )
            if not self._stopped:
                self._retry = r.clock.callLater(delay, self._retry_now)
            return
        if self.failures:
            self.log.info("replication to {peer} is back after {n} failures", peer=self.url, n=self.failures)
        self.failures = 0
        self.state = "up"
        self.last_success = r.clock.seconds()
        self.sent += len(batch)
        for change in batch:
            if self.pending.get(change.key) is change:
                del self.pending[change.key]
        self.checkpoint = max(self.checkpoint, batch[-1].seq)
        r.delivered(self, batch)

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
            "backlog": len(self.pending),
            "oldest_undelivered_age": round(self.oldest_age(now), 3),
            "checkpoint": self.checkpoint,
            "sent": self.sent,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_success": self.last_success,
        }


class Replication:
    """
    Owns the change log and one L{PeerReplicator} per peer.  Hooked into the
    node: ``log_changes`` runs in the writer thread (so a write is logged
    before it is acknowledged), ``committed`` on the reactor once it is.
    """

    log = Logger()

    #: Seconds between two saves of the checkpoints while peers acknowledge
    #: batches (a save per batch cost a thread hop and a file write each).
    CHECKPOINT_INTERVAL = 1.0

    def __init__(
        self,
        node,
        changelog,
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
        self.changelog = changelog
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
        self._waiters = {}  # key -> [(version, Deferred, set of peers that stored it)]
        self._saving = False
        self._save_again = False
        self._save_timer = None
        self._stopped = False
        #: Changes committed out of order, by seq, and the next seq to hand
        #: to the replicators (see committed()).
        self._unreleased = {}
        self._next_release = 1

    def bridge(self):
        return bool(self.servers and self.servers.bridge)

    # -- wiring -----------------------------------------------------------

    def start(self, servers):
        """Open the change log (blocking, at start) and resume every peer."""
        checkpoints, changes = self.changelog.open()
        self._next_release = self.changelog.last_seq + 1
        self.servers = servers
        # No checkpoint at all (none saved before a crash, or an unreadable
        # file): every change in the log may still be owed, resend it all.
        new_peer = self.changelog.last_seq if checkpoints else 0
        for url in servers.peers:
            # A peer seen for the first time gets the writes from now on.
            replicator = PeerReplicator(url, self, checkpoints.get(url, new_peer))
            for change in changes:
                replicator.add(change)
            self.peers[url] = replicator
        self.node.commit_observers.append(self)
        for replicator in self.peers.values():
            if replicator.pending:
                self.log.info(
                    "resuming replication to {peer}: {n} writes to send",
                    peer=replicator.url,
                    n=len(replicator.pending),
                )
            replicator.kick()

    def stop(self):
        """
        Stop sending and saving.  The final save of the checkpoints is the
        caller's (L{ClusterService.stopService} makes it, blocking): one
        pending here is dropped, so none runs in a thread pool that stops.
        """
        self._stopped = True
        self._cancel_save()
        for replicator in self.peers.values():
            replicator.stop()
        for waiters in self._waiters.values():
            for _, d, _ in waiters:
                if not d.called:
                    d.callback(None)
        self._waiters.clear()
        self.changelog.close()

    def reconfigure(self, servers):
        """Take a re-read servers.list: start new peers, forget removed ones."""
        old = self.servers
        self.servers = servers
        added = [u for u in servers.peers if u not in self.peers]
        removed = [u for u in self.peers if u not in servers.peers]
        for url in removed:
            self.peers.pop(url).stop()
        for url in added:
            self.peers[url] = PeerReplicator(url, self, self.changelog.last_seq)
        if added or removed:
            # At once, not on the timer: an added peer must be in the file
            # (a restart would otherwise take it for a new one and skip what
            # it was owed), and a removed one no longer hold compaction back.
            self._cancel_save()
            self._save_checkpoints()
        return {
            "added": added,
            "removed": removed,
            "bridge": servers.bridge,
            "bridge_changed": bool(old) and old.bridge != servers.bridge,
        }

    # -- the write path ---------------------------------------------------

    def stored(self, items, forwarded):
        """In the writer thread: log what must reach the peers."""
        if forwarded and self.peers:
            return self.changelog.append(forwarded)
        return []

    def committed(self, items, forwarded, changes):
        # Two storage writes run at once (the node's group commit keeps two
        # in flight), so a batch logged later may be committed first.  Its
        # changes wait for the earlier ones: a peer's checkpoint (the seq it
        # has everything up to) must never pass a change it has not had.
        for change in changes:
            self._unreleased[change.seq] = change
        released = False
        while self._next_release in self._unreleased:
            change = self._unreleased.pop(self._next_release)
            self._next_release += 1
            released = True
            for replicator in self.peers.values():
                replicator.add(change)
        if released:
            for replicator in self.peers.values():
                replicator.kick()

    def delivered(self, replicator, batch):
        # Only sync=1 writes wait: most batches have nothing to look up.
        if self._waiters:
            for change in batch:
                waiters = self._waiters.get(change.key)
                if not waiters:
                    continue
                for version, d, stored in waiters:
                    if change.version >= version:
                        stored.add(replicator.url)
                        if len(stored) >= len(self.peers) and not d.called:
                            d.callback(None)
                self._waiters[change.key] = [w for w in waiters if not w[1].called]
                if not self._waiters[change.key]:
                    del self._waiters[change.key]
        self._schedule_save()

    def wait_stored(self, collection, uid, version, timeout):
        """
        For ``sync=1``: a Deferred firing with ``(stored, expected)``, the
        number of peers holding this version (or a newer one) when all have
        it or when ``timeout`` seconds have passed.

        A peer holds it when nothing of that uid is pending for it (a change
        being sent stays in ``pending`` until the peer acknowledges it); a
        pending newer version does not count, it is not delivered yet.
        Otherwise the peer counts once a change of the uid with this version
        or a newer one is delivered to it.
        """
        key = (collection, uid)
        expected = len(self.peers)
        stored = set(url for url, r in self.peers.items() if key not in r.pending)
        if len(stored) >= expected:
            return succeed((len(stored), expected))
        d = Deferred()
        self._waiters.setdefault(key, []).append((version, d, stored))
        d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, t: None)
        return d.addCallback(lambda _: (len(stored), expected))

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
        checkpoints = {url: r.checkpoint for url, r in self.peers.items()}

        def saved(result):
            self._saving = False
            if self._save_again:
                self._save_again = False
                self._save_checkpoints()
            return None

        def failed(failure):
            self.log.failure("saving replication checkpoints failed", failure)

        self.in_thread(self.changelog.save_checkpoints, checkpoints).addErrback(failed).addBoth(saved)

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
            backlog.add_metric([url], len(r.pending))
            lag.add_metric([url], r.oldest_age(now))
            up.add_metric([url], 1 if r.state == "up" else 0)
            sent.add_metric([url], r.sent)
            errors.add_metric([url], r.errors)
        return [backlog, lag, up, sent, errors]
