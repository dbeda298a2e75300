"""
Language detection in a child process.

py3langid's scoring is pure Python and numpy under the GIL: in the node's
thread pool it still holds the one core the reactor needs, about 0.1 ms of
every POST.  A child process does it on another core.  The node sends a
batch of texts as one line (a JSON array) on the child's stdin; the child
answers one line, the JSON array of their codes (or null), in order.  The
child ends when its stdin closes, so it goes with the node, even after a
``kill -9``.

The node's side, L{LanguageWorker}, is called from the writer thread, in
the same thread hop as the storage write of the batch (see
L{minstore.node}): it writes the batch and waits for the answer there, so
the answer needs no turn of the reactor before the write goes on.  It runs
L{main} in the child (``LanguageWorker.argv``); ``python -m
minstore.process.langworker`` does the same by hand.
"""

import json
import os
import select
import subprocess
import sys
import threading

from twisted.logger import Logger

from minstore._util import ignore_stop_signals


class WorkerGone(Exception):
    """The child ended (or never started, or stopped answering) before answering."""


class LanguageWorker:
    """
    The node's side of the child: ``detect(texts)`` returns their codes,
    blocking; any thread may call it (one batch at a time goes to the
    child).  A child that dies, answers nonsense or nothing within
    ``timeout`` seconds is killed and L{WorkerGone} raised; the next batch
    starts a new one.
    """

    log = Logger()
    # -c, not -m: running a module of an imported package makes runpy warn.
    argv = (sys.executable, "-c", "from minstore.process.langworker import main; main()")

    def __init__(self, timeout=30.0):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc = None
        self._buffer = b""
        self.stopping = False

    @property
    def running(self):
        return self._proc is not None

    @property
    def pid(self):
        return self._proc.pid if self._proc is not None else None

    def start(self):
        """Start the child now (a node that cannot is still up: see L{detect})."""
        self.stopping = False
        with self._lock:
            try:
                self._spawn()
            except WorkerGone as e:
                # Each batch then tries a new child, and LanguageDetection
                # falls back to detection in the node.
                self.log.error("{error}", error=e)

    def _spawn(self):
        self._buffer = b""
        try:
            self._proc = subprocess.Popen(
                list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as e:
            raise WorkerGone("cannot start the language worker %s: %s" % (" ".join(self.argv), e))
        self.log.info("language worker started (pid {pid})", pid=self._proc.pid)

    def detect(self, texts):
        """The codes (or None) of ``texts``, in order."""
        with self._lock:
            if self._proc is None:
                if self.stopping:
                    raise WorkerGone("the node is stopping")
                self._spawn()
            try:
                self._proc.stdin.write(json.dumps(texts).encode("utf-8") + b"\n")
                self._proc.stdin.flush()
                codes = json.loads(self._read_line())
            except (OSError, ValueError, WorkerGone) as e:
                self._lost("%s: %s" % (type(e).__name__, e))
            if not isinstance(codes, list) or len(codes) != len(texts):
                # The child answers null for a batch it could not classify
                # (its stderr says why); it is still up.
                raise WorkerGone("the worker could not classify a batch (its stderr says why)")
            return codes

    def _read_line(self):
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            if not select.select([fd], [], [], self.timeout)[0]:
                raise WorkerGone("no answer in %g s" % self.timeout)
            data = os.read(fd, 65536)
            if not data:
                raise WorkerGone("the worker ended (exit status %s)" % (self._proc.poll(),))
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _lost(self, reason):
        """The child is unusable: end it, say so, fail the batch."""
        proc, self._proc = self._proc, None
        _end(proc, grace=0)
        self.log.error("language worker lost ({reason}); the next batch starts a new one", reason=reason)
        raise WorkerGone(reason)

    def stop(self, grace=5.0):
        """Close the child's stdin and wait (up to ``grace`` seconds) for it to end."""
        self.stopping = True
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            if not _end(proc, grace):
                self.log.warn("language worker did not end in {grace} s: killed it", grace=grace)


def _end(proc, grace):
    """End a child: EOF on its stdin, then SIGKILL after ``grace`` seconds; whether it ended by itself."""
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass
    try:
        proc.wait(grace)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def serve(stdin, stdout, stderr=None):
    """The child's loop: a line of texts in, a line of codes out."""
    from minstore.process.lang import detect_language

    for line in stdin:
        try:
            texts = json.loads(line)
            codes = [detect_language(text) if isinstance(text, str) else None for text in texts]
        except Exception as e:  # answer anyway: the node waits for a line per line
            (stderr or sys.stderr).write("minstore language worker: %r\n" % (e,))
            codes = None
        stdout.write(json.dumps(codes).encode("utf-8") + b"\n")
        stdout.flush()


def main():
    """The child's entry point."""
    ignore_stop_signals()
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
