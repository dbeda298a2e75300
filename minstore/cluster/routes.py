"""
The inter-node routes under ``/_cluster/`` (see L{minstore.cluster.peers}).

L{minstore.api.parse_path} parses their paths and L{minstore.api} answers
their errors, like every other route's.
"""

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import Logger

from minstore._util import JSON_TYPE
from minstore._util import json_response as _json
from minstore.errors import BadRequest, PayloadTooLarge

#: The content type of sync's messages (L{minstore.cluster.sync}).
SYNC_TYPE = b"application/octet-stream"


class ClusterAPI:
    log = Logger()

    def __init__(self, node, lookups=None, sync=None):
        self.node = node
        self.lookups = lookups
        #: The node's L{minstore.cluster.sync.Sync}, answering peers' syncs.
        self.sync = sync

    def replicas(self, request, collection=None, uid=None):
        """``POST /_cluster/replicas``."""
        forward = request.args.get(b"bridge", [b""])[-1] == b"1"
        lines = [line.strip() for line in request.content.read().split(b"\n") if line.strip()]
        applied = self.node.apply_replicas(lines, forward=forward)

        def answer(results):
            return _json(request, 200, {"received": len(lines), "applied": sum(results)})

        def first_error(failure):
            failure.trap(Exception)
            return failure.value.subFailure

        d = gatherResults(applied, consumeErrors=True).addCallback(answer)
        return d.addErrback(first_error)

    def sync_ranges(self, request, collection=None, uid=None):
        """``POST /_cluster/sync/ranges``."""
        return self._sync_answer(request, lambda body: self.sync.answer_ranges(body), SYNC_TYPE)

    def _sync_answer(self, request, answer, content_type):
        if self.sync is None:
            raise BadRequest("no_sync", "this node does not take syncs")
        if getattr(request, "body_too_large", False):
            raise PayloadTooLarge(message="a sync message over this node's --max-record-size")

        def send(body):
            request.responseHeaders.setRawHeaders(b"content-type", [content_type])
            return body

        return answer(request.content.read()).addCallback(send)

    def lookup(self, request, collection, uid):
        """``GET`` or ``DELETE /_cluster/lookup/{collection}/{uid}``."""
        if self.lookups is None:
            raise BadRequest("no_lookups", "this node does not take lookups")
        visited = request.args.get(b"visited", [b""])[-1].decode("utf-8", "replace")
        visited = [v for v in visited.split(",") if v]
        asked = request.args.get(b"asked", [b""])[-1].decode("utf-8", "replace")
        asked = [a for a in asked.split(",") if a]
        if_match = request.getHeader(b"if-match")
        kwargs = {}
        newer_than = request.args.get(b"newer_than", [b""])[-1]
        if newer_than:
            # The version the asking node holds: only a newer copy counts.
            kwargs["newer_than"] = newer_than.decode("utf-8", "replace")
        d = self.lookups.answer(
            collection,
            uid,
            visited,
            method=request.method.decode("ascii"),
            if_match=if_match.decode("latin-1") if if_match else None,
            asked=asked,
            **kwargs
        )

        def answer(data):
            if data is None:
                return _json(request, 404, {"error": "not_found", "message": "not held"})
            request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
            return data

        return ensureDeferred(d).addCallback(answer)
