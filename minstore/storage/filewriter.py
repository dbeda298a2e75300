"""
The ``files`` engine's record files, written by a child process.

Once a batch is in the engine's log and the log is synced, the batch is
durable; its record files may come later.  Written by the node, each file
costs three system calls (open, write, close), and each call lets go of the
GIL and then waits to take it back from the reactor thread: under load that
wait, not the disk, was most of a POST's time in storage (measured in
bench/RESULTS.md).  So the engine hands the batch's log lines to a child
process on a pipe and returns; until the child says a file is written,
reads of that uid are answered from memory (L{FileWriter.pending}).

The child runs L{main} (``FileWriter.argv``).  It reads log
lines on stdin, writes each record's file in place under ``ROOT`` (nobody
reads a file the node has not been told is written, and after a crash the
log's replay rewrites it), and answers, after each read, how many lines it
has written since the last answer.  It ends at the end of its stdin, so it
goes with the node, and stops writing as soon as the node is gone (its
parent changes): after a ``kill -9`` the next node replays the log, and a
late write of the old child must not undo that.

If the child cannot be started or dies, the engine writes the files itself,
as it did before the child existed, and the log says so once.
"""

import collections
import os
import select
import subprocess
import sys

from twisted.logger import Logger

from minstore._util import ignore_stop_signals

log = Logger("minstore.storage.files")


class FileWriter:
    """
    The node's side of the child.  Called from the storage thread, under the
    engine's write lock (except L{get}, which any thread may call).
    """

    # -c, not -m: running a module of an imported package makes runpy warn.
    argv = (sys.executable, "-c", "import sys; from minstore.storage.filewriter import main; main(sys.argv[1:])")

    def __init__(self, root, write_here):
        self.root = root
        #: ``write_here(collection, uid, data)`` writes a record file in this
        #: process: what the engine falls back to without a child.
        self._write_here = write_here
        #: (collection, uid) -> (seq, data) of files the child has not written yet.
        self.pending = {}
        self._order = collections.deque()  # (seq, key), oldest first
        self._sent = 0
        self._done = 0
        self._answers = b""
        self._proc = None

    @property
    def running(self):
        return self._proc is not None

    def start(self):
        try:
            self._proc = subprocess.Popen(
                list(self.argv) + [self.root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as e:
            log.error("cannot start the file writer ({error}): the node writes record files itself", error=e)
            return
        os.set_blocking(self._proc.stdout.fileno(), False)
        log.info("file writer started (pid {pid})", pid=self._proc.pid)

    def get(self, collection, uid):
        """The data of a record whose file is not written yet, else None."""
        hit = self.pending.get((collection, uid))
        return None if hit is None else hit[1]

    def send(self, chunk, items):
        """
        Have the files of ``items`` (the engine's batch of ``(collection,
        uid, data, deleted)``, in the order of ``chunk``'s log lines)
        written; False when there is no child to write them (the caller
        writes them).
        """
        if self._proc is None:
            return False
        for collection, uid, data, _ in items:
            self._sent += 1
            key = (collection, uid)
            self.pending[key] = (self._sent, data)
            self._order.append((self._sent, key))
        try:
            # Blocks while the pipe is full: the child's pace is the limit
            # on what waits in memory.
            self._proc.stdin.write(chunk)
            self._proc.stdin.flush()
        except OSError as e:
            self._give_up("the file writer is gone (%s)" % (e,))
            return True
        self._read_answers(wait=False)
        return True

    def flush(self, timeout=30.0):
        """Return once every file sent is written (by the child, or here)."""
        while self._proc is not None and self._done < self._sent:
            self._read_answers(wait=True, timeout=timeout)

    def close(self):
        """Write what is pending, then end the child."""
        self.flush()
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _read_answers(self, wait, timeout=30.0):
        fd = self._proc.stdout.fileno()
        if wait and not select.select([fd], [], [], timeout)[0]:
            self._give_up("the file writer did not answer in %d s" % timeout)
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._give_up("cannot read the file writer (%s)" % (e,))
            return
        if not data:
            self._give_up("the file writer ended (exit status %s)" % (self._proc.poll(),))
            return
        self._answers += data
        *answers, self._answers = self._answers.split(b"\n")
        self._done += sum(int(n) for n in answers)
        while self._order and self._order[0][0] <= self._done:
            seq, key = self._order.popleft()
            entry = self.pending.get(key)
            if entry is not None and entry[0] == seq:
                del self.pending[key]

    def _give_up(self, reason):
        """No more child: write what it had not written here, and all that follows."""
        log.error("{reason}: the node writes record files itself from now on", reason=reason)
        proc, self._proc = self._proc, None
        try:
            proc.kill()
            proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for seq, key in self._order:
            entry = self.pending.get(key)
            if entry is not None and entry[0] == seq:
                self._write_here(key[0], key[1], entry[1])
                del self.pending[key]
        self._order.clear()
        self._done = self._sent


def write_file(path, data):
    """
    Make ``data`` the whole content of ``path``, written in place (no sync:
    see the engine's checkpoints).  Not with O_TRUNC: on ext4, a file
    truncated to nothing and written again is flushed at its close
    (``auto_da_alloc``), which made overwriting a record file ten times
    dearer (272 against 23 µs here); the file is cut to the data's length
    after the write instead.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def serve(root, stdin=0, stdout=1, parent=None):
    """The child's loop: log lines in, the count of files written out."""
    parent = os.getppid() if parent is None else parent
    buffer = b""
    while True:
        data = os.read(stdin, 1 << 20)
        if not data:
            return
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if os.getppid() != parent:
                return  # the node is gone: its successor replays the log
            _, collection, filename, record = line.split(b"\t", 3)
            write_file(os.path.join(root, os.fsdecode(collection), os.fsdecode(filename)), record)
        if lines:
            try:
                os.write(stdout, b"%d\n" % len(lines))
            except BrokenPipeError:
                return  # the node no longer listens: it is gone or has given up on us


def main(argv):
    """The child's entry point: ``argv`` is ``[ROOT]``."""
    ignore_stop_signals()
    serve(argv[0])
