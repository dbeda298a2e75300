"""
Requests generated from ``GET /openapi.json`` (schemathesis) sent to a node
in memory, through twisted.web's HTTP parsing and the node's own channel:
the property is that no request gets a 5xx, and that every answer's status
code and content type are declared in the document.

The node under test is a front (cache=1) to one dependant that answers and
one that refuses connections, all on a L{FakeNetwork} and a L{Clock}: no
socket, no thread, no sleep.  L{run} is used by ``tests.test_fuzz`` (a
bounded number of examples) and by ``bench/fuzz.py`` (a time budget).
"""

import http.client
import io
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from minstore.api import RecordAPI
from minstore.cache import CacheFront
from minstore.cluster.peers import PeerClient
from minstore.node import Node
from minstore.service import QuietSite
from minstore.storage.memory import MemoryStorage
from minstore.testing.fakes import FakeNetwork

DEPENDANT = "http://127.0.0.1:9101"
DOWN = "http://127.0.0.1:9102"
MAX_RECORD_SIZE = 64 * 1024


class InMemoryNode:
    """A node (and its front's dependants) answering raw HTTP bytes."""

    def __init__(self):
        self.clock = Clock()
        self.net = FakeNetwork()
        dependant = Node(MemoryStorage(), node_id="dependant")
        dependant.open()
        self.net.add(DEPENDANT, RecordAPI(dependant).resource())
        self.net.down(DOWN)
        node = Node(MemoryStorage(), node_id="fuzzed")
        node.open()
        front = CacheFront(PeerClient(self.net, "fuzzed"), lambda: [DEPENDANT, DOWN], self.clock, timeout=1.0)
        front.attach(node)
        self.site = QuietSite(
            RecordAPI(node, front=front, max_record_size=MAX_RECORD_SIZE).resource(), reactor=self.clock
        )
        self.site.max_body = MAX_RECORD_SIZE

    def send(self, raw):
        """The ``http.client.HTTPResponse`` (body read) to one raw request."""
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        for _ in range(50):
            if transport.disconnecting:
                break
            self.net.flush()
            self.clock.advance(0.5)
        channel.connectionLost(None)
        return _parse(transport.value())

    def wsgi(self, environ, start_response):
        """A WSGI app sending each request to the node as raw HTTP."""
        raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]
        length = environ.get("CONTENT_LENGTH")
        body = environ["wsgi.input"].read(int(length)) if length else b""
        lines = ["%s %s HTTP/1.1" % (environ["REQUEST_METHOD"], raw_uri), "Host: node.test"]
        for key, value in environ.items():
            if key.startswith("HTTP_") and key not in ("HTTP_HOST", "HTTP_CONNECTION", "HTTP_CONTENT_LENGTH"):
                lines.append("%s: %s" % (key[5:].replace("_", "-").title(), value))
        if environ.get("CONTENT_TYPE"):
            lines.append("Content-Type: %s" % environ["CONTENT_TYPE"])
        lines += ["Content-Length: %d" % len(body), "Connection: close"]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        response = self.send(raw)
        start_response(
            "%d %s" % (response.status, response.reason or "-"),
            [(k, v) for k, v in response.getheaders() if k.lower() != "transfer-encoding"],
        )
        return [response.data]


class _Bytes:
    def __init__(self, data):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def _parse(data):
    if not data:
        raise AssertionError("the node closed the connection with no answer")
    response = http.client.HTTPResponse(_Bytes(data))
    response.begin()
    response.data = response.read()
    return response


def run(max_examples=None, seconds=None, seed=0, report=print, url=None):
    """
    Generate requests for every operation of the node's document; the
    failures found, as ``[(operation, text)]``.  ``max_examples`` bounds
    each operation's examples; ``seconds`` the whole run (then examples
    go on until the budget is spent, operation by operation, in rounds).
    With ``url``, the requests go over HTTP to the node there instead.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    if url is None:
        schema = schemathesis.openapi.from_wsgi("/openapi.json", InMemoryNode().wsgi)
    else:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        schema.config.update(base_url=url)
    operations = [result.ok() for result in schema.get_all_operations()]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    failures = []
    deadline = None if seconds is None else time.monotonic() + seconds
    per_round = max_examples or 50
    round_ = 0
    sent = [0]
    from schemathesis.generation import GenerationMode

    while True:
        for operation, mode in [(o, m) for o in operations for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]:
            if deadline is not None and time.monotonic() > deadline:
                return failures, sent[0]

            @hypothesis_seed(seed + round_)
            @settings(
                max_examples=per_round,
                deadline=None,
                database=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
            )
            @given(operation.as_strategy(generation_mode=mode))
            def check(case):
                sent[0] += 1
                response = case.call() if url is None else case.call(base_url=url, timeout=10)
                case.validate_response(response, checks=checks)

            try:
                check()
            except Unsatisfiable:
                pass  # nothing to make invalid (an operation without parameters)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # a finding (a FailureGroup): keep it and go on
                failures.append(("%s (%s)" % (operation.label, mode.value), "%s: %s" % (type(e).__name__, e)))
                report("FAIL %s (%s): %s" % (operation.label, mode.value, str(e)[:3000]))
        round_ += 1
        if deadline is None:
            return failures, sent[0]
