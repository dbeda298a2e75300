"""
The HTTP API of DESIGN section 3, as a Klein app bound to a L{Node}.

Handlers parse, call the node and answer; every failure becomes a JSON error
body ``{"error": code, "message": text}``, never an HTML page.
"""

import json
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qs, unquote_to_bytes

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import RequestRedirect

from minstore import __version__
from minstore._util import JSON_TYPE, UidConverter, json_response
from minstore.cluster.routes import ClusterAPI
from minstore.console import CONSOLE_HTML
from minstore.errors import (
    BadGateway,
    BadRequest,
    MinstoreError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from minstore.node import etag_matches
from minstore.openapi import openapi_document
from minstore.records import canonical_json

DEFAULT_MAX_RECORD_SIZE = 1024 * 1024
LIST_PARAMETERS = frozenset([b"limit", b"after", b"prefix", b"local", b"cache"])


def _flag(args, name):
    values = args.get(name)
    return bool(values) and values[-1].lower() in (b"1", b"true", b"yes")


def _text_arg(args, name):
    values = args.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("bad_parameter", "%s: not UTF-8" % name.decode())


def raw_uid(request):
    """
    The uid of ``/{collection}/{uid}``, percent-decoded from the raw path as
    UTF-8 (so ``%2F`` and non-ASCII uids arrive intact).
    """
    try:
        return unquote_to_bytes(request.path.split(b"/", 2)[2]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("bad_uid", "a uid must be valid UTF-8")


def parse_multipart(body, content_type):
    head = b"Content-Type: " + content_type + b"\r\nMIME-Version: 1.0\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise BadRequest("bad_body", "malformed multipart/form-data body")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8")
        except (UnicodeDecodeError, LookupError):
            raise BadRequest("bad_body", "form field %r is not UTF-8 text" % (name,))
    return fields


def parse_body(request, max_size):
    """
    ``(value, uid or None)`` from a JSON object ``{"value": ...}`` or a form
    with a ``value`` field.
    """
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > max_size:
        raise PayloadTooLarge(message="the body is over %d bytes (--max-record-size)" % max_size)
    body = request.content.read(max_size + 1)
    if len(body) > max_size or getattr(request, "body_too_large", False):
        raise PayloadTooLarge(message="the body is over %d bytes (--max-record-size)" % max_size)
    content_type = request.getHeader(b"content-type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type == b"application/json" or media_type.endswith(b"+json"):
        try:
            # JSON is UTF-8 (RFC 8259): decoding here spares json its
            # encoding sniffing; bad UTF-8 is a ValueError like bad JSON.
            document = json.loads(body.decode("utf-8"))
        except ValueError as e:
            raise BadRequest("invalid_json", "the body is not JSON: %s" % (e,))
        if not isinstance(document, dict):
            raise BadRequest("invalid_body", 'a JSON body is an object {"value": ...}')
        if "value" not in document:
            raise BadRequest("missing_value", 'the JSON body has no "value"')
        try:
            canonical_json(document["value"])  # NaN, Infinity or a lone surrogate
        except ValueError as e:
            raise BadRequest("invalid_json", "the value is not JSON: %s" % (e,))
        uid = document.get("uid")
        if uid is not None and not isinstance(uid, str):
            raise BadRequest("bad_uid", "uid must be a string")
        return document["value"], uid
    if media_type == b"application/x-www-form-urlencoded":
        try:
            fields = {
                k: v[-1]
                for k, v in parse_qs(
                    body.decode("utf-8"), keep_blank_values=True, strict_parsing=False
                ).items()
            }
        except UnicodeDecodeError:
            raise BadRequest("bad_body", "the form is not UTF-8")
    elif media_type == b"multipart/form-data":
        fields = parse_multipart(body, content_type)
    else:
        raise UnsupportedMediaType(
            message="send application/json, application/x-www-form-urlencoded "
            "or multipart/form-data, not %r" % content_type.decode("latin-1")
        )
    if "value" not in fields:
        raise BadRequest("missing_value", "the form has no value field")
    return fields["value"], fields.get("uid")


class BoundedRequest(Request):
    """
    A request that stops buffering a body past the site's limit, so a huge
    upload costs no memory or disk before it is answered 413.
    """

    body_too_large = False

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        limit = getattr(self.channel.site, "max_body", None)
        if limit is not None and self.content.tell() + len(data) > limit:
            self.body_too_large = True
            return
        Request.handleContentChunk(self, data)


class RecordAPI:
    app = Klein()
    app.url_map.converters["uid"] = UidConverter
    log = Logger()

    def __init__(
        self,
        node,
        max_record_size=DEFAULT_MAX_RECORD_SIZE,
        front=None,
        lookups=None,
        replication=None,
        sync_timeout=5.0,
        node_sync=None,
    ):
        self.node = node
        self.replication = replication
        self.sync_timeout = sync_timeout
        #: The L{minstore.cluster.sync.Sync} of POST /_node/sync, or None.
        self.node_sync = node_sync
        self.cluster = ClusterAPI(node, lookups, node_sync)
        self.max_record_size = max_record_size
        #: The cache strategy's front (``cache=1``), when the node has dependants.
        self.front = front
        self.metrics = node.metrics

    def resource(self):
        return _Resource(self.app, self)

    # -- helpers --------------------------------------------------------

    def _track(self, request, route):
        start = time.perf_counter()
        method = request.method.decode("ascii", "replace")

        def done(_):
            self.metrics.observe_request(route, method, request.code, time.perf_counter() - start)

        request.notifyFinish().addBoth(done)

    _json = staticmethod(json_response)

    @staticmethod
    def _record(request, entry):
        request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
        request.responseHeaders.setRawHeaders(b"etag", [('"%s"' % entry.version).encode()])
        return entry.data

    def _record_or_304(self, request, entry):
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None and etag_matches(if_none_match.decode("latin-1"), entry.version):
            request.setResponseCode(304)
            request.responseHeaders.setRawHeaders(b"etag", [('"%s"' % entry.version).encode()])
            return b""
        return self._record(request, entry)

    def _written(self, request, collection, uid, d, render=None):
        """
        Answer a write with ``render(request, entry)`` (the stored record by
        default); with sync=1, only once the peers hold it or the sync
        deadline passed, saying how many do in two headers.
        """
        render = render or self._record
        if not _flag(request.args, b"sync"):
            return d.addCallback(lambda entry: render(request, entry))

        def wait(entry):
            if self.replication is None:
                return answer((0, 0), entry)
            waiting = self.replication.wait_stored(entry.seq, self.sync_timeout)
            return waiting.addCallback(answer, entry)

        def answer(counts, entry):
            stored, expected = counts
            request.setHeader(b"minstore-replicas-stored", b"%d" % stored)
            request.setHeader(b"minstore-replicas-expected", b"%d" % expected)
            return render(request, entry)

        return d.addCallback(wait)

    @staticmethod
    def _deleted(request, entry):
        request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
        record = json.loads(entry.data)
        body = {
            "deleted": True,
            "collection": record["collection"],
            "uid": record["uid"],
            "version": record["version"],
        }
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    @staticmethod
    def _if_match(request):
        value = request.getHeader(b"if-match")
        return None if value is None else value.decode("latin-1")

    def _bounce(self, request, collection, uid, body=None):
        if self.front is None:
            raise BadGateway(message="cache=1 needs dependants: this node has no servers.list peers")
        return self.front.handle(request, collection, uid, body)

    # -- errors ---------------------------------------------------------

    @app.handle_errors(MinstoreError)
    def _minstore_error(self, request, failure):
        return self._json(request, failure.value.code, failure.value.to_json())

    @app.handle_errors(WerkzeugNotFound)
    def _no_route(self, request, failure):
        return self._json(request, 404, {"error": "not_found", "message": "no such route"})

    @app.handle_errors(WerkzeugMethodNotAllowed)
    def _bad_method(self, request, failure):
        allowed = ", ".join(failure.value.valid_methods or ())
        if allowed:
            request.setHeader(b"allow", allowed.encode())
        return self._json(
            request, 405, {"error": "method_not_allowed", "message": "allowed: " + allowed}
        )

    @app.handle_errors(RequestRedirect)
    def _redirect(self, request, failure):
        # /books -> /books/: werkzeug's redirect, with the query string kept.
        location = failure.value.new_url
        query = request.uri.partition(b"?")[2]
        if query:
            location += "?" + query.decode("latin-1")
        request.setHeader(b"location", location.encode("utf-8"))
        return self._json(request, 308, {"error": "moved", "message": "see " + location})

    @app.handle_errors(Exception)
    def _internal_error(self, request, failure):
        self.log.failure("{method} {path} failed", failure, method=request.method, path=request.path)
        return self._json(
            request, 500, {"error": "internal_error", "message": failure.getErrorMessage()}
        )

    # -- node routes ----------------------------------------------------

    @app.route("/", methods=["GET"])
    def root(self, request):
        self._track(request, "root")
        accept = request.getHeader(b"accept") or b""
        if b"text/html" in accept:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return CONSOLE_HTML
        return self._json(
            request,
            200,
            {
                "name": "minstore",
                "version": __version__,
                "node_id": self.node.node_id,
                "collections": self.node.storage.collections(),
            },
        )

    @app.route("/_node/health", methods=["GET"])
    def health(self, request):
        self._track(request, "health")
        return self._json(request, 200, {"status": "ok", "node_id": self.node.node_id})

    @app.route("/_node/status", methods=["GET"])
    def status(self, request):
        self._track(request, "status")
        return self._json(request, 200, self.node.status())

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        self._track(request, "metrics")
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.exposition()

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request):
        self._track(request, "openapi")
        return self._json(request, 200, openapi_document())

    @app.route("/_node/sync", methods=["POST"])
    def sync_peers(self, request):
        self._track(request, "sync")
        return node_sync_route(self.node_sync, request)

    @app.route("/_cluster/", branch=True)
    def cluster(self, request):
        self._track(request, "cluster")
        return self.cluster.app.resource()

    # -- records --------------------------------------------------------

    @app.route("/<collection>/", methods=["GET"])
    def list_records(self, request, collection):
        self._track(request, "collection")
        args = request.args
        unknown = set(args) - LIST_PARAMETERS
        if unknown:
            raise BadRequest(
                "bad_parameter",
                "no secondary index on %s; parameters are limit, after, prefix"
                % ", ".join(sorted(k.decode("latin-1") for k in unknown)),
            )
        limit = _text_arg(args, b"limit") or "100"
        if not limit.isdigit():
            raise BadRequest("bad_parameter", "limit: a whole number from 1 to 1000")
        d = self.node.list(
            collection,
            limit=int(limit),
            after=_text_arg(args, b"after"),
            prefix=_text_arg(args, b"prefix"),
        )

        def answer(page):
            items, next_cursor = page
            request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
            return b'{"items":[' + b",".join(items) + b'],"next":' + json.dumps(next_cursor).encode() + b"}"

        return d.addCallback(answer)

    @app.route("/<collection>/", methods=["POST"])
    def post_generated(self, request, collection):
        self._track(request, "collection")
        value, uid = parse_body(request, self.max_record_size)
        if uid is None:
            uid = str(uuid.uuid4())
        if _flag(request.args, b"cache"):
            return self._bounce(request, collection, uid, value)
        return self._written(request, collection, uid, self.node.create(collection, uid, value))

    @app.route("/<collection>/<uid:uid>", methods=["GET"])
    def get_record(self, request, collection, uid):
        self._track(request, "record")
        uid = raw_uid(request)
        args = request.args
        local = False
        if args:
            if _flag(args, b"cache"):
                return self._bounce(request, collection, uid)
            local = _flag(args, b"local")
        entry = self.node.cached(collection, uid)
        if entry is not None and not entry.deleted:
            return self._record_or_304(request, entry)
        return self.node.get(collection, uid, local).addCallback(
            lambda entry: self._record_or_304(request, entry)
        )

    def _record_write(self, request, collection, write):
        """POST or PUT /{collection}/{uid}: ``write(uid, value)`` on the node."""
        self._track(request, "record")
        uid = raw_uid(request)
        value, body_uid = parse_body(request, self.max_record_size)
        if body_uid is not None and body_uid != uid:
            raise BadRequest("uid_mismatch", "the body's uid %r is not the path's %r" % (body_uid, uid))
        if _flag(request.args, b"cache"):
            return self._bounce(request, collection, uid, value)
        return self._written(request, collection, uid, write(uid, value))

    @app.route("/<collection>/<uid:uid>", methods=["POST"])
    def post_record(self, request, collection, uid):
        return self._record_write(
            request, collection, lambda uid, value: self.node.create(collection, uid, value)
        )

    @app.route("/<collection>/<uid:uid>", methods=["PUT"])
    def put_record(self, request, collection, uid):
        if_match = self._if_match(request)
        return self._record_write(
            request, collection, lambda uid, value: self.node.update(collection, uid, value, if_match)
        )

    @app.route("/<collection>/<uid:uid>", methods=["DELETE"])
    def delete_record(self, request, collection, uid):
        self._track(request, "record")
        uid = raw_uid(request)
        if _flag(request.args, b"cache"):
            return self._bounce(request, collection, uid)
        d = self.node.delete(
            collection, uid, self._if_match(request), local=_flag(request.args, b"local")
        )
        return self._written(request, collection, uid, d, self._deleted)


def node_sync_route(node_sync, request):
    """POST /_node/sync[?peer=URL]: 200 with each peer's report, 502 when a sync failed."""
    from minstore.cluster.servers import normalise_peer

    if node_sync is None:
        raise BadRequest("no_sync", "this node does not sync")
    peer = _text_arg(request.args, b"peer")
    if peer is not None:
        url = normalise_peer(peer)
        if url is None or url not in node_sync.peers():
            raise BadRequest("unknown_peer", "%r is not one of this node's peers" % (peer,))
        d = node_sync.sync(url).addCallback(lambda report: [report])
    else:
        d = node_sync.sync_all()

    def answer(reports):
        failed = [r for r in reports if r["error"] is not None]
        if not failed:
            return json_response(request, 200, {"peers": reports})
        message = "; ".join("%s: %s" % (r["peer"], r["error"]) for r in failed)
        return json_response(request, 502, {"error": "sync_failed", "message": message, "peers": reports})

    return d.addCallback(answer)


class _Resource(KleinResource):
    """
    The app's resource.  A path that is not UTF-8 gets a JSON 400, not
    Klein's plain text.  A plain record path, ``/{collection}/{uid}`` with
    one segment each, goes straight to its handler: routing it through
    Klein and werkzeug (binding a URL map, matching it, wrapping the result)
    cost a POST about a fifth of the node's time.  Every other path is
    Klein's.
    """

    def __init__(self, app, api):
        KleinResource.__init__(self, app)
        self.api = api
        self.direct = {
            b"GET": api.get_record,
            b"POST": api.post_record,
            b"PUT": api.put_record,
            b"DELETE": api.delete_record,
        }

    def render(self, request):
        try:
            b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            return RecordAPI._json(
                request, 400, {"error": "bad_path", "message": "the path is not percent-encoded UTF-8"}
            )
        handler = self.direct.get(request.method)
        if handler is not None:
            collection = _plain_record_path(request.path)
            if collection is not None:
                return self._render_direct(request, handler, collection)
        return KleinResource.render(self, request)

    def _render_direct(self, request, handler, collection):
        try:
            # The handlers read the uid from the raw path (raw_uid).
            result = handler(request, collection, None)
        except Exception:
            return self._error(Failure(), request)
        if not isinstance(result, Deferred):
            return result

        def write(body):
            # twisted.web drops the channel of a request whose connection
            # was lost: nothing to answer then.
            if request.channel is not None:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        result.addErrback(self._error, request).addCallback(write)
        result.addErrback(lambda f: self.api.log.failure("answering {path} failed", f, path=request.path))
        return NOT_DONE_YET

    def _error(self, failure, request):
        """The JSON answer Klein's error handlers would give."""
        if failure.check(MinstoreError):
            return self.api._minstore_error(request, failure)
        return self.api._internal_error(request, failure)


def _plain_record_path(path):
    """
    The collection of ``/{collection}/{uid}`` when both are one non-empty
    segment that is not reserved (``_node``, ``_cluster``), else None.
    """
    parts = path.split(b"/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2] or parts[1].startswith(b"_"):
        return None
    try:
        return unquote_to_bytes(parts[1]).decode("utf-8")
    except UnicodeDecodeError:
        return None
