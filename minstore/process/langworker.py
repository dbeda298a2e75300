"""
Language detection in a child process.

py3langid's scoring is pure Python and numpy under the GIL: in the node's
thread pool it still holds the one core the reactor needs, about 0.1 ms of
every POST.  A child process does it on another core.  The node sends a
batch of texts as one line (a JSON array) on the child's stdin; the child
answers one line, the JSON array of their codes (or null), in order.  The
child ends when its stdin closes, so it goes with the node, even after a
``kill -9``.

L{LanguageWorker} runs L{main} in the child (``LanguageWorker.argv``);
``python -m minstore.process.langworker`` does the same by hand.
"""

import json
import os
import sys

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from minstore._util import ignore_stop_signals
from minstore.batch import Batcher


class WorkerGone(Exception):
    """The child ended (or never started) before answering."""


class LanguageWorker(ProcessProtocol):
    """
    The node's side of the child: ``detect(text)`` is a Deferred of its
    code.  Texts asked while a batch is with the child go together in the
    next one.  A child that dies fails what it had not answered
    (L{WorkerGone}) and is started again at the next text.
    """

    log = Logger()
    # -c, not -m: running a module of an imported package makes runpy warn.
    argv = (sys.executable, "-c", "from minstore.process.langworker import main; main()")

    def __init__(self, reactor=None, max_inflight=2):
        self._reactor = reactor
        self._batcher = Batcher(self._send, max_inflight)
        self._waiting = []  # Deferreds of the batches sent, oldest first
        self._buffer = b""
        self._ended = []
        self._direct = True
        self.running = False
        self.stopping = False
        self.pid = None

    def start(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        self.stopping = False
        try:
            self._spawn()
        except WorkerGone as e:
            # The node still starts: each write then tries a new child, and
            # falls back to detection in the node (LanguageDetection).
            self.log.error("{error}", error=e)

    def _spawn(self):
        self._buffer = b""
        try:
            transport = self._reactor.spawnProcess(
                self, self.argv[0], list(self.argv), env=dict(os.environ), childFDs={0: "w", 1: "r", 2: 2}
            )
        except Exception as e:
            raise WorkerGone("cannot start the language worker %s: %s" % (" ".join(self.argv), e))
        self.running = True
        self._direct = True
        self.pid = getattr(transport, "pid", None)
        self.log.info("language worker started (pid {pid})", pid=self.pid)

    def detect(self, text):
        return self._batcher.submit(text)

    def _send(self, texts):
        if not self.running:
            if self.stopping:
                raise WorkerGone("the node is stopping")
            self._spawn()
        d = Deferred()
        self._waiting.append(d)
        self._write(json.dumps(texts).encode("utf-8") + b"\n")

        def checked(codes):
            if not isinstance(codes, list) or len(codes) != len(texts):
                raise WorkerGone("the worker could not classify a batch (its stderr says why)")
            return codes

        return d.addCallback(checked)

    def _write(self, line):
        """
        Write to the child's stdin now.  The transport's write() would only
        buffer it until the reactor's next turn, which under load is
        milliseconds later on every batch.  Once a write cannot go whole
        (the child is far behind), the rest and everything after go through
        the transport, in order.
        """
        if self._direct:
            pipe = getattr(self.transport, "pipes", {}).get(0)
            if pipe is not None:
                try:
                    line = line[os.write(pipe.fileno(), line):]
                except OSError:
                    pass  # full (or the child is gone: the transport will say so)
                if not line:
                    return
            self._direct = False
        self.transport.write(line)

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if not self._waiting:
                self.log.error("language worker answered what was not asked: {line!r}", line=line[:100])
                continue
            d = self._waiting.pop(0)
            try:
                codes = json.loads(line)
            except ValueError:
                d.errback(WorkerGone("unreadable answer %r" % (line[:100],)))
            else:
                d.callback(codes)

    def processEnded(self, reason):
        self.running = False
        waiting, self._waiting = self._waiting, []
        if not (self.stopping and reason.check(ProcessDone)):
            self.log.error(
                "language worker ended ({reason}); {n} batches fail over to this process",
                reason=reason.getErrorMessage(),
                n=len(waiting),
            )
        for d in waiting:
            d.errback(WorkerGone(reason.getErrorMessage()))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(None)

    def stop(self):
        """Close the child's stdin; a Deferred firing once it has ended."""
        self.stopping = True
        if not self.running:
            return succeed(None)
        d = Deferred()
        self._ended.append(d)
        self.transport.closeStdin()
        kill = self._reactor.callLater(5, self._kill)

        def ended(result):
            if kill.active():
                kill.cancel()
            return result

        return d.addBoth(ended)

    def _kill(self):
        if self.running:
            self.log.warn("language worker did not end in 5 s: killing it")
            self.transport.signalProcess("KILL")


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
