"""The files engine's writer process: record files written off the node's GIL, and what happens when it is gone."""

import os
import signal
import sys

from twisted.trial.unittest import SynchronousTestCase

from minstore.storage.files import FileStorage
from minstore.storage.filewriter import FileWriter, serve
from tests.contracts import record


class FileWriterTests(SynchronousTestCase):
    def open(self, data_dir=None, **kwargs):
        storage = FileStorage(data_dir or self.mktemp(), **kwargs)
        storage.open()
        self.addCleanup(storage.close)
        return storage

    def path(self, storage, collection, uid):
        return os.path.join(storage.root, collection, uid)

    def test_child_writes_the_files(self):
        """With the writer running, a write's record files are on disk once flushed."""
        storage = self.open()
        self.assertTrue(storage._writer.running)
        data = [record("books", "u%d" % i, i) for i in range(50)]
        storage.write([("books", "u%d" % i, d, False) for i, d in enumerate(data)])
        for i, d in enumerate(data):
            self.assertEqual(storage.get("books", "u%d" % i), d)  # at once, pending or not
        storage.flush()
        self.assertEqual(storage._writer.pending, {})
        for i, d in enumerate(data):
            with open(self.path(storage, "books", "u%d" % i), "rb") as f:
                self.assertEqual(f.read(), d)

    def test_reads_come_from_memory_until_written(self):
        """A record the child has not written yet is read from memory, not from its (old) file."""
        storage = self.open()
        old, new = record("books", "dune", 1), record("books", "dune", 2)
        storage.write([("books", "dune", old, False)])
        storage.flush()
        storage._writer.pending[("books", "dune")] = (10**9, new)  # as if not written yet
        self.assertEqual(storage.get("books", "dune"), new)
        self.assertEqual(storage.list("books", None, None, 10), [new])
        del storage._writer.pending[("books", "dune")]
        self.assertEqual(storage.get("books", "dune"), old)

    def test_killed_child_nothing_lost(self):
        """
        A writer killed with SIGKILL loses nothing: the engine writes what it
        had not written, and every later write, itself.
        """
        storage = self.open()
        first = [record("books", "a%d" % i, i) for i in range(20)]
        storage.write([("books", "a%d" % i, d, False) for i, d in enumerate(first)])
        proc = storage._writer._proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        later = [record("books", "b%d" % i, i) for i in range(20)]
        for i, d in enumerate(later):
            storage.write([("books", "b%d" % i, d, False)])
        storage.flush()
        self.assertFalse(storage._writer.running)
        self.assertEqual(storage._writer.pending, {})
        for prefix, batch in (("a", first), ("b", later)):
            for i, d in enumerate(batch):
                with open(self.path(storage, "books", "%s%d" % (prefix, i)), "rb") as f:
                    self.assertEqual(f.read(), d)
        storage.close()
        again = self.open(storage.root[: -len("/records")])
        self.assertEqual(again.count(), 40)

    def test_writer_that_cannot_start(self):
        """Without a writer process (it cannot start), the engine writes the files itself."""
        self.patch(FileWriter, "argv", ("/nonexistent/python",))
        storage = self.open()
        self.assertFalse(storage._writer.running)
        data = record("books", "dune", 1)
        storage.write([("books", "dune", data, False)])
        with open(self.path(storage, "books", "dune"), "rb") as f:
            self.assertEqual(f.read(), data)

    def test_without_writer_process(self):
        """writer_process=False: the files are written by the engine, at once."""
        storage = self.open(writer_process=False)
        self.assertFalse(storage._writer.running)
        data = record("books", "dune", 1)
        storage.write([("books", "dune", data, False)])
        with open(self.path(storage, "books", "dune"), "rb") as f:
            self.assertEqual(f.read(), data)

    def test_child_outlives_sigterm(self):
        """
        SIGTERM to the writer (systemd sends it to the whole unit) does not
        end it: it goes on writing until the engine closes its stdin.
        """
        storage = self.open()
        storage.write([("books", "a", record("books", "a", 1), False)])
        storage.flush()  # the child has answered: it is up, its handlers set
        proc = storage._writer._proc
        os.kill(proc.pid, signal.SIGTERM)
        data = record("books", "b", 2)
        storage.write([("books", "b", data, False)])
        storage.flush()
        self.assertTrue(storage._writer.running)
        self.assertIsNone(proc.poll())
        with open(self.path(storage, "books", "b"), "rb") as f:
            self.assertEqual(f.read(), data)
        storage.close()
        self.assertEqual(proc.wait(10), 0)

    def test_close_ends_the_child(self):
        """close() writes what is pending, then the child exits."""
        storage = self.open()
        proc = storage._writer._proc
        storage.write([("books", "dune", record("books", "dune", 1), False)])
        storage.close()
        self.assertEqual(proc.wait(10), 0)
        self.assertTrue(os.path.exists(self.path(storage, "books", "dune")))


class ServeTests(SynchronousTestCase):
    """The child's loop, run in this process on pipes."""

    def run_serve(self, lines, parent=None):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "books"))
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        os.write(stdin_w, lines)
        os.close(stdin_w)
        serve(root, stdin_r, stdout_w, parent=os.getppid() if parent is None else parent)
        os.close(stdin_r)
        os.close(stdout_w)
        with os.fdopen(stdout_r, "rb") as f:
            answers = f.read()
        return root, answers

    def test_writes_lines_and_answers_counts(self):
        """Each line's record goes to its file; the answer counts the lines written."""
        lines = b"0\tbooks\tdune\t{\"v\":1}\n1\tbooks\tmessiah\t{\"deleted\":true}\n"
        root, answers = self.run_serve(lines)
        self.assertEqual(answers, b"2\n")
        with open(os.path.join(root, "books", "dune"), "rb") as f:
            self.assertEqual(f.read(), b'{"v":1}')
        with open(os.path.join(root, "books", "messiah"), "rb") as f:
            self.assertEqual(f.read(), b'{"deleted":true}')

    def test_overwrite_with_shorter_record(self):
        """A record file written over a longer one holds exactly the new record."""
        lines = b"0\tbooks\tdune\t{\"v\":\"a long first value\"}\n0\tbooks\tdune\t{\"v\":2}\n"
        root, answers = self.run_serve(lines)
        with open(os.path.join(root, "books", "dune"), "rb") as f:
            self.assertEqual(f.read(), b'{"v":2}')

    def test_incomplete_last_line_not_written(self):
        """A line cut by the end of input (the node died mid-send) is not written."""
        root, answers = self.run_serve(b"0\tbooks\tdune\t{\"v\":1}\n0\tbooks\tcut\t{\"v\"")
        self.assertEqual(answers, b"1\n")
        self.assertEqual(os.listdir(os.path.join(root, "books")), ["dune"])

    def test_stops_once_the_node_is_gone(self):
        """
        When its parent changes (the node died), the child writes nothing
        more: the next node replays the log, and an old write must not
        come after that.
        """
        root, answers = self.run_serve(b"0\tbooks\tdune\t{\"v\":1}\n", parent=-1)
        self.assertEqual(answers, b"")
        self.assertEqual(os.listdir(os.path.join(root, "books")), [])


class ArgvTests(SynchronousTestCase):
    def test_child_runs_this_interpreter(self):
        """The child runs under the node's own interpreter (CPython or PyPy)."""
        self.assertEqual(FileWriter.argv[0], sys.executable)
