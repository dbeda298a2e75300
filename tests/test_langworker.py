"""
The lang process's child worker: the node's (blocking) side against real
children, the worker's own and small stand-ins that misbehave on purpose.
Every child is ended by the test (bounded: a few seconds at most).
"""

import io
import json
import os
import signal
import sys

from twisted.trial.unittest import SynchronousTestCase

from minstore.process.lang import LanguageDetection
from minstore.process.langworker import LanguageWorker, WorkerGone, serve

from tests.test_process import ENGLISH, FRENCH, GERMAN, record

#: Stand-in children, run with this interpreter.
LENGTHS = "import json, sys\nfor line in sys.stdin:\n    print(json.dumps([str(len(t)) for t in json.loads(line)]), flush=True)\n"
SILENT = "import sys\nfor line in sys.stdin:\n    pass\n"
NONSENSE = "import sys\nfor line in sys.stdin:\n    print('not json', flush=True)\n"
NULL = "import sys\nfor line in sys.stdin:\n    print('null', flush=True)\n"
DIES = "import sys\nsys.stdin.readline()\nsys.exit(3)\n"
STUBBORN = "import signal, sys, time\nsys.stdin.close()\ntime.sleep(30)\n"


def worker_running(script, test, timeout=5.0):
    worker = LanguageWorker(timeout=timeout)
    worker.argv = (sys.executable, "-c", script)
    worker.start()
    test.addCleanup(worker.stop, grace=0)
    return worker


class RealChildTests(SynchronousTestCase):
    def setUp(self):
        self.worker = LanguageWorker()
        self.worker.start()
        self.addCleanup(self.worker.stop)

    def test_spawns_the_module(self):
        """The child runs this interpreter, and the worker's serve() loop."""
        self.assertEqual(self.worker.argv[:2], (sys.executable, "-c"))
        self.assertIn("from minstore.process.langworker import main", self.worker.argv[2])

    def test_detects_a_batch_and_ends_with_stdin(self):
        self.assertEqual(self.worker.detect([ENGLISH, FRENCH, GERMAN]), ["en", "fr", "de"])
        pid = self.worker.pid
        self.worker.stop()
        self.assertFalse(self.worker.running)
        self.assertFalse(_alive(pid))

    def test_killed_child_is_replaced(self):
        """A dead child fails the batch it had; the next batch gets a new one."""
        self.assertEqual(self.worker.detect([ENGLISH]), ["en"])
        first = self.worker.pid
        os.kill(first, signal.SIGKILL)
        self.assertRaises(WorkerGone, self.worker.detect, [GERMAN])
        self.assertFalse(self.worker.running)
        self.assertEqual(self.worker.detect([GERMAN]), ["de"])
        self.assertNotEqual(self.worker.pid, first)

    def test_child_outlives_sigterm(self):
        """
        SIGTERM to the child (systemd sends it to the whole unit) does not
        end it: the node's closing of its stdin does.
        """
        self.assertEqual(self.worker.detect([ENGLISH]), ["en"])  # the child is up, handlers set
        pid = self.worker.pid
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(self.worker.detect([FRENCH]), ["fr"])
        self.assertEqual(self.worker.pid, pid)
        self.worker.stop()
        self.assertFalse(_alive(pid))

    def test_no_new_child_once_stopping(self):
        self.worker.stop()
        self.assertRaises(WorkerGone, self.worker.detect, [ENGLISH])
        self.assertFalse(self.worker.running)


class MisbehavingChildTests(SynchronousTestCase):
    def test_silent_child_is_killed_after_the_timeout(self):
        worker = worker_running(SILENT, self, timeout=0.2)
        pid = worker.pid
        self.assertRaises(WorkerGone, worker.detect, [ENGLISH])
        self.assertFalse(worker.running)
        self.assertFalse(_alive(pid))

    def test_unreadable_answer_ends_the_child(self):
        worker = worker_running(NONSENSE, self)
        pid = worker.pid
        self.assertRaises(WorkerGone, worker.detect, [ENGLISH])
        self.assertFalse(_alive(pid))
        # The next batch starts another child (here, one that answers).
        worker.argv = (sys.executable, "-c", LENGTHS)
        self.assertEqual(worker.detect(["abc"]), ["3"])

    def test_batch_it_could_not_classify_keeps_the_child(self):
        """null for a batch (the child said why on its stderr): that batch fails, the child stays."""
        worker = worker_running(NULL, self)
        pid = worker.pid
        self.assertRaises(WorkerGone, worker.detect, [ENGLISH])
        self.assertEqual(worker.pid, pid)

    def test_stop_kills_a_child_that_does_not_end(self):
        worker = worker_running(STUBBORN, self)
        pid = worker.pid
        worker.stop(grace=0.2)
        self.assertFalse(worker.running)
        self.assertFalse(_alive(pid))


class LanguageDetectionWithWorkerTests(SynchronousTestCase):
    def lang_with(self, script):
        lang = LanguageDetection({"lang-worker": True})
        lang.worker = worker_running(script, self)
        return lang

    def test_threaded(self):
        """With or without a worker, lang runs off the reactor, in the writer's hop."""
        self.assertTrue(LanguageDetection({"lang-worker": True}).threaded)
        self.assertTrue(LanguageDetection({}).threaded)

    def test_record_gets_the_childs_answer(self):
        lang = LanguageDetection({"lang-worker": True})
        lang.start()
        self.addCleanup(lang.stop)
        self.assertEqual(lang(record(ENGLISH))["lang"], "en")

    def test_a_batch_is_one_line_without_the_texts_that_have_no_letters(self):
        lang = self.lang_with(LENGTHS)
        records = lang.process_batch([record("abc"), record(12345), record("abcdefg")])
        self.assertEqual([r["lang"] for r in records], ["3", None, "7"])

    def test_child_dies_twice_detected_here(self):
        """A write never fails because the child died: retried once, then detected in this process."""
        lang = self.lang_with(DIES)
        self.assertEqual(lang(record(FRENCH))["lang"], "fr")

    def test_node_starts_and_detects_without_a_child(self):
        """
        A child that cannot be spawned does not stop the node: the error is
        logged, and each write's language is detected in the node instead.
        """
        lang = LanguageDetection({"lang-worker": True})
        lang.worker.argv = ("/nonexistent/python",)
        lang.start()
        self.addCleanup(lang.stop)
        self.assertFalse(lang.worker.running)
        self.assertEqual(lang(record(GERMAN))["lang"], "de")


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


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # The worker waits for (reaps) a child it ends: a zombie would still answer.
    with open("/proc/%d/stat" % pid) as f:
        return f.read().split()[2] != "Z"
