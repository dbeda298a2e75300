"""
How a node talks to other nodes: treq over one shared, persistent
HTTPConnectionPool, every call with a timeout.

The inter-node routes (served by L{minstore.cluster.routes}):

* ``POST /_cluster/replicas[?bridge=1]``: a body of records or tombstones,
  one canonical JSON object per line (NDJSON), stored as sent when newer;
  answers ``{"applied": n, "received": n}``.
* ``GET /_cluster/lookup/{collection}/{uid}?visited=id,id&asked=url,url&newer_than=VERSION``:
  the live record held by that node or, failing that, by any node it can
  reach that is not in ``visited`` (node ids) nor ``asked`` (peer URLs that
  another node of the walk asks); 404 when none has it.  With
  ``newer_than`` (the version the asking node holds, a tombstone's
  included), only a copy with a higher version counts.
* ``DELETE /_cluster/lookup/{collection}/{uid}?visited=id,id&newer_than=VERSION``:
  the same walk, deleting on the node that holds the record (only a copy
  newer than ``newer_than``: an older one is left for the tombstone's replica).
* ``POST /_cluster/sync/ranges``: a round of sync's reconciliation, records
  both ways included (L{minstore.cluster.sync}).
"""

import json
from urllib.parse import quote

import treq
from hyperlink import EncodedURL
from twisted.logger import Logger
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory

from minstore.errors import error_from_peer

NDJSON = b"application/x-ndjson"


class PeerError(Exception):
    """A peer answered with something other than success."""

    def __init__(self, peer, code, body=b""):
        Exception.__init__(self, "%s answered %s: %s" % (peer, code, body[:200].decode("utf-8", "replace")))
        self.peer = peer
        self.code = code
        self.body = body


def record_path(collection, uid):
    return "%s/%s" % (quote(collection, safe=""), quote(uid, safe=""))


class _QuietClientFactory(_HTTP11ClientFactory):
    # One "Starting factory" log line per connection to a peer says nothing.
    noisy = False


def make_http_client(reactor, tls=None):
    """
    A treq client sharing one persistent connection pool; and the pool.
    ``tls``: the IPolicyForHTTPS of ``https://`` peers (L{minstore.tls}).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = 8
    pool.cachedConnectionTimeout = 120
    if tls is not None:
        agent = Agent(reactor, contextFactory=tls, pool=pool)
    else:
        agent = Agent(reactor, pool=pool)
    return treq.client.HTTPClient(agent), pool


class PeerClient:
    log = Logger()

    def __init__(self, http, node_id, timeout=5.0, signer=None, clock=None):
        """
        @param http: a treq HTTPClient (or a StubTreq in tests).
        @param node_id: this node's id, sent so peers can log and avoid loops.
        @param signer: a L{minstore.auth.ClusterKey} signing every request, or None.
        @param clock: an IReactorTime, for when a peer last refused this node.
        """
        self.http = http
        self.node_id = node_id
        self.timeout = timeout
        self.signer = signer
        self.clock = clock
        self._refusals = {}  # peer base URL -> [count, last message, when]

    async def _call(self, method, url, timeout=None, expect=(200,), **kwargs):
        headers = kwargs.pop("headers", {})
        headers.setdefault(b"x-minstore-node", [self.node_id.encode()])
        if self.signer is not None:
            # Sign the request line exactly as treq and the Agent will send it.
            url = EncodedURL.from_text(url).to_uri().to_text()
            data = kwargs.get("data")
            headers.update(
                self.signer.sign(
                    method.encode("ascii").upper(),
                    URI.fromBytes(url.encode("ascii")).originForm,
                    data if isinstance(data, bytes) else b"",
                )
            )
        response = await self.http.request(
            method, url, headers=headers, timeout=timeout or self.timeout, **kwargs
        )
        body = await response.content()
        if response.code in (401, 403):
            self._refused(url, response.code, body)
        if response.code not in expect:
            raise PeerError(url, response.code, body)
        return response, body

    def _refused(self, url, code, body):
        parsed = URI.fromBytes(url.encode("ascii"))
        peer = "%s://%s" % (parsed.scheme.decode(), parsed.netloc.decode())
        try:
            document = json.loads(body)
            text = "%s %s: %s" % (code, document["error"], document.get("message", ""))
        except (ValueError, KeyError, TypeError):
            text = "%s: %s" % (code, body[:200].decode("utf-8", "replace"))
        state = self._refusals.setdefault(peer, [0, None, None])
        state[0] += 1
        state[1] = text
        state[2] = self.clock.seconds() if self.clock is not None else None

    def refusals(self):
        """The peers that answered this node's requests 401 or 403: how often, last why, when."""
        return {
            peer: {"refused": n, "last_refusal": text, "at": at}
            for peer, (n, text, at) in self._refusals.items()
        }

    async def send_replicas(self, peer, records, bridge=False, timeout=None):
        """
        POST records (bytes each, canonical JSON) to a peer; the number it
        applied.  Fails with PeerError or a connection error.
        """
        url = peer + "/_cluster/replicas" + ("?bridge=1" if bridge else "")
        _, body = await self._call(
            "POST",
            url,
            timeout=timeout,
            data=b"\n".join(records) + b"\n",
            headers={b"content-type": [NDJSON]},
        )
        return json.loads(body).get("applied", 0)

    async def lookup(
        self, peer, collection, uid, visited, method="GET", if_match=None, timeout=None, asked=(), newer_than=None
    ):
        """
        The record bytes a peer (or a node it reaches) holds, or None when
        none of them has it.  ``visited`` is the list of node ids already
        asked; ``asked`` the peer URLs that other nodes of the walk ask;
        ``newer_than`` the version the walk already holds (only a copy with
        a higher version counts), or None.
        """
        url = "%s/_cluster/lookup/%s?visited=%s" % (
            peer,
            record_path(collection, uid),
            quote(",".join(visited), safe=","),
        )
        if asked:
            url += "&asked=" + quote(",".join(asked), safe=",:/[]")
        if newer_than is not None:
            url += "&newer_than=" + quote(newer_than, safe="")
        try:
            headers = {b"if-match": [if_match.encode("latin-1")]} if if_match else {}
            _, body = await self._call(method, url, timeout=timeout, headers=headers)
        except PeerError as e:
            if e.code == 404:
                return None
            if e.code in (400, 412):
                raise error_from_peer(e.code, e.body)
            raise
        return body

    async def sync_ranges(self, peer, body, timeout=None):
        """POST a round of sync (a binary message) to a peer; its answer's bytes."""
        _, answer = await self._call(
            "POST", peer + "/_cluster/sync/ranges", timeout=timeout, data=body,
            headers={b"content-type": [b"application/octet-stream"]}
        )
        return answer
