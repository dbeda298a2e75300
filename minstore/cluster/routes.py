"""The inter-node routes under ``/_cluster/`` (see L{minstore.cluster.peers})."""

from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from minstore._util import JSON_TYPE, UidConverter
from minstore._util import json_response as _json
from minstore.cluster.peers import NDJSON
from minstore.errors import BadRequest, MinstoreError, PayloadTooLarge


class ClusterAPI:
    app = Klein()
    app.url_map.converters["uid"] = UidConverter
    log = Logger()

    def __init__(self, node, lookups=None, sync=None):
        self.node = node
        self.lookups = lookups
        #: The node's L{minstore.cluster.sync.Sync}, answering peers' syncs.
        self.sync = sync

    @app.handle_errors(MinstoreError)
    def _error(self, request, failure):
        return _json(request, failure.value.code, failure.value.to_json())

    @app.handle_errors(NotFound)
    def _no_route(self, request, failure):
        return _json(request, 404, {"error": "not_found", "message": "no such route"})

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request, failure):
        allowed = ", ".join(failure.value.valid_methods or ())
        request.setHeader(b"allow", allowed.encode())
        return _json(request, 405, {"error": "method_not_allowed", "message": "allowed: " + allowed})

    @app.route("/replicas", methods=["POST"])
    def replicas(self, request):
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

    @app.route("/sync/ranges", methods=["POST"])
    def sync_ranges(self, request):
        return self._sync_answer(request, lambda body: self.sync.answer_ranges(body), JSON_TYPE)

    @app.route("/sync/records", methods=["POST"])
    def sync_records(self, request):
        return self._sync_answer(request, lambda body: self.sync.answer_records(body), NDJSON)

    def _sync_answer(self, request, answer, content_type):
        if self.sync is None:
            raise BadRequest("no_sync", "this node does not take syncs")
        if getattr(request, "body_too_large", False):
            raise PayloadTooLarge(message="a sync message over this node's --max-record-size")

        def send(body):
            request.responseHeaders.setRawHeaders(b"content-type", [content_type])
            return body

        return answer(request.content.read()).addCallback(send)

    @app.route("/lookup/<collection>/<uid:uid>", methods=["GET", "DELETE"])
    def lookup(self, request, collection, uid):
        if self.lookups is None:
            raise BadRequest("no_lookups", "this node does not take lookups")
        try:
            uid = unquote_to_bytes(request.path.split(b"/", 4)[4]).decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            raise BadRequest("bad_uid", "a uid must be valid UTF-8")
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
