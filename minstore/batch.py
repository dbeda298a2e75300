"""
Batching: many items for one costly call.

A hand-off to the thread pool costs a node more than most of the work it
carries (about 0.2 ms of a CPython process's time per hop, measured on a
POST); a storage write costs one sync whatever its size.  A L{Batcher}
sends the first item at once and queues what arrives while
``max_inflight`` calls are running; the queue goes as one batch when a call
returns.  Under light load nothing waits, under heavy load batches grow by
themselves.
"""

from contextlib import contextmanager

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure


class Batcher:
    """
    Hand queued items to ``run_batch(items)``, which returns (or a Deferred
    fires with) one result per item, in order; a result that is a
    L{Failure} fails that item only.  A batch that fails as a whole fails
    each of its items.
    """

    def __init__(self, run_batch, max_inflight=1):
        self._run_batch = run_batch
        self.max_inflight = max_inflight
        self._queue = []
        self.inflight = 0
        self._held = 0
        #: Called with no argument each time the batcher becomes idle.
        self.idle_observers = []

    def submit(self, item):
        """A Deferred of the item's result."""
        d = Deferred()
        self._queue.append((item, d))
        self._flush()
        return d

    @contextmanager
    def held(self):
        """
        Queue what is submitted inside the block and send it together at
        its end: items that arrived together (a peer's batch of replicas)
        go in one call, not the first alone and the rest in the next.
        """
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            self._flush()

    def queued(self):
        return len(self._queue)

    def idle(self):
        return not self._queue and not self.inflight

    def _flush(self):
        while self._queue and self.inflight < self.max_inflight and not self._held:
            batch, self._queue = self._queue, []
            self.inflight += 1
            d = maybeDeferred(self._run_batch, [item for item, _ in batch])
            d.addBoth(self._done, batch)

    def _done(self, results, batch):
        self.inflight -= 1
        if isinstance(results, Failure):
            for _, d in batch:
                d.errback(results)
        else:
            for (_, d), result in zip(batch, results):
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)
        self._flush()
        if self.idle():
            for observer in self.idle_observers:
                observer()


def _call_each(calls):
    """Run ``(f, args)`` calls in turn; the result or the L{Failure} of each."""
    results = []
    for f, args in calls:
        try:
            results.append(f(*args))
        except BaseException:
            results.append(Failure())
    return results


class BatchedCalls:
    """
    An ``in_thread(f, *args)`` that carries the calls made while one hop is
    running to the thread pool together, in one hop.
    """

    def __init__(self, in_thread):
        self._batcher = Batcher(lambda calls: in_thread(_call_each, calls))

    def __call__(self, f, *args):
        return self._batcher.submit((f, args))
