"""
The lang process's child worker: the protocol on the node's side (in
memory, with a fake child), and a real child spawned and stopped.
"""

import io
import json
import os
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from minstore.process.lang import LanguageDetection
from minstore.process.langworker import LanguageWorker, WorkerGone, serve

from tests.test_process import ENGLISH, FRENCH, GERMAN, record


class FakeChildTransport(StringTransport):
    def __init__(self):
        StringTransport.__init__(self)
        self.stdin_closed = False
        self.signals = []

    def closeStdin(self):
        self.stdin_closed = True

    def signalProcess(self, name):
        self.signals.append(name)


class FakeReactor(Clock):
    """A Clock whose spawnProcess connects the protocol to a fake child."""

    def __init__(self):
        Clock.__init__(self)
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):
        transport = FakeChildTransport()
        transport.pid = 1000 + len(self.spawned)
        self.spawned.append((args, transport))
        protocol.makeConnection(transport)
        return transport


class _Pipe:
    """The write end of a real pipe, as a child process transport's ``pipes[0]``."""

    def __init__(self, test):
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        os.set_blocking(self.read_end, False)  # a test that finds nothing fails, not hangs
        test.addCleanup(os.close, self.read_end)
        test.addCleanup(os.close, self.write_end)

    def fileno(self):
        return self.write_end


class DirectWriteTests(SynchronousTestCase):
    """Batches go down the child's stdin at once, not at the reactor's next turn."""

    def setUp(self):
        self.reactor = FakeReactor()
        self.worker = LanguageWorker(self.reactor, max_inflight=1)
        self.worker.start()
        self.transport = self.reactor.spawned[0][1]
        self.transport.pipes = {0: _Pipe(self)}
        self.pipe = self.transport.pipes[0]

    def test_batch_written_to_the_pipe_at_once(self):
        self.worker.detect("one")
        self.assertEqual(os.read(self.pipe.read_end, 1000), b'["one"]\n')
        self.assertEqual(self.transport.value(), b"")

    def test_full_pipe_falls_back_to_the_transport_in_order(self):
        """What does not fit, and every later batch, go through the transport."""
        filler = b"x" * 65536
        while True:
            try:
                os.write(self.pipe.write_end, filler)
            except BlockingIOError:
                break
        self.worker.detect("one")
        self.worker.outReceived(b'["en"]\n')
        os.read(self.pipe.read_end, 65536)  # room again: still through the transport
        self.worker.detect("two")
        self.assertEqual(self.transport.value(), b'["one"]\n["two"]\n')


class WorkerProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.worker = LanguageWorker(self.reactor, max_inflight=1)
        self.worker.start()

    def lines(self, n=0):
        """The batches written to the (n-th) child, as lists of texts."""
        data = self.reactor.spawned[n][1].value()
        return [json.loads(line) for line in data.splitlines()]

    def answer(self, codes):
        self.worker.outReceived(json.dumps(codes).encode() + b"\n")

    def test_spawns_the_module(self):
        """The child runs this interpreter, and the worker's serve() loop."""
        args, _ = self.reactor.spawned[0]
        self.assertEqual(args[:2], [sys.executable, "-c"])
        self.assertIn("from minstore.process.langworker import main", args[2])

    def test_texts_asked_meanwhile_go_in_one_batch(self):
        first = self.worker.detect("one")
        rest = [self.worker.detect(t) for t in ("two", "three")]
        self.assertEqual(self.lines(), [["one"]])
        self.answer(["en"])
        self.assertEqual(self.successResultOf(first), "en")
        self.assertEqual(self.lines(), [["one"], ["two", "three"]])
        # An answer may come in pieces.
        self.worker.outReceived(b'["fr", nu')
        self.worker.outReceived(b"ll]\n")
        self.assertEqual([self.successResultOf(d) for d in rest], ["fr", None])

    def test_child_death_fails_what_was_asked_and_respawns(self):
        d = self.worker.detect("one")
        self.worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.failureResultOf(d, WorkerGone)
        self.assertFalse(self.worker.running)
        again = self.worker.detect("two")
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.lines(1), [["two"]])
        self.answer(["en"])
        self.assertEqual(self.successResultOf(again), "en")

    def test_unusable_answer_fails_the_batch(self):
        d = self.worker.detect("one")
        self.answer(None)  # what the child says when it could not classify
        self.failureResultOf(d, WorkerGone)

    def test_stop_closes_stdin_and_waits(self):
        stopped = self.worker.stop()
        transport = self.reactor.spawned[0][1]
        self.assertTrue(transport.stdin_closed)
        self.assertNoResult(stopped)
        self.worker.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)

    def test_stop_kills_a_child_that_does_not_end(self):
        stopped = self.worker.stop()
        self.reactor.advance(5)
        self.assertEqual(self.reactor.spawned[0][1].signals, ["KILL"])
        self.worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)

    def test_no_respawn_when_stopping(self):
        self.worker.stop()
        self.worker.processEnded(Failure(ProcessDone(0)))
        self.failureResultOf(self.worker.detect("late"), WorkerGone)
        self.assertEqual(len(self.reactor.spawned), 1)


class UnstartableWorkerTests(SynchronousTestCase):
    def test_node_starts_and_detects_without_a_child(self):
        """
        A child that cannot be spawned does not stop the node: the error is
        logged, and each write's language is detected in the node instead.
        """
        reactor = FakeReactor()

        def refuse(*args, **kwargs):
            raise OSError(2, "No such file or directory")

        reactor.spawnProcess = refuse
        lang = LanguageDetection({"lang-worker": True})
        lang.worker = LanguageWorker(reactor)
        lang.start()
        self.assertFalse(lang.worker.running)
        self.assertEqual(self.successResultOf(lang(record(GERMAN)))["lang"], "de")


class LanguageDetectionWithWorkerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.lang = LanguageDetection({"lang-worker": True})
        self.lang.worker = LanguageWorker(self.reactor, max_inflight=1)
        self.lang.start()

    def test_not_threaded(self):
        """With a worker the reactor only waits for the child: no thread-pool hop."""
        self.assertFalse(self.lang.threaded)

    def test_record_gets_the_childs_answer(self):
        d = self.lang(record(ENGLISH))
        self.lang.worker.outReceived(b'["en"]\n')
        self.assertEqual(self.successResultOf(d)["lang"], "en")

    def test_no_text_needs_no_child(self):
        """A value without letters is null at once, without asking the child."""
        self.assertIsNone(self.lang(record(12345))["lang"])
        self.assertEqual(self.reactor.spawned[0][1].value(), b"")

    def test_child_dies_twice_detected_here(self):
        """A write never fails because the child died: retried once, then detected in this process."""
        d = self.lang(record(FRENCH))
        self.lang.worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertNoResult(d)  # asked again, of a new child
        self.assertEqual(len(self.reactor.spawned), 2)
        self.lang.worker.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(d)["lang"], "fr")


class ServeTests(SynchronousTestCase):
    def test_a_line_of_codes_per_line_of_texts(self):
        stdin = io.BytesIO(
            json.dumps([ENGLISH, GERMAN]).encode() + b"\n" + json.dumps(["12345", 7]).encode() + b"\n"
        )
        stdout = io.BytesIO()
        serve(stdin, stdout)
        self.assertEqual(stdout.getvalue().splitlines(), [b'["en", "de"]', b"[null, null]"])

    def test_bad_line_answered_null(self):
        stdout, stderr = io.BytesIO(), io.StringIO()
        serve(io.BytesIO(b"not json\n"), stdout, stderr)
        self.assertEqual(stdout.getvalue(), b"null\n")
        self.assertIn("JSONDecodeError", stderr.getvalue())


class RealChildTests(TestCase):
    """A real child process, spawned with the reactor (bounded: a few seconds)."""

    timeout = 60

    @inlineCallbacks
    def test_detects_and_ends_with_stdin(self):
        worker = LanguageWorker(reactor)
        worker.start()
        self.addCleanup(lambda: worker.stop() if worker.running else None)
        codes = yield gatherResults([worker.detect(ENGLISH), worker.detect(FRENCH), worker.detect(GERMAN)])
        self.assertEqual(codes, ["en", "fr", "de"])
        pid = worker.pid
        yield worker.stop()
        self.assertFalse(worker.running)
        self.assertFalse(_alive(pid))

    @inlineCallbacks
    def test_killed_child_is_replaced(self):
        worker = LanguageWorker(reactor)
        worker.start()
        self.addCleanup(lambda: worker.stop() if worker.running else None)
        self.assertEqual((yield worker.detect(ENGLISH)), "en")
        first = worker.pid
        os.kill(first, signal.SIGKILL)
        for _ in range(100):
            if not worker.running:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(worker.running)
        self.assertEqual((yield worker.detect(GERMAN)), "de")
        self.assertNotEqual(worker.pid, first)
        yield worker.stop()


    @inlineCallbacks
    def test_child_outlives_sigterm(self):
        """
        SIGTERM to the child (systemd sends it to the whole unit) does not
        end it: the node's closing of its stdin does.
        """
        worker = LanguageWorker(reactor)
        worker.start()
        self.addCleanup(lambda: worker.stop() if worker.running else None)
        self.assertEqual((yield worker.detect(ENGLISH)), "en")  # the child is up, handlers set
        pid = worker.pid
        os.kill(pid, signal.SIGTERM)
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(worker.running)
        self.assertEqual((yield worker.detect(FRENCH)), "fr")
        self.assertEqual(worker.pid, pid)
        yield worker.stop()
        self.assertFalse(_alive(pid))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Reaped by the reactor as it ended: a zombie would still answer.
    with open("/proc/%d/stat" % pid) as f:
        return f.read().split()[2] != "Z"
