"""
The HTTP API of DESIGN section 3, bound to a L{Node}.

One request path: L{parse_path} turns the raw path into a route and its
``(collection, uid)``, L{_Resource} picks the handler of the route and the
method, and every failure becomes a JSON error body ``{"error": code,
"message": text}`` through one mapping (L{minstore.errors.error_answer}),
never an HTML page.  A client that hangs up cancels the work of its read.
"""

import json
import re
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from itertools import accumulate
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from minstore import __version__
from minstore._util import JSON_TYPE, json_response
from minstore.cluster.routes import ClusterAPI
from minstore.console import CONSOLE_HTML
from minstore.errors import (
    BadRequest,
    MethodNotAllowed,
    NoDependants,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_answer,
)
from minstore.node import DEFAULT_CHANGES_LIMIT, MAX_CHANGES_LIMIT, Node, etag_matches
from minstore.openapi import openapi_document
from minstore.records import canonical_json

DEFAULT_MAX_RECORD_SIZE = 1024 * 1024
LIST_PARAMETERS = frozenset([b"limit", b"after", b"prefix", b"local", b"cache"])
#: The deepest nesting of arrays and objects a JSON body may have.
MAX_JSON_DEPTH = 100
#: The longest request line (method, target, version) taken: longer, 414.
MAX_REQUEST_LINE = 16 * 1024
#: The most bytes of header lines a request may have: more, 431.
MAX_HEADER_BYTES = 16 * 1024
#: The most header lines a request may have: more, 431.
MAX_HEADERS = 100


def ascii_digits(text):
    """Whether ``text`` (str or bytes) is one or more ASCII digits, and only those."""
    return bool(text) and text.isascii() and text.isdigit()


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_depth(text):
    """
    How deep arrays and objects nest in a JSON text json.loads took: its
    strings dropped (linear on valid JSON, whose strings all end), then a
    running sum over the brackets left.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def loads_bounded(text):
    """
    ``json.loads`` of a client's text, a BadRequest ``invalid_json`` for
    text that is not JSON or nests arrays and objects deeper than
    L{MAX_JSON_DEPTH} (json's own recursion limit, a RecursionError, is
    only met well past it).  The depth is measured only on text json took,
    and only when it has more brackets than the limit.
    """
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as e:
        if isinstance(e, RecursionError):
            e = "arrays and objects nested deeper than %d" % MAX_JSON_DEPTH
        raise BadRequest("invalid_json", "the body is not JSON: %s" % (e,))
    # Cheap bound first: a text with few brackets cannot nest deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        if _json_depth(text) > MAX_JSON_DEPTH:
            raise BadRequest(
                "invalid_json", "the body nests arrays and objects deeper than %d" % MAX_JSON_DEPTH
            )
    return document


#: The routes whose raw path is fixed, by that path.
_FIXED_ROUTES = {
    b"/": "root",
    b"/_node/health": "health",
    b"/_node/status": "status",
    b"/metrics": "metrics",
    b"/openapi.json": "openapi",
    b"/_cluster/replicas": "replicas",
    b"/_changes": "changes",
    b"/_node/sync": "sync",
    b"/_cluster/sync/ranges": "sync_ranges",
}


def parse_path(path):
    """
    ``(route, collection, uid)`` of a raw request path (percent-encoded,
    without its query), the one parser of every route:

    * a fixed route (L{_FIXED_ROUTES}): ``(name, None, None)``;
    * ``/{collection}/``: ``("collection", collection, None)``;
    * ``/{collection}/{uid}``: ``("record", collection, uid)``;
    * ``/_cluster/lookup/{collection}/{uid}``: ``("lookup", collection, uid)``;
      any other path under ``/_cluster/``: 404.

    Each segment is percent-decoded as UTF-8; a uid is the rest of the path,
    so it may hold raw ``/`` between non-empty segments (``/books/a/b`` is
    uid ``a/b``) and any character percent-encoded (``%2F`` included).  An
    empty segment (``//``, or a ``/`` ending a record path) is never merged
    nor redirected: 400 ``bad_path``, like a path that is not UTF-8.
    Anything else: 404 ``not_found``.
    """
    route = _FIXED_ROUTES.get(path)
    if route is not None:
        return route, None, None
    if not path.startswith(b"/"):
        raise BadRequest("bad_path", "a path starts with /")
    segments = path[1:].split(b"/")
    listing = len(segments) == 2 and segments[1] == b""
    if listing:
        del segments[1]
    if b"" in segments:
        raise BadRequest(
            "bad_path",
            "the path has an empty segment (// or a trailing /); percent-encode a / of a uid as %2F",
        )
    try:
        decoded = [unquote_to_bytes(segment).decode("utf-8") for segment in segments]
    except UnicodeDecodeError:
        raise BadRequest("bad_path", "the path is not percent-encoded UTF-8")
    if segments[0] == b"_cluster":
        if len(segments) >= 4 and segments[1] == b"lookup" and not listing:
            return "lookup", decoded[2], "/".join(decoded[3:])
        raise NotFound(message="no such route")
    # Other names under the reserved _ are refused as collections (bad_collection).
    if listing:
        return "collection", decoded[0], None
    if len(segments) == 1:
        raise NotFound(message="no such route; the records of a collection are at /%s/" % decoded[0])
    return "record", decoded[0], "/".join(decoded[1:])


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


def _filter_args(args):
    """A listing's filter parameters (every one but LIST_PARAMETERS), ``[(name, text)]``."""
    filters = []
    for name in sorted(set(args) - LIST_PARAMETERS):
        try:
            filters.append((name.decode("utf-8"), _text_arg(args, name)))
        except UnicodeDecodeError:
            raise BadRequest("bad_parameter", "a parameter name is not UTF-8")
    return filters


def _changes_args(args):
    """``(since, limit, collection)`` of ``GET /_changes``; 400 for anything else."""
    unknown = set(args) - {b"since", b"limit", b"collection"}
    if unknown:
        raise BadRequest(
            "bad_parameter",
            "unknown parameter %s; /_changes takes since, limit, collection"
            % ", ".join(sorted(k.decode("latin-1") for k in unknown)),
        )
    numbers = []
    for name, default, low, high in ((b"since", 0, 0, None), (b"limit", DEFAULT_CHANGES_LIMIT, 1, MAX_CHANGES_LIMIT)):
        text = _text_arg(args, name)
        if text is None:
            numbers.append(default)
            continue
        if not (text.isascii() and text.isdigit()) or int(text) < low or (high is not None and int(text) > high):
            raise BadRequest(
                "bad_parameter",
                "%s: a whole number (ASCII digits) from %d%s" % (name.decode(), low, " to %d" % high if high else ""),
            )
        numbers.append(int(text))
    return numbers[0], numbers[1], _text_arg(args, b"collection")


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
    if length is not None and ascii_digits(length) and int(length) > max_size:
        raise PayloadTooLarge(message="the body is over %d bytes (--max-record-size)" % max_size)
    body = request.content.read(max_size + 1)
    if len(body) > max_size or getattr(request, "body_too_large", False):
        raise PayloadTooLarge(message="the body is over %d bytes (--max-record-size)" % max_size)
    content_type = request.getHeader(b"content-type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type == b"application/json" or media_type.endswith(b"+json"):
        try:
            # JSON is UTF-8 (RFC 8259): decoding here spares json its
            # encoding sniffing.
            text = body.decode("utf-8")
        except ValueError as e:
            raise BadRequest("invalid_json", "the body is not JSON: %s" % (e,))
        document = loads_bounded(text)
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


class BoundedChannel(HTTPChannel):
    """
    An HTTP channel that answers a request line over L{MAX_REQUEST_LINE}
    bytes with a JSON 414, and header lines over L{MAX_HEADER_BYTES} bytes
    or L{MAX_HEADERS} lines with a JSON 431, then closes the connection.
    (twisted.web drops the connection with no answer for a line over its
    C{MAX_LENGTH}, and answers a bare 400 for too many header bytes.)
    """

    MAX_LENGTH = max(MAX_REQUEST_LINE, MAX_HEADER_BYTES) + 1
    # twisted.web's own bound never comes first: these are checked here.
    totalHeadersSize = MAX_REQUEST_LINE + MAX_HEADER_BYTES + 1024
    maxHeaders = MAX_HEADERS + 1

    _lines = 0
    _header_bytes = 0
    _refused = False
    _host = None

    def getHost(self):
        # twisted.web asks at every request (Request.__init__), and a TCP
        # transport answers each time with a getsockname() system call; a
        # connection's own address does not change.
        if self._host is None:
            self._host = HTTPChannel.getHost(self)
        return self._host

    def lineReceived(self, line):
        if self._refused:
            return
        if self._lines == 0 and not line:
            # The empty line a client may send between requests.
            return HTTPChannel.lineReceived(self, line)
        self._lines += 1
        if self._lines == 1:
            if len(line) > MAX_REQUEST_LINE:
                return self._refuse(414, "uri_too_long", "the request line is over %d bytes" % MAX_REQUEST_LINE)
        elif line:
            self._header_bytes += len(line)
            if self._header_bytes > MAX_HEADER_BYTES or self._lines - 1 > MAX_HEADERS:
                return self._refuse(
                    431,
                    "headers_too_large",
                    "the headers are over %d bytes or %d lines" % (MAX_HEADER_BYTES, MAX_HEADERS),
                )
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line):
        # A line longer than MAX_LENGTH, its end not even received.
        if self._lines == 0:
            self._refuse(414, "uri_too_long", "the request line is over %d bytes" % MAX_REQUEST_LINE)
        else:
            self._refuse(431, "headers_too_large", "a header line is over %d bytes" % MAX_HEADER_BYTES)

    def allContentReceived(self):
        self._lines = 0
        self._header_bytes = 0
        HTTPChannel.allContentReceived(self)

    _REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}

    def _refuse(self, code, error, message):
        """Answer with a JSON error, read no more of this connection, close it."""
        self._refused = True
        self.setRawMode()  # no more lines parsed, nor lineLengthExceeded again
        body = json.dumps({"error": error, "message": message}).encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, self._REASONS[code], JSON_TYPE, len(body), body)
        )
        self.loseConnection()

    def rawDataReceived(self, data):
        if self._refused:
            return
        HTTPChannel.rawDataReceived(self, data)


class RecordAPI:
    log = Logger()

    def __init__(
        self,
        node: Node,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        front: Any = None,
        lookups: Any = None,
        replication: Any = None,
        sync_timeout: float = 5.0,
        node_sync: Any = None,
    ) -> None:
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
        # Requests of clients (not of peers) seen so far: a sync gives way
        # to them (L{minstore.cluster.sync.Sync}'s ``clients``).
        self.client_requests = 0

    def resource(self) -> Resource:
        """The resource tree of the API (what a Site serves)."""
        return _Resource(self)

    def routes(self):
        """
        The handlers of each route of L{parse_path}, by method; and the
        route's label in ``/metrics``.  A handler is called with the
        request, the collection and the uid (None where the route has none).
        """
        return {
            "root": ("root", {b"GET": self.root}),
            "health": ("health", {b"GET": self.health}),
            "status": ("status", {b"GET": self.status}),
            "metrics": ("metrics", {b"GET": self.metrics_text}),
            "openapi": ("openapi", {b"GET": self.openapi}),
            "changes": ("changes", {b"GET": self.changes}),
            "sync": ("sync", {b"POST": self.sync_peers}),
            "sync_ranges": ("cluster", {b"POST": self.cluster.sync_ranges}),
            "replicas": ("cluster", {b"POST": self.cluster.replicas}),
            "lookup": ("cluster", {b"GET": self.cluster.lookup, b"DELETE": self.cluster.lookup}),
            "collection": ("collection", {b"GET": self.list_records, b"POST": self.post_generated}),
            "record": (
                "record",
                {
                    b"GET": self.get_record,
                    b"POST": self.post_record,
                    b"PUT": self.put_record,
                    b"DELETE": self.delete_record,
                },
            ),
        }

    # -- helpers --------------------------------------------------------

    def _track(self, request, route):
        """A request of a route begins: counted; its start time, for L{_observe}."""
        if route != "cluster":
            self.client_requests += 1
        return time.perf_counter()

    def _observe(self, request, route, start):
        """A request answered (its code set): in the route's metrics."""
        method = request.method.decode("ascii", "replace")
        self.metrics.observe_request(route, method, request.code, time.perf_counter() - start)

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
            raise NoDependants(message="cache=1 needs dependants: this node has no servers.list peers")
        return self.front.handle(request, collection, uid, body)

    # -- node routes ----------------------------------------------------

    def root(self, request, collection=None, uid=None):
        # One URL, two representations: caches must key on Accept.
        request.setHeader(b"vary", b"Accept")
        accept = request.getHeader(b"accept") or b""
        if b"text/html" in accept:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return CONSOLE_HTML
        info = {"name": "minstore", "version": __version__, "node_id": self.node.node_id}
        if _flag(request.args, b"cache"):
            # A front stores nothing: the collections are a dependant's.
            return self._bounce(request, None, None).addCallback(
                lambda collections: self._json(request, 200, dict(info, collections=collections))
            )
        return self._json(request, 200, dict(info, collections=self.node.storage.collections()))

    def health(self, request, collection=None, uid=None):
        # An engine over a database (postgresql) says when it last failed to reach it.
        unavailable = getattr(self.node.storage, "unavailable", None)
        if unavailable:
            return self._json(
                request,
                503,
                {"error": "storage_unavailable", "message": "the storage cannot be reached: %s" % (unavailable,),
                 "status": "unavailable", "node_id": self.node.node_id},
            )
        return self._json(request, 200, {"status": "ok", "node_id": self.node.node_id})

    def status(self, request, collection=None, uid=None):
        return self._json(request, 200, self.node.status())

    def metrics_text(self, request, collection=None, uid=None):
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.exposition()

    def openapi(self, request, collection=None, uid=None):
        return self._json(request, 200, openapi_document(self.node.indexes))

    def changes(self, request, collection=None, uid=None):
        since, limit, collection = _changes_args(request.args)
        d = self.node.changes(since, limit, collection)
        return d.addCallback(lambda document: self._json(request, 200, document))

    def sync_peers(self, request, collection=None, uid=None):
        return node_sync_route(self.node_sync, request)

    # -- records --------------------------------------------------------

    def list_records(self, request, collection, uid=None):
        args = request.args
        limit = _text_arg(args, b"limit") or "100"
        if not ascii_digits(limit):
            raise BadRequest("bad_parameter", "limit: a whole number from 1 to 1000")
        if _flag(args, b"cache"):
            return self._bounce(request, collection, None)
        d = self.node.list(
            collection,
            limit=int(limit),
            after=_text_arg(args, b"after"),
            prefix=_text_arg(args, b"prefix"),
            filters=_filter_args(args),
        )

        def answer(page):
            items, next_cursor = page
            request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
            return b'{"items":[' + b",".join(items) + b'],"next":' + json.dumps(next_cursor).encode() + b"}"

        return d.addCallback(answer)

    def post_generated(self, request, collection, uid=None):
        value, uid = parse_body(request, self.max_record_size)
        if uid is None:
            uid = str(uuid.uuid4())
        if _flag(request.args, b"cache"):
            return self._bounce(request, collection, uid, value)
        return self._written(request, collection, uid, self.node.create(collection, uid, value))

    def get_record(self, request, collection, uid):
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

    def _record_write(self, request, collection, uid, write):
        """POST or PUT /{collection}/{uid}: ``write(uid, value)`` on the node."""
        value, body_uid = parse_body(request, self.max_record_size)
        if body_uid is not None and body_uid != uid:
            raise BadRequest("uid_mismatch", "the body's uid %r is not the path's %r" % (body_uid, uid))
        if _flag(request.args, b"cache"):
            return self._bounce(request, collection, uid, value)
        return self._written(request, collection, uid, write(uid, value))

    def post_record(self, request, collection, uid):
        return self._record_write(
            request, collection, uid, lambda uid, value: self.node.create(collection, uid, value)
        )

    def put_record(self, request, collection, uid):
        if_match = self._if_match(request)
        return self._record_write(
            request,
            collection,
            uid,
            lambda uid, value: self.node.update(collection, uid, value, if_match),
        )

    def delete_record(self, request, collection, uid):
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


#: Methods whose work a client that hangs up cancels: reads.  A write that
#: reached the node goes on (its replicas must go out), answered to nobody.
_CANCELLABLE = frozenset([b"GET", b"HEAD"])


class _Resource(Resource):
    """
    The site's root, the one request path: L{parse_path} names the route,
    the method picks its handler, and the handler's bytes (or Deferred of
    bytes) are the answer.  Any failure, raised or in the Deferred, is
    answered by L{_Resource.error}.
    """

    isLeaf = True

    def __init__(self, api):
        Resource.__init__(self)
        self.api = api
        self.log = api.log
        self.routes = api.routes()

    def render(self, request):
        start = None
        try:
            route, collection, uid = parse_path(request.path)
            label, methods = self.routes[route]
            method = request.method
            handler = methods.get(method)
            if handler is None and method == b"HEAD":
                handler = methods.get(b"GET")
            if handler is None:
                allowed = sorted(methods) + ([b"HEAD"] if b"GET" in methods else [])
                allow = b", ".join(sorted(allowed))
                raise MethodNotAllowed(
                    message="allowed: " + allow.decode(), headers={b"allow": allow}
                )
            start = self.api._track(request, label)
            result = handler(request, collection, uid)
        except Exception:
            result = self.error(Failure(), request)
        if not isinstance(result, Deferred):
            # Answered now (a read cache hit, an error): observed now, with
            # no Deferred of the request's finish to make and fire.
            if start is not None:
                self.api._observe(request, label, start)
            return result
        request.notifyFinish().addBoth(lambda _: self.api._observe(request, label, start))
        if request.method in _CANCELLABLE:
            request.notifyFinish().addErrback(lambda _: result.cancel())

        def write(body):
            # twisted.web drops the channel of a request whose connection
            # was lost: nothing to answer then.
            if request.channel is not None:
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        result.addErrback(self.error, request).addCallback(write)
        result.addErrback(lambda f: self.log.failure("answering {path} failed", f, path=request.path))
        return NOT_DONE_YET

    def error(self, failure, request):
        """The JSON answer to a failure: one mapping for every route."""
        answer = error_answer(failure)
        if answer is None:
            if request.channel is None and failure.check(CancelledError):
                return b""  # the client hung up and its read was cancelled
            self.log.failure(
                "{method} {path} failed", failure, method=request.method, path=request.path
            )
            answer = 500, {}, {"error": "internal_error", "message": failure.getErrorMessage()}
        code, headers, body = answer
        # An answer half made (an ETag set) before the failure is not kept.
        request.responseHeaders.removeHeader(b"etag")
        for name, value in headers.items():
            request.setHeader(name, value)
        return json_response(request, code, body)
