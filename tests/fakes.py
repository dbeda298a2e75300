"""
Fakes for unit tests that talk HTTP to several nodes without sockets.

L{FakeNetwork} is a treq-like client (what a L{minstore.cluster.peers.PeerClient}
takes) that sends each request to the in-memory resource registered for the
URL's ``scheme://host:port``, through a L{treq.testing.StubTreq} each, so
real requests and responses go through twisted.web.  A host can be made
down (connection refused) or hanging (no answer until cancelled)::

    net = FakeNetwork()
    a = net.add("http://127.0.0.1:9001", RecordAPI(Node(MemoryStorage())).resource())
    net.down("http://127.0.0.1:9001")
    client = PeerClient(net, "front")
"""

from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError


def _base(url):
    parts = urlsplit(url)
    return "%s://%s" % (parts.scheme, parts.netloc)


class FakeNetwork:
    def __init__(self):
        self.stubs = {}
        self._down = set()
        self._hanging = set()
        #: Every request sent, as ``(method, url)``, in order.
        self.requests = []

    def add(self, url, resource):
        """Serve ``url`` (``scheme://host:port``) with a resource; its StubTreq."""
        stub = self.stubs[_base(url)] = StubTreq(resource)
        return stub

    def down(self, url):
        """Refuse connections to ``url`` from now on."""
        self._hanging.discard(_base(url))
        self._down.add(_base(url))

    def hang(self, url):
        """Never answer ``url`` (the request waits until cancelled)."""
        self._down.discard(_base(url))
        self._hanging.add(_base(url))

    def up(self, url):
        self._down.discard(_base(url))
        self._hanging.discard(_base(url))

    def requests_to(self, url, method=None):
        """The URLs requested of one host (with one method, when given)."""
        base = _base(url)
        return [u for m, u in self.requests if _base(u) == base and method in (None, m)]

    def request(self, method, url, **kwargs):
        # Deadlines are the caller's business (addTimeout on its clock):
        # treq's own timeout would schedule on the global reactor.
        kwargs.pop("timeout", None)
        kwargs.pop("reactor", None)
        method = method.decode("ascii") if isinstance(method, bytes) else method
        self.requests.append((method, url))
        base = _base(url)
        if base in self._hanging:
            return Deferred()
        if base in self._down or base not in self.stubs:
            return fail(ConnectionRefusedError("%s is down" % (base,)))
        stub = self.stubs[base]
        d = stub.request(method, url, **kwargs)
        stub.flush()
        return d

    def get(self, url, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url, **kwargs):
        return self.request("POST", url, **kwargs)

    def put(self, url, **kwargs):
        return self.request("PUT", url, **kwargs)

    def delete(self, url, **kwargs):
        return self.request("DELETE", url, **kwargs)

    def flush(self):
        for stub in self.stubs.values():
            stub.flush()
