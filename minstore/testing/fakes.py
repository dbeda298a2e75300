"""
Fakes for unit tests that talk HTTP to several nodes without sockets,
shipped with the package (like the storage suite in L{minstore.testing}) so
that the author of a process or an engine tests it against real nodes in
memory, as minstore's own tests do::

    from minstore.testing.fakes import Cluster, FakeNetwork

L{FakeNetwork} is a treq-like client (what a L{minstore.cluster.peers.PeerClient}
takes) that sends each request to the in-memory resource registered for the
URL's ``scheme://host:port``, through a L{treq.testing.StubTreq} each, so
real requests and responses go through twisted.web.  A host can be made
down (connection refused) or hanging (no answer until cancelled)::

    net = FakeNetwork()
    a = net.add("http://127.0.0.1:9001", RecordAPI(Node(MemoryStorage())).resource())
    net.down("http://127.0.0.1:9001")
    client = PeerClient(net, "front")

L{Cluster} builds real nodes on one FakeNetwork and one Clock: each a
L{Node} (over MemoryStorage, or SQLiteStorage in a directory, which a
restart reopens) behind its real RecordAPI, with its Replication and
Lookups (the fixture of minstore's replication, lookup and cache tests).
"""

import json
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock

from minstore.api import RecordAPI
from minstore.cluster.lookup import Lookups
from minstore.cluster.peers import PeerClient
from minstore.cluster.replication import Replication
from minstore.cluster.servers import ServerList
from minstore.node import Node, run_inline
from minstore.records import encode_record, make_record, make_tombstone
from minstore.storage.memory import MemoryStorage
from minstore.storage.sqlite import SQLiteStorage


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


# -- a cluster of real nodes on one FakeNetwork and one Clock ----------------
#
# Each node is a real Node (over MemoryStorage, or SQLiteStorage in a
# directory, which a restart reopens) behind its real RecordAPI, with its
# Replication and Lookups, reached by the others through a FakeNetwork.

T0 = 1_700_000_000.0
JSON = {b"content-type": [b"application/json"]}


def url(name):
    return "http://%s:8001" % (name,)


def version(ms, node="z", logical=0):
    """A version string ``ms`` milliseconds after T0."""
    return "%013d-%06d-%s" % (int(T0 * 1000) + ms, logical, node)


def replica(uid, ms, value="v", collection="c", node="z"):
    """The bytes of a record made elsewhere, with a chosen version."""
    return encode_record(make_record(collection, uid, value, version(ms, node), T0 + ms / 1000.0))


def tombstone(uid, ms, collection="c", node="z"):
    return encode_record(make_tombstone(collection, uid, version(ms, node), T0 + ms / 1000.0))


class Cluster:
    """Nodes named by a short string, on one FakeNetwork and one Clock."""

    def __init__(self, test):
        self.test = test
        self.clock = Clock()
        self.clock.advance(T0)
        self.net = FakeNetwork()
        self.members = {}

    def add(self, name, peers=(), bridge=False, directory=None, storage=None, processes=(), **kwargs):
        """
        A node named ``name`` listing ``peers``; over SQLiteStorage in
        ``directory`` when given (a node added again on the same directory,
        after the first was closed, is that node restarted), else over
        ``storage`` or a new MemoryStorage.
        """
        member = Member(self, name, peers, bridge, directory, storage, processes, **kwargs)
        self.members[name] = member
        return member

    def replica_posts(self, name):
        """URLs of the replica batches sent to a node (failed ones included)."""
        return [u for u in self.net.requests_to(url(name), "POST") if "/_cluster/replicas" in u]

    def all_replica_posts(self):
        return [u for m, u in self.net.requests if m == "POST" and "/_cluster/replicas" in u]

    def advance(self, seconds):
        self.clock.advance(seconds)
        self.net.flush()


class Member:
    def __init__(self, cluster, name, peers, bridge, directory, storage, processes, in_thread=run_inline, **kwargs):
        test = cluster.test
        self.cluster = cluster
        self.name = name
        self.url = url(name)
        self.directory = directory
        if storage is None:
            storage = SQLiteStorage(directory) if directory else MemoryStorage()
        self.storage = storage
        self.node = Node(storage, processes, node_id=name, now=cluster.clock.seconds, in_thread=in_thread)
        self.node.open()
        self.closed = False
        self.client = PeerClient(cluster.net, name)
        options = dict(timeout=5.0, retry_base=1.0, retry_cap=8.0, rng=lambda: 1.0)
        options.update(kwargs)
        self.replication = Replication(self.node, self.client, cluster.clock, in_thread, **options)
        self.servers = ServerList([url(p) for p in peers], bridge)
        self.lookups = Lookups(self.node, lambda: self.servers.peers, self.client, cluster.clock)
        self.node.remote = self.lookups
        self.api = RecordAPI(self.node, lookups=self.lookups, replication=self.replication, sync_timeout=5.0)
        self.http = cluster.net.add(self.url, self.api.resource())
        #: Every replica this node was sent, with whether it was applied.
        self.received = []
        apply_replica = self.node.apply_replica

        def recording(data, forward=False):
            d = apply_replica(data, forward=forward)
            d.addCallback(lambda applied: self.received.append((data, forward, applied)) or applied)
            return d

        self.node.apply_replica = recording
        self.replication.start(self.servers)
        test.addCleanup(self.close)

    def close(self, save=True):
        """
        Stop replication (with its final save of the checkpoints when
        ``save``; without it, as after kill -9) and close the storage.
        """
        if self.closed:
            return
        self.closed = True
        replication = self.replication
        if save:
            # The final save runs in the node's in_thread: at once with
            # run_inline, on the next turn with a "thread pool" that hands
            # results back later (and never with one the test holds).
            replication.stop()
            self.cluster.advance(0)
        else:
            replication._stopped = True
            replication._cancel_save()
            for peer in replication.peers.values():
                peer.stop()
        self.storage.close()

    def stored(self, uid, collection="c"):
        return self.storage.get(collection, uid)

    def write(self, uid, value, collection="c"):
        """Create or update through the node; the stored bytes."""
        test = self.cluster.test
        current = self.stored(uid, collection)
        if current is None or json.loads(current).get("deleted"):
            d = self.node.create(collection, uid, value)
        else:
            d = self.node.update(collection, uid, value)
        return test.successResultOf(d).data

    def delete(self, uid, collection="c"):
        return self.cluster.test.successResultOf(self.node.delete(collection, uid)).data

    def request(self, method, path, body=None, headers=None):
        """A request through this node's RecordAPI: (response, body bytes)."""
        test = self.cluster.test
        kwargs = {}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = JSON
        if headers:
            kwargs.setdefault("headers", {}).update(headers)
        d = self.http.request(method, self.url + path, **kwargs)
        self.http.flush()
        response = test.successResultOf(d)
        return response, test.successResultOf(response.content())

    def received_uids(self):
        return [json.loads(data)["uid"] for data, _, _ in self.received]
