"""The batcher behind group commit and the batched thread-pool hops."""

from twisted.internet.defer import Deferred
from twisted.trial import unittest

from minstore.batch import BatchedCalls, Batcher


class ManualBatches:
    """A ``run_batch`` whose calls wait until the test fires them."""

    def __init__(self):
        self.calls = []

    def __call__(self, items):
        d = Deferred()
        self.calls.append((list(items), d))
        return d


class BatcherTests(unittest.TestCase):
    def test_first_item_goes_at_once(self):
        run = ManualBatches()
        batcher = Batcher(run)
        d = batcher.submit("a")
        self.assertEqual([items for items, _ in run.calls], [["a"]])
        run.calls[0][1].callback(["A"])
        self.assertEqual(self.successResultOf(d), "A")
        self.assertTrue(batcher.idle())

    def test_items_submitted_while_held_go_together(self):
        """Items submitted in held() go as one batch at its end, even to an idle batcher."""
        run = ManualBatches()
        batcher = Batcher(run, max_inflight=2)
        with batcher.held():
            ds = [batcher.submit(n) for n in (1, 2, 3)]
            self.assertEqual(run.calls, [])
        self.assertEqual([items for items, _ in run.calls], [[1, 2, 3]])
        run.calls[0][1].callback([10, 20, 30])
        self.assertEqual([self.successResultOf(d) for d in ds], [10, 20, 30])
        self.assertTrue(batcher.idle())

    def test_items_arriving_meanwhile_go_together(self):
        """What arrives while max_inflight batches run goes as one batch, in order."""
        run = ManualBatches()
        batcher = Batcher(run, max_inflight=1)
        first = batcher.submit(1)
        rest = [batcher.submit(n) for n in (2, 3, 4)]
        self.assertEqual(batcher.queued(), 3)
        run.calls[0][1].callback([10])
        self.assertEqual([items for items, _ in run.calls], [[1], [2, 3, 4]])
        run.calls[1][1].callback([20, 30, 40])
        self.assertEqual(self.successResultOf(first), 10)
        self.assertEqual([self.successResultOf(d) for d in rest], [20, 30, 40])

    def test_max_inflight(self):
        run = ManualBatches()
        batcher = Batcher(run, max_inflight=2)
        batcher.submit(1)
        batcher.submit(2)
        batcher.submit(3)
        self.assertEqual([items for items, _ in run.calls], [[1], [2]])
        self.assertEqual((batcher.inflight, batcher.queued()), (2, 1))

    def test_failure_of_one_item(self):
        """A Failure among the results fails that item alone."""
        calls = BatchedCalls(lambda f, *args: _succeed(f(*args)))
        ok = calls(lambda x: x * 2, 4)
        bad = calls(lambda: 1 / 0)
        self.assertEqual(self.successResultOf(ok), 8)
        self.failureResultOf(bad, ZeroDivisionError)

    def test_failure_of_the_batch(self):
        """A batch that fails as a whole fails each item; the next batch still runs."""
        run = ManualBatches()
        batcher = Batcher(run)
        first = batcher.submit(1)
        second, third = batcher.submit(2), batcher.submit(3)
        run.calls[0][1].errback(OSError("disk"))
        self.failureResultOf(first, OSError)
        run.calls[1][1].errback(OSError("disk"))
        self.failureResultOf(second, OSError)
        self.failureResultOf(third, OSError)
        after = batcher.submit(4)
        run.calls[2][1].callback([4])
        self.assertEqual(self.successResultOf(after), 4)

    def test_idle_observers(self):
        run = ManualBatches()
        batcher = Batcher(run)
        idle = []
        batcher.idle_observers.append(lambda: idle.append(batcher.idle()))
        batcher.submit(1)
        batcher.submit(2)
        run.calls[0][1].callback([1])
        self.assertEqual(idle, [])  # the second batch is running
        run.calls[1][1].callback([2])
        self.assertEqual(idle, [True])


def _succeed(value):
    d = Deferred()
    d.callback(value)
    return d


class BatchedCallsTests(unittest.TestCase):
    def test_calls_made_during_a_hop_share_the_next(self):
        hops = []

        def in_thread(f, *args):
            d = Deferred()
            hops.append((f, args, d))
            return d

        calls = BatchedCalls(in_thread)
        a = calls(str.upper, "a")
        b = calls(str.upper, "b")
        c = calls(int, "x")
        self.assertEqual(len(hops), 1)
        f, args, d = hops[0]
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(a), "A")
        self.assertEqual(len(hops), 2)
        f, args, d = hops[1]
        self.assertEqual(len(args[0]), 2)
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(b), "B")
        self.failureResultOf(c, ValueError)


class KeyedLockTests(unittest.SynchronousTestCase):
    def test_free_key_runs_at_once_and_is_released(self):
        from minstore.node import KeyedLock

        lock = KeyedLock()
        self.assertEqual(self.successResultOf(lock.run("k", lambda: 7)), 7)
        self.assertFalse(lock.locked("k"))

    def test_exception_is_a_failed_deferred_and_releases(self):
        from minstore.node import KeyedLock

        lock = KeyedLock()
        self.failureResultOf(lock.run("k", lambda: 1 / 0), ZeroDivisionError)
        self.assertFalse(lock.locked("k"))

    def test_second_caller_waits_for_the_first(self):
        from minstore.node import KeyedLock

        lock = KeyedLock()
        first = Deferred()
        order = []
        a = lock.run("k", lambda: first)
        b = lock.run("k", lambda: order.append("b") or "B")
        self.assertEqual(order, [])
        self.assertTrue(lock.locked("k"))
        first.callback("A")
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), ("A", "B"))
        self.assertFalse(lock.locked("k"))
