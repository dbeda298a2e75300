"""
Who may ask a node what (DESIGN section 7).

* Clients: ``--tokens FILE``, one ``NAME SHA256HEX SCOPES`` a line.  Every
  route but ``GET /_node/health`` then needs ``Authorization: Bearer
  TOKEN`` whose scopes cover it: ``read:GLOB`` (GET of the collections the
  glob matches), ``write:GLOB`` (any method there, reads included),
  ``admin`` (everything: node routes, ``/metrics``, ``/_cluster/``).
* Nodes: ``--cluster-key FILE``, a shared secret.  Every request a
  L{minstore.cluster.peers.PeerClient} sends carries an HMAC-SHA256 over
  its method, path and query, a timestamp, a nonce and the body's digest;
  a node with the key answers an unsigned, badly signed, stale (+-300 s) or
  replayed ``/_cluster/`` request 401.  A good signature stands for the
  sender being a node of the cluster: it opens ``/_cluster/`` (no token
  needed) and passes protected mode on every route.
* Defaults: with no ``--tokens`` and no ``--insecure``, only loopback
  clients (and signed cluster requests) are answered; any other gets 403
  ``protected_mode``.  A request that would change data from a browser
  page of a foreign ``Origin`` gets 403 ``forbidden_origin``.

L{Guard} makes those decisions; L{GuardResource} is the site's root
resource that applies them before anything else sees the request.

``python -m minstore.auth new NAME SCOPES`` prints a fresh token and its
line for the tokens file; ``python -m minstore.auth cluster-key`` a fresh
cluster key.
"""

import fnmatch
import hashlib
import hmac
import ipaddress
import re
import secrets
import signal
import sys
from collections import OrderedDict
from typing import Tuple
from urllib.parse import unquote_to_bytes

import attr
from prometheus_client.core import CounterMetricFamily
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.resource import Resource

from minstore._util import json_response

#: Seconds a signed cluster request's timestamp may be off this node's clock.
CLUSTER_WINDOW = 300.0
#: Signatures remembered to refuse replays (see L{ClusterKey.verify}).
MAX_SEEN = 200000
#: Bytes of randomness of a token made by ``new`` (256 bits).
TOKEN_BYTES = 32

TIMESTAMP = b"minstore-timestamp"
NONCE = b"minstore-nonce"
SIGNATURE = b"minstore-signature"

_SAFE_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS"])
_CHALLENGE = b'Bearer realm="minstore"'


class AuthFileError(Exception):
    """A tokens or key file that cannot be used; the text names file and line."""


# -- tokens ---------------------------------------------------------------


def parse_scopes(text):
    """
    ``[(kind, glob)]`` of a comma-separated scope list: ``read:GLOB``,
    ``write:GLOB`` or ``admin`` (``("admin", "*")``).  ValueError when bad.
    """
    scopes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "admin":
            scopes.append(("admin", "*"))
            continue
        kind, sep, glob = item.partition(":")
        if not sep or kind not in ("read", "write") or not glob or any(c.isspace() for c in glob):
            raise ValueError("bad scope %r (read:GLOB, write:GLOB or admin)" % (item,))
        scopes.append((kind, glob))
    if not scopes:
        raise ValueError("no scope (read:GLOB, write:GLOB or admin)")
    return scopes


def format_scopes(scopes):
    return ",".join("admin" if kind == "admin" else "%s:%s" % (kind, glob) for kind, glob in scopes)


def _scope_matchers(token):
    return tuple(re.compile(fnmatch.translate(glob), re.DOTALL).match for _, glob in token.scopes)


@attr.s(frozen=True, slots=True)
class Token:
    """One line of the tokens file: a name, the token's SHA-256, its scopes."""

    name = attr.ib()
    digest = attr.ib(repr=False)
    #: ``(kind, collection glob)`` pairs (L{parse_scopes}).
    scopes: Tuple[Tuple[str, str], ...] = attr.ib(converter=tuple)
    _match = attr.ib(init=False, eq=False, repr=False, default=attr.Factory(_scope_matchers, takes_self=True))

    def allows(self, kind, collection=None):
        """
        Whether the token covers ``kind`` (``read``, ``write``, ``admin``, or
        None: any valid token) on ``collection``.
        """
        for (have, _), match in zip(self.scopes, self._match):
            if have == "admin":
                return True
            if kind is None:
                return True
            if kind == "admin":
                continue
            if (have == "write" or have == kind) and match(collection):
                return True
        return False


class TokenSet:
    """The tokens of one tokens file."""

    def __init__(self, tokens, path=None):
        self.tokens = list(tokens)
        self.path = path

    def __len__(self):
        return len(self.tokens)

    def find(self, presented):
        """
        The L{Token} whose digest is the SHA-256 of ``presented`` (bytes), or
        None.  Every digest is compared, in constant time each.
        """
        digest = hashlib.sha256(presented).digest()
        found = None
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        return found


def parse_tokens(text, path="<tokens>"):
    """A L{TokenSet} from the text of a tokens file; AuthFileError naming the line."""
    tokens = []
    names = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = "%s:%d" % (path, number)
        parts = line.split()
        if len(parts) != 3:
            raise AuthFileError("%s: expected NAME SHA256HEX SCOPES, got %d fields" % (where, len(parts)))
        name, digest, scopes = parts
        if len(digest) != 64:
            raise AuthFileError("%s: %s: the digest is not 64 hex digits (the SHA-256 of the token)" % (where, name))
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raise AuthFileError("%s: %s: the digest is not 64 hex digits (the SHA-256 of the token)" % (where, name))
        try:
            scope_list = parse_scopes(scopes)
        except ValueError as e:
            raise AuthFileError("%s: %s: %s" % (where, name, e))
        if name in names:
            raise AuthFileError("%s: the name %s is used twice" % (where, name))
        names.add(name)
        tokens.append(Token(name, raw, scope_list))
    return TokenSet(tokens, path)


def read_tokens(path):
    """Read a tokens file (blocking: at start and on SIGHUP only)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthFileError("%s: cannot read: %s" % (path, getattr(e, "strerror", None) or e))
    return parse_tokens(text, path)


def new_token(name, scopes):
    """``(token, line)``: a fresh random token and its tokens-file line."""
    if not name or any(c.isspace() for c in name) or name.startswith("#"):
        raise ValueError("a token name is one word, not starting with #")
    scope_list = parse_scopes(scopes)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    digest = hashlib.sha256(token.encode("ascii")).hexdigest()
    return token, "%s %s %s" % (name, digest, format_scopes(scope_list))


def required_scope(method, path, accept=b""):
    """
    ``(kind, collection)`` a request needs: kind ``read``, ``write``,
    ``admin``, None (any valid token), or ``"open"`` (no token at all).
    """
    if path == b"/_node/health" and method in (b"GET", b"HEAD"):
        return "open", None
    if path == b"/" or path == b"":
        # The console is a static page; it asks for a token when the API
        # answers 401.  The JSON answer (collections) needs a token.
        if method in (b"GET", b"HEAD") and b"text/html" in (accept or b""):
            return "open", None
        return None, None
    if path == b"/openapi.json":
        return None, None
    segment = path.split(b"/", 2)[1]
    if segment == b"metrics" and path == b"/metrics" or segment.startswith(b"_"):
        return "admin", None
    try:
        collection = unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        collection = segment.decode("latin-1")
    return ("read" if method in (b"GET", b"HEAD") else "write"), collection


# -- the cluster key ------------------------------------------------------


def read_cluster_key(path):
    """The secret of a cluster key file (its text, stripped); AuthFileError."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise AuthFileError("%s: cannot read: %s" % (path, e.strerror or e))
    if len(key) < 32:
        raise AuthFileError(
            "%s:1: a cluster key is at least 32 characters (python -m minstore.auth cluster-key makes one)" % path
        )
    return key


def _message(method, target, timestamp, nonce, body):
    return b"\n".join(
        [b"minstore-v1", method, target, timestamp, nonce, hashlib.sha256(body).hexdigest().encode()]
    )


class ClusterKey:
    """Signs this node's requests to peers and verifies the requests of peers."""

    def __init__(self, key, clock, window=CLUSTER_WINDOW, max_seen=MAX_SEEN):
        self._key = key
        self.clock = clock
        self.window = window
        self.max_seen = max_seen
        self._seen = OrderedDict()  # signature -> timestamp
        #: No request older than this is taken: a replay of a signature
        #: dropped from the full seen set would go unnoticed.
        self._floor = float("-inf")

    def sign(self, method, target, body=b""):
        """The headers of a signed request (method and target bytes, target = path?query)."""
        timestamp = (b"%.3f" % self.clock.seconds())
        nonce = secrets.token_hex(12).encode()
        mac = hmac.new(self._key, _message(method, target, timestamp, nonce, body), hashlib.sha256)
        return {TIMESTAMP: [timestamp], NONCE: [nonce], SIGNATURE: [mac.hexdigest().encode()]}

    def verify(self, method, target, headers, body):
        """
        None when the request is signed well, once, and recently; else the
        reason: ``unsigned``, ``bad_signature``, ``stale`` or ``replayed``.
        ``headers`` is the request's Headers.
        """
        timestamp = headers.getRawHeaders(TIMESTAMP)
        nonce = headers.getRawHeaders(NONCE)
        signature = headers.getRawHeaders(SIGNATURE)
        if not (timestamp and nonce and signature):
            return "unsigned"
        timestamp, nonce, signature = timestamp[0], nonce[0], signature[0]
        expected = hmac.new(self._key, _message(method, target, timestamp, nonce, body), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest().encode(), signature):
            return "bad_signature"
        try:
            when = float(timestamp)
        except ValueError:
            return "bad_signature"
        now = self.clock.seconds()
        if not abs(now - when) <= self.window:
            return "stale"
        if when <= self._floor:
            return "stale"
        if signature in self._seen:
            return "replayed"
        self._remember(signature, when, now)
        return None

    def _remember(self, signature, when, now):
        seen = self._seen
        # Forget signatures whose timestamps are out of the window anyway
        # (entries arrive in about timestamp order).
        while seen:
            oldest, at = next(iter(seen.items()))
            if at >= now - self.window:
                break
            del seen[oldest]
        while len(seen) >= self.max_seen:
            _, at = seen.popitem(last=False)
            self._floor = max(self._floor, at)
        seen[signature] = when


# -- the decisions --------------------------------------------------------


_LOOPBACK: "dict[str, bool]" = {}  # host text -> bool (parsing an address costs more than the rest of a check)


def _is_loopback(address):
    if isinstance(address, (IPv4Address, IPv6Address)):
        known = _LOOPBACK.get(address.host)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
            if getattr(ip, "ipv4_mapped", None) is not None:
                ip = ip.ipv4_mapped
            known = ip.is_loopback
        except ValueError:
            known = False
        if len(_LOOPBACK) > 4096:
            _LOOPBACK.clear()
        _LOOPBACK[address.host] = known
        return known
    # UNIX sockets (and in-memory transports without an address) are local.
    return address is None or getattr(address, "type", None) not in ("TCP", "UDP")


class Refusal(Exception):
    def __init__(self, code, error, message, reason, challenge=False):
        Exception.__init__(self, message)
        self.code = code
        self.error = error
        self.message = message
        self.reason = reason
        self.challenge = challenge


class Guard:
    """
    Decides whether a request may reach the API.

    @param tokens: a L{TokenSet}, or None (protected mode unless ``insecure``).
    @param cluster_key: a L{ClusterKey}, or None.
    @param insecure: without tokens, answer every client, not only loopback ones.
    @param allow_origins: browser origins (``scheme://host[:port]``) besides
        the node's own whose pages may change data.
    """

    log = Logger()

    def __init__(self, tokens=None, cluster_key=None, insecure=False, allow_origins=()):
        self.tokens = tokens
        self.cluster_key = cluster_key
        self.insecure = insecure
        self.allow_origins = frozenset(o.rstrip("/").lower().encode() for o in allow_origins)
        self.refused = {}
        self.peers = None  # a PeerClient, to show the peers that refuse this node

    def mode(self):
        if self.tokens is not None:
            return "tokens"
        return "insecure" if self.insecure else "protected"

    def describe(self):
        text = {
            "tokens": "bearer tokens required (%d in %s)" % (len(self.tokens or ()), getattr(self.tokens, "path", None)),
            "insecure": "INSECURE: no authentication, every client answered (--insecure)",
            "protected": "protected mode: loopback clients only (no --tokens)",
        }[self.mode()]
        if self.cluster_key is not None:
            text += "; cluster requests signed with --cluster-key"
        return text

    def check(self, request):
        """Raise L{Refusal} when the request may not go further."""
        method = request.method
        if self.tokens is None and self.cluster_key is None and method in _SAFE_METHODS:
            # No tokens, no key, a read: whatever the route, the client's
            # address (or --insecure) is all that can refuse it, so a
            # loopback client passes without the route's scope worked out
            # (4 % of a cached GET's instructions).
            if self.insecure or _is_loopback(request.getClientAddress()):
                return
        path = request.path
        kind, collection = required_scope(method, path, request.getHeader(b"accept") if path == b"/" else b"")
        if kind == "open":
            return
        if method not in _SAFE_METHODS:
            self._check_origin(request)
        cluster_route = path.startswith(b"/_cluster/") or path == b"/_cluster"
        signed = False
        if self.cluster_key is not None and (
            cluster_route or request.requestHeaders.hasHeader(SIGNATURE)
        ):
            content = request.content
            content.seek(0)
            body = content.read()
            content.seek(0)
            why = self.cluster_key.verify(method, request.uri, request.requestHeaders, body)
            if why is not None:
                raise Refusal(
                    401,
                    "unauthorized",
                    "cluster request refused: %s (both nodes need the same --cluster-key "
                    "and clocks within %ds)" % (why.replace("_", " "), self.cluster_key.window),
                    "cluster_" + why,
                )
            signed = True
            if cluster_route:
                return
        if self.tokens is None:
            if not (signed or self.insecure or _is_loopback(request.getClientAddress())):
                raise Refusal(
                    403,
                    "protected_mode",
                    "this node has no --tokens, so it answers only loopback clients: start it "
                    "with --tokens FILE (make tokens with python -m minstore.auth new NAME SCOPES), "
                    "or with --insecure to answer every client without authentication",
                    "protected_mode",
                )
            return
        header = request.getHeader(b"authorization")
        token = None
        if header is not None:
            scheme, _, presented = header.partition(b" ")
            if scheme.lower() == b"bearer" and presented.strip():
                token = self.tokens.find(presented.strip())
        if token is None:
            raise Refusal(
                401,
                "unauthorized",
                "send Authorization: Bearer TOKEN"
                if header is None
                else "the token is not one of this node's (--tokens)",
                "unauthorized",
                challenge=True,
            )
        if not token.allows(kind, collection):
            scope = "admin" if kind == "admin" else "%s:%s" % (kind, collection)
            raise Refusal(
                403,
                "forbidden",
                "the token %s does not have the scope %s" % (token.name, scope),
                "forbidden",
            )

    def _check_origin(self, request):
        origin = request.getHeader(b"origin")
        if origin is None:
            if (request.getHeader(b"sec-fetch-site") or b"").lower() == b"cross-site":
                origin = b"(cross-site)"
            else:
                return
        origin = origin.rstrip(b"/").lower()
        own = (b"https://" if request.isSecure() else b"http://") + (request.getHeader(b"host") or b"").lower()
        if origin == own or origin in self.allow_origins:
            return
        raise Refusal(
            403,
            "forbidden_origin",
            "a page of %s may not change data on this node (allowed: its own origin%s; "
            "add others with --allow-origin)" % (
                origin.decode("latin-1"),
                "".join(", " + o.decode() for o in sorted(self.allow_origins)),
            ),
            "origin",
        )

    def count(self, reason):
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def reload(self):
        """Re-read the tokens file; a bad file is logged and the old tokens kept."""
        if self.tokens is None or self.tokens.path is None:
            return False
        try:
            tokens = read_tokens(self.tokens.path)
        except AuthFileError as e:
            self.log.error("SIGHUP: keeping the current tokens: {error}", error=str(e))
            return False
        self.tokens = tokens
        self.log.info("SIGHUP: re-read {path}: {n} tokens", path=tokens.path, n=len(tokens))
        return True

    def status(self):
        section = {
            "mode": self.mode(),
            "tokens": len(self.tokens) if self.tokens is not None else None,
            "cluster_key": self.cluster_key is not None,
            "refused": dict(self.refused),
        }
        if self.peers is not None:
            section["refused_by_peers"] = self.peers.refusals()
        return section

    def attach(self, node):
        node.status_sections["security"] = self.status
        node.metrics.registry.register(_GuardCollector(self))


class _GuardCollector:
    REASONS = (
        "unauthorized",
        "forbidden",
        "protected_mode",
        "origin",
        "cluster_unsigned",
        "cluster_bad_signature",
        "cluster_stale",
        "cluster_replayed",
    )

    def __init__(self, guard):
        self.guard = guard

    def collect(self):
        family = CounterMetricFamily(
            "minstore_auth_refused",
            "Requests refused before the API: no or bad token (unauthorized), missing scope "
            "(forbidden), protected mode, foreign Origin, or a cluster request unsigned, "
            "badly signed, stale or replayed.",
            labels=["reason"],
        )
        for reason in self.REASONS:
            family.add_metric([reason], self.guard.refused.get(reason, 0))
        yield family


class GuardResource(Resource):
    """The site's root: L{Guard.check} first, then ``inner``."""

    isLeaf = True

    def __init__(self, guard, inner):
        Resource.__init__(self)
        self.guard = guard
        self.inner = inner

    def render(self, request):
        try:
            self.guard.check(request)
        except Refusal as r:
            self.guard.count(r.reason)
            if r.challenge:
                request.setHeader(b"www-authenticate", _CHALLENGE)
            # The body may be unread: do not keep the connection for more.
            return json_response(request, r.code, {"error": r.error, "message": r.message})
        return self.inner.render(request)


class TokensService(Service):
    """Re-reads the tokens file on SIGHUP (after any handler installed before)."""

    def __init__(self, guard, reactor):
        self.guard = guard
        self.reactor = reactor
        self._previous = None
        self._installed = False

    def startService(self):
        Service.startService(self)
        if self.guard.tokens is not None and hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._sighup)
            self._installed = True

    def _sighup(self, signum, frame):
        self.reactor.callFromThread(self.guard.reload)
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self):
        Service.stopService(self)
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


# -- options ------------------------------------------------------------------


def read_security_options(config):
    """
    The files of the security options of ``twistd minstore`` read and
    checked: a dict of ``tokens`` (a TokenSet or None), ``cluster_key``
    (bytes or None), ``peer_tls`` (an IPolicyForHTTPS or None) and
    ``allow_origins`` (a list).  AuthFileError or TLSConfigError naming
    the option and file.
    """
    from minstore import tls

    result = {"tokens": None, "cluster_key": None, "peer_tls": None, "allow_origins": []}
    for option, reader, name in (("tokens", read_tokens, "tokens"), ("cluster-key", read_cluster_key, "cluster_key")):
        if config.get(option):
            try:
                result[name] = reader(config[option])
            except AuthFileError as e:
                raise AuthFileError("--%s: %s" % (option, e))
    try:
        result["peer_tls"] = tls.peer_policy(config.get("peer-ca"), config.get("peer-cert"), config.get("peer-key"))
        if config.get("client-ca"):
            if not config["port"].startswith("ssl:"):
                raise tls.TLSConfigError("needs an ssl: --port (ssl:8443:privateKey=key.pem:certKey=cert.pem)")
            tls.load_ca(config["client-ca"])
    except tls.TLSConfigError as e:
        raise tls.TLSConfigError("TLS options: %s" % (e,))
    for origin in (config.get("allow-origin") or "").split(","):
        origin = origin.strip()
        if not origin:
            continue
        if not (origin.startswith("http://") or origin.startswith("https://")) or "/" in origin.split("://", 1)[1].rstrip("/"):
            raise AuthFileError("--allow-origin: %r is not an origin (scheme://host[:port])" % origin)
        result["allow_origins"].append(origin)
    return result


# -- the command line -------------------------------------------------------

USAGE = """\
usage: python -m minstore.auth new NAME SCOPES
       python -m minstore.auth cluster-key

new          print a fresh token (give it to the client; it is not stored)
             and its line for the --tokens file.  SCOPES: comma-separated
             read:GLOB, write:GLOB (write implies read), admin.
cluster-key  print a fresh secret for --cluster-key (the same file on every node).
"""


def main(argv=None, out=None):
    argv = sys.argv[1:] if argv is None else argv
    out = out or sys.stdout
    if len(argv) == 3 and argv[0] == "new":
        try:
            token, line = new_token(argv[1], argv[2])
        except ValueError as e:
            sys.stderr.write("minstore.auth: %s\n" % (e,))
            return 2
        out.write("token: %s\n" % token)
        out.write("# add this line to the --tokens file, then SIGHUP the node:\n%s\n" % line)
        return 0
    if argv == ["cluster-key"]:
        out.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
