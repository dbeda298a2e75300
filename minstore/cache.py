"""
The cache strategy of DESIGN section 4: with ``cache=1`` a node is a
*front*.  It stores nothing itself; it bounces the request to its
dependants (the peers of its ``servers.list``), keeps the valid answer in a
memory cache bounded in bytes, and answers with the dependant's status and
body.

* GET: a fresh entry (younger than ``ttl`` seconds) is served without
  asking anybody.  Otherwise the dependants are asked for their own copy
  (``local=1``), with ``If-None-Match`` when a stale entry is held: one
  first (in turn, to spread the load), all the others as soon as it misses,
  fails or is slower than ``hedge`` seconds; the first 200 (or 304, which
  renews the stale entry) wins.  404 only when every dependant that
  answered said 404; a 404 is never cached.  When no
  dependant answers, a stale entry is served with a ``Warning: 111`` header
  for at most ``stale_if_error`` seconds past its freshness, else 502.
  Concurrent misses of one uid share one round of requests.
* POST, PUT and DELETE: sent to the first dependant that answers (in
  ``servers.list`` order), which processes and stores the write; the front
  only routes.  The dependants mirror each other (each lists the others in
  its own servers.list), so the dependant's durable replication brings the
  record, or the tombstone, to the others, also to one that is down or
  restarts, and whatever happens to the front.  ``sync=1`` is passed on: the
  dependant then answers once the others stored it, with the
  ``Minstore-Replicas-*`` headers.  A DELETE is not ``local=1``: a dependant
  that does not hold the record yet finds it on the others.
* The client's ``Authorization`` goes to the dependants unchanged, and a
  fresh entry is served only to a client whose ``Authorization`` (or lack
  of one) a dependant accepted for that collection within the last ``ttl``
  seconds: a cached record is never served to a client the dependants
  would refuse (their 401 and 403 pass through).
* 400, 404 and 412 from a dependant pass through unchanged.  No answer
  from any dependant within ``timeout`` seconds: 502 with a JSON error.
* Listings (``GET /{collection}/``) and the collections of ``GET /`` are
  a dependant's: the first that answers, in turn; never cached.

Cache hits are answered on the reactor thread with no Deferred at all.
"""

import hashlib
import json
from collections import OrderedDict
from urllib.parse import quote, urlencode

import attr
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import Logger
from twisted.python.failure import Failure

from minstore.cluster.peers import record_path
from minstore.errors import BadGateway, MethodNotAllowed, NoDependants
from minstore.lru import ByteLRU
from minstore.node import etag_matches
from minstore._util import JSON_TYPE
from minstore.records import check_collection, check_uid

DEFAULT_SIZE = 64 * 1024 * 1024
DEFAULT_TTL = 60.0
DEFAULT_TIMEOUT = 5.0
#: Every status a dependant may answer with: the front judges them itself.
_ANY_STATUS = range(100, 600)
_REPLICA_HEADERS = (b"minstore-replicas-stored", b"minstore-replicas-expected")
#: What a stale entry is served with when no dependant could revalidate it.
STALE_WARNING = b'111 minstore "Revalidation Failed"'
#: (credential, collection) pairs remembered as accepted by a dependant.
MAX_CREDENTIALS = 10000


def _credential(request):
    """The client's Authorization, kept as its SHA-256 only (b"" for none)."""
    header = request.getHeader(b"authorization")
    return b"" if header is None else hashlib.sha256(header).digest()


def _with_authorization(request, headers):
    """``headers`` with the client's Authorization, when it sent one."""
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        headers[b"authorization"] = [authorization]
    return headers


def _flag(args, name):
    values = args.get(name)
    return bool(values) and values[-1].lower() in (b"1", b"true", b"yes")


@attr.s(frozen=True, slots=True)
class Meta:
    """What the cache keeps beside a record's bytes."""

    etag = attr.ib()
    version = attr.ib()
    expires = attr.ib()


@attr.s(frozen=True, slots=True)
class Answer:
    """A dependant's answer: status, the headers that matter, body."""

    peer = attr.ib()
    code = attr.ib()
    etag = attr.ib()
    content_type = attr.ib()
    body = attr.ib(repr=False)
    #: The Minstore-Replicas-* headers of a sync=1 write, as (name, value).
    replicas = attr.ib(default=())

    @property
    def version(self):
        return self.etag.decode("latin-1").strip('"') if self.etag else None


class _Fetch:
    """One round of GETs to the dependants, shared by concurrent misses."""

    __slots__ = ("waiters", "invalidated")

    def __init__(self):
        self.waiters = []
        self.invalidated = False


def _answered(outcomes):
    """The answers that count: no failure, no 5xx."""
    return [o for o in outcomes if isinstance(o, Answer) and o.code < 500]


def _reason(outcome, timeout):
    """What went wrong with one dependant, in words."""
    if isinstance(outcome, Answer):
        return "answered %d" % outcome.code
    exception = getattr(outcome, "value", getattr(outcome, "exception", None))
    # treq wraps what went wrong in a list of reasons (ResponseNeverReceived).
    reasons = getattr(exception, "reasons", None)
    if reasons:
        exception = getattr(reasons[0], "value", reasons[0])
    if isinstance(exception, (CancelledError, TimeoutError)):
        return "no answer within %gs" % timeout
    if isinstance(exception, ConnectionRefusedError):
        return "connection refused"
    return str(exception) or type(exception).__name__


def _why(peers, outcomes, timeout):
    reasons = []
    for peer, o in zip(peers, outcomes):
        if o is not None:
            reasons.append("%s: %s" % (peer, _reason(o, timeout)))
    return "no dependant could answer: " + ("; ".join(reasons) or "none asked")


class CacheFront:
    log = Logger()

    def __init__(
        self,
        client,
        dependants,
        clock,
        size=DEFAULT_SIZE,
        ttl=DEFAULT_TTL,
        timeout=DEFAULT_TIMEOUT,
        stale_if_error=0.0,
        hedge=0.05,
    ):
        """
        @param client: a L{minstore.cluster.peers.PeerClient}.
        @param dependants: a callable returning the current dependant base
            URLs (``servers.list`` is re-read on SIGHUP).
        @param clock: an IReactorTime, for freshness and deadlines.
        @param size: bytes of records the cache holds at most.
        @param ttl: seconds an entry is served without asking a dependant.
        @param timeout: seconds a dependant has to answer one request.
        @param stale_if_error: seconds past its freshness that a stale entry
            may still be served while no dependant answers (0: never).
        @param hedge: seconds a GET waits for the first dependant asked
            before asking the others too.
        """
        self.client = client
        self.dependants = dependants
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self.stale_if_error = stale_if_error
        self.hedge = hedge
        self._turn = -1
        self.lru = ByteLRU(size)
        self.hits = 0
        self.misses = 0
        self.revalidations = 0
        self.not_modified = 0
        self.stale_served = 0
        self.errors = 0
        self._fetches = {}  # (key, credential) -> _Fetch
        self._accepted = OrderedDict()  # (credential, collection) -> expiry
        self.metrics = None
        #: What each dependant did last: (state, seconds, error or None).
        self._seen = {}

    # -- wiring -----------------------------------------------------------

    def attach(self, node):
        """Show the cache in the node's ``/_node/status`` and ``/metrics``."""
        self.metrics = node.metrics
        node.status_sections["cache"] = self.status
        node.metrics.registry.register(_CacheCollector(self))

    # -- requests ---------------------------------------------------------

    def handle(self, request, collection, uid, value=None):
        """
        Answer a ``cache=1`` request: bytes (a cache hit), or a Deferred of
        bytes.  ``value`` is the parsed value of a POST or PUT.
        """
        method = request.method
        key = (collection, uid)
        if uid is None:
            if method == b"GET" or method == b"HEAD":
                return ensureDeferred(self._read_through(request, collection))
            raise MethodNotAllowed(message="cache=1 lists with GET")
        if method == b"GET" or method == b"HEAD":
            hit = self.lru.get(key)
            if hit is not None and self.clock.seconds() < hit[1].expires and self._may_serve(request, collection):
                self.hits += 1
                return self._serve(request, hit[0], hit[1])
            check_collection(collection)
            check_uid(uid)
            return self._get(request, key, hit)
        check_collection(collection)
        check_uid(uid)
        if method == b"POST" or method == b"PUT":
            return ensureDeferred(self._write(request, key, value))
        if method == b"DELETE":
            return ensureDeferred(self._delete(request, key))
        raise MethodNotAllowed(message="cache=1 serves GET, POST, PUT and DELETE")

    def _may_serve(self, request, collection):
        """Whether a dependant accepted this client's credentials for ``collection`` lately."""
        expires = self._accepted.get((_credential(request), collection))
        return expires is not None and self.clock.seconds() < expires

    def _accept(self, credential, collection, accepted):
        """Remember (or forget) that the dependants accepted these credentials."""
        pair = (credential, collection)
        self._accepted.pop(pair, None)
        if accepted:
            self._accepted[pair] = self.clock.seconds() + self.ttl
            while len(self._accepted) > MAX_CREDENTIALS:
                self._accepted.popitem(last=False)

    async def _read_through(self, request, collection):
        """
        A listing of ``collection`` (or, for None, the collections of
        ``GET /``) from the first dependant that answers, asked in turn.
        """
        if collection is None:
            path = "/"
        else:
            check_collection(collection)
            args = [(k, v) for k, vs in request.args.items() if k not in (b"cache", b"local") for v in vs]
            path = "/%s/?%s" % (quote(collection, safe=""), urlencode(args + [(b"local", b"1")]))
        peers = self._peers()
        self._turn = (self._turn + 1) % len(peers)
        peers = peers[self._turn:] + peers[: self._turn]
        outcomes = []
        for peer in peers:
            try:
                answer = await self._call(
                    peer, "GET", path, _with_authorization(request, {b"accept": [b"application/json"]})
                )
            except Exception as e:
                outcomes.append(_Reason(e))
                continue
            outcomes.append(answer)
            if answer.code < 500:
                if collection is None:
                    try:
                        return json.loads(answer.body)["collections"]
                    except (ValueError, KeyError, TypeError):
                        continue
                return self._pass(request, answer)
        self.errors += 1
        raise BadGateway(message=_why(peers, outcomes, self.timeout))

    @staticmethod
    def _serve(request, data, meta):
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [JSON_TYPE])
        headers.setRawHeaders(b"etag", [meta.etag])
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None and etag_matches(if_none_match.decode("latin-1"), meta.version):
            request.setResponseCode(304)
            return b""
        return data

    @staticmethod
    def _pass(request, answer):
        """Answer with a dependant's status and body, unchanged."""
        request.setResponseCode(answer.code)
        request.responseHeaders.setRawHeaders(b"content-type", [answer.content_type or JSON_TYPE])
        if answer.etag:
            request.responseHeaders.setRawHeaders(b"etag", [answer.etag])
        for name, value in answer.replicas:
            request.responseHeaders.setRawHeaders(name, [value])
        return answer.body

    def _peers(self):
        peers = list(self.dependants())
        if not peers:
            raise NoDependants(message="cache=1 needs dependants: this node's servers.list lists no peer")
        return peers

    def _call(self, peer, method, path, headers=None, data=None):
        """Deferred L{Answer} of one request to a dependant; fails when it does not answer."""
        # A dependant's redirect is its answer, not something to follow.
        kwargs = {"headers": dict(headers or {}), "allow_redirects": False}
        if data is not None:
            kwargs["data"] = data
        d = ensureDeferred(
            self.client._call(
                method, peer + path, timeout=self.timeout, expect=_ANY_STATUS, **kwargs
            )
        )
        d.addTimeout(self.timeout, self.clock)

        def answer(result):
            response, body = result
            headers = response.headers
            self._seen[peer] = ("up" if response.code < 500 else "failing", self.clock.seconds(), None)
            replicas = [
                (name, headers.getRawHeaders(name)[0])
                for name in _REPLICA_HEADERS
                if headers.hasHeader(name)
            ]
            return Answer(
                peer,
                response.code,
                (headers.getRawHeaders(b"etag") or [None])[0],
                (headers.getRawHeaders(b"content-type") or [None])[0],
                body,
                replicas,
            )

        def failed(failure):
            self._seen[peer] = ("down", self.clock.seconds(), _reason(failure, self.timeout))
            return failure

        return d.addCallbacks(answer, failed)

    def _forget(self, key):
        """A write or delete went through: drop the entry and what is being fetched."""
        self.lru.pop(key)
        fetch = self._fetches.get(key)
        if fetch is not None:
            fetch.invalidated = True

    def _keep(self, key, answer):
        if answer.etag:
            meta = Meta(answer.etag, answer.version, self.clock.seconds() + self.ttl)
            self.lru.put(key, answer.body, meta)

    # -- GET ----------------------------------------------------------------

    def _get(self, request, key, stale):
        # Each request waits on a Deferred of its own: one whose client
        # hangs up is cancelled alone, never the round the others wait for.
        waiter = Deferred()
        credential = _credential(request)
        fetch = self._fetches.get((key, credential))
        if fetch is not None:
            fetch.waiters.append(waiter)
        else:
            fetch = self._fetches[key, credential] = _Fetch()
            fetch.waiters.append(waiter)
            if stale is None:
                self.misses += 1
            else:
                self.revalidations += 1

            def finished(result):
                del self._fetches[key, credential]
                for w in fetch.waiters:
                    if w.called:
                        continue  # cancelled: its client went away
                    if isinstance(result, Failure):
                        w.errback(result)
                    else:
                        w.callback(result)
                return None

            ensureDeferred(
                self._fetch(key, stale, fetch, request.getHeader(b"authorization"), credential)
            ).addBoth(finished)
        d = waiter
        return d.addCallback(self._answer_get, request)

    async def _fetch(self, key, stale, fetch, authorization=None, credential=b""):
        """
        Ask every dependant; ``(data, meta, warning)`` to serve, or an
        L{Answer} to pass through.
        """
        collection, uid = key
        path = "/%s?local=1" % (record_path(collection, uid),)
        headers = {}
        if authorization is not None:
            headers[b"authorization"] = [authorization]
        if stale is not None:
            headers[b"if-none-match"] = [stale[1].etag]
        peers = self._peers()
        self._turn = (self._turn + 1) % len(peers)
        peers = peers[self._turn:] + peers[: self._turn]
        winner, outcomes = await self._hedged(peers, path, headers)
        codes = [o.code for o in outcomes if isinstance(o, Answer)]
        self._accept(credential, collection, 401 not in codes and 403 not in codes and (200 in codes or 304 in codes))
        if winner is not None and winner.code == 200 and winner.etag:
            if not fetch.invalidated:
                self._keep(key, winner)
            return winner.body, Meta(winner.etag, winner.version, 0), None
        if winner is not None and winner.code == 304 and stale is not None:
            self.not_modified += 1
            data, meta = stale
            if not fetch.invalidated:
                self.lru.put(key, data, Meta(meta.etag, meta.version, self.clock.seconds() + self.ttl))
            return data, meta, None
        if winner is not None:
            return winner
        answered = _answered(outcomes)
        for answer in answered:
            if answer.code != 404:
                return answer
        if answered:
            # Every dependant that answered misses it: gone, not cached.
            if not fetch.invalidated:
                self.lru.pop(key)
            return answered[0]
        if stale is not None and self.clock.seconds() < stale[1].expires + self.stale_if_error:
            self.stale_served += 1
            return stale[0], stale[1], STALE_WARNING
        self.errors += 1
        raise BadGateway(
            message=_why(peers, outcomes, self.timeout)
        )

    def _hedged(self, peers, path, headers):
        """
        GET from the first dependant alone; from the others too as soon as
        it has answered anything but 200 or 304, failed, or taken longer
        than ``hedge`` seconds.  Deferred ``(winner, outcomes)`` as L{_first}.
        """
        result = Deferred()
        outcomes = [None] * len(peers)
        left = [len(peers)]
        hedge = [None]

        def ask(i):
            self._call(peers[i], "GET", path, headers).addBoth(done, i)

        def ask_the_others():
            if hedge[0] is not None:
                if hedge[0].active():
                    hedge[0].cancel()
                for i in range(1, len(peers)):
                    ask(i)
                hedge[0] = None

        def done(outcome, i):
            outcomes[i] = outcome
            left[0] -= 1
            if result.called:
                return None
            if isinstance(outcome, Answer) and outcome.code in (200, 304):
                if hedge[0] is not None and hedge[0].active():
                    hedge[0].cancel()
                result.callback((outcome, outcomes))
            elif left[0] == 0:
                result.callback((None, outcomes))
            elif i == 0:
                ask_the_others()
            return None

        if len(peers) > 1:
            hedge[0] = self.clock.callLater(self.hedge, ask_the_others)
        ask(0)
        return result

    def _answer_get(self, result, request):
        if isinstance(result, Answer):
            return self._pass(request, result)
        data, meta, warning = result
        if warning is not None:
            request.responseHeaders.setRawHeaders(b"warning", [warning])
        return self._serve(request, data, meta)

    # -- POST, PUT and DELETE ------------------------------------------------

    async def _first_answer(self, method, path, headers=None, body=None):
        """
        The L{Answer} of the first dependant, in servers.list order, that
        answers below 500; BadGateway when none does.
        """
        peers = self._peers()
        outcomes = []
        for peer in peers:
            try:
                answer = await self._call(peer, method, path, headers, body)
            except Exception as e:
                self.log.info("{peer} did not take a {method}: {e}", peer=peer, method=method, e=e)
                outcomes.append(_Reason(e))
                continue
            outcomes.append(answer)
            if answer.code < 500:
                return answer
        self.errors += 1
        raise BadGateway(message=_why(peers, outcomes, self.timeout))

    @staticmethod
    def _write_path(request, collection, uid):
        # sync=1 is the dependant's to honour: it answers once its peers
        # (the other dependants) stored the write, saying how many did.
        sync = "?sync=1" if _flag(request.args, b"sync") else ""
        return "/" + record_path(collection, uid) + sync

    async def _write(self, request, key, value):
        collection, uid = key
        method = request.method.decode("ascii")
        headers = {b"content-type": [b"application/json"]}
        if_match = request.getHeader(b"if-match")
        if if_match is not None and method == "PUT":
            headers[b"if-match"] = [if_match]
        _with_authorization(request, headers)
        body = json.dumps({"value": value}, ensure_ascii=False).encode("utf-8")
        answer = await self._first_answer(method, self._write_path(request, collection, uid), headers, body)
        if answer.code == 200:
            self._forget(key)
            self._keep(key, answer)
            # A token that may write a collection may read it.
            self._accept(_credential(request), collection, True)
        elif answer.code in (404, 412):
            self._forget(key)
        return self._pass(request, answer)

    async def _delete(self, request, key):
        # Not local=1: a dependant that does not hold the record yet finds
        # it on the others (a lookup deletes it where it is).
        collection, uid = key
        headers = {}
        if_match = request.getHeader(b"if-match")
        if if_match is not None:
            headers[b"if-match"] = [if_match]
        _with_authorization(request, headers)
        answer = await self._first_answer("DELETE", self._write_path(request, collection, uid), headers)
        # A dependant answered: what it says (deleted, not there, or a 412)
        # outdates the entry.  When none did, the entry stays, to be served
        # stale (--cache-stale-if-error) like any other.
        self._forget(key)
        return self._pass(request, answer)

    # -- status and metrics ---------------------------------------------------

    def status(self):
        now = self.clock.seconds()
        dependants = []
        for peer in self.dependants():
            state, when, error = self._seen.get(peer, ("unknown", None, None))
            dependants.append(
                {
                    "url": peer,
                    "state": state,
                    "seconds_since_seen": None if when is None else round(now - when, 3),
                    "last_error": error,
                }
            )
        return {
            "dependants": dependants,
            "entries": len(self.lru),
            "bytes": self.lru.bytes,
            "max_bytes": self.lru.max_bytes,
            "ttl": self.ttl,
            "hits": self.hits,
            "misses": self.misses,
            "revalidations": self.revalidations,
            "not_modified": self.not_modified,
            "stale_served": self.stale_served,
            "evictions": self.lru.evictions,
            "errors": self.errors,
            }


class _Reason:
    """A failure to answer, kept beside the answers for the 502 message."""

    def __init__(self, exception):
        self.exception = exception

    def getErrorMessage(self):
        return str(self.exception) or type(self.exception).__name__


class _CacheCollector:
    """Prometheus collector of the front's counters (plain ints on the hot path)."""

    def __init__(self, front):
        self.front = front

    def collect(self):
        front = self.front
        yield GaugeMetricFamily("minstore_cache_entries", "Records held by the cache front.", value=len(front.lru))
        yield GaugeMetricFamily("minstore_cache_bytes", "Bytes of records held by the cache front.", value=front.lru.bytes)
        yield GaugeMetricFamily("minstore_cache_max_bytes", "The cache front's bound (--cache-size).", value=front.lru.max_bytes)
        counters = [
            ("hits", "GETs answered from a fresh cache entry, asking no dependant.", front.hits),
            ("misses", "GETs of a uid not in the cache, asked of the dependants.", front.misses),
            ("revalidations", "Stale entries revalidated with If-None-Match.", front.revalidations),
            ("not_modified", "Revalidations answered 304, renewing the entry.", front.not_modified),
            ("stale_served", "Stale entries served because no dependant answered.", front.stale_served),
            ("evictions", "Entries evicted to stay within --cache-size.", front.lru.evictions),
            ("errors", "Requests answered 502: no dependant answered.", front.errors),
        ]
        for name, text, value in counters:
            yield CounterMetricFamily("minstore_cache_" + name, text, value=value)


