"""
Authentication and request checks (DESIGN section 7), in memory: bearer
tokens and scopes, protected mode, Origin checks, signed cluster requests,
and what a node shows when its peers refuse it.
"""

import hashlib
import io
import json
import os
import signal

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from minstore import auth
from minstore.api import RecordAPI
from minstore.auth import (
    AuthFileError,
    ClusterKey,
    Guard,
    GuardResource,
    TokensService,
    new_token,
    parse_tokens,
    read_tokens,
)
from minstore.cluster.lookup import Lookups
from minstore.cluster.peers import PeerClient, PeerError
from minstore.node import Node
from minstore.storage.memory import MemoryStorage
from minstore.testing.fakes import FakeNetwork

KEY = b"k" * 40
OTHER_KEY = b"o" * 40
A = "http://127.0.0.1:9001"
B = "http://127.0.0.1:9002"


class FromAddress(Resource):
    """Makes every request come from ``host`` (StubTreq's client is 127.0.0.1)."""

    isLeaf = True

    def __init__(self, inner, host):
        Resource.__init__(self)
        self.inner = inner
        self.host = host

    def render(self, request):
        kind = IPv6Address if ":" in self.host else IPv4Address
        request.client = kind("TCP", self.host, 40000)
        return self.inner.render(request)


class Tokens:
    """Three tokens and the file text naming them."""

    def __init__(self):
        self.reader, reader_line = new_token("reader", "read:books")
        self.writer, writer_line = new_token("writer", "write:b*")
        self.admin, admin_line = new_token("root", "admin")
        self.text = "# tokens\n\n%s\n%s\n%s\n" % (reader_line, writer_line, admin_line)


def bearer(token):
    return {b"authorization": [b"Bearer " + token.encode()]}


class GuardTestCase(SynchronousTestCase):
    def make(self, tokens=None, key=None, insecure=False, allow_origins=(), client="127.0.0.1", clock=None):
        self.clock = clock or Clock()
        self.clock.advance(1000000)
        self.node = Node(MemoryStorage(), node_id="n1")
        self.node.open()
        cluster_key = ClusterKey(key, self.clock) if key else None
        self.guard = Guard(tokens, cluster_key, insecure, allow_origins)
        self.guard.attach(self.node)
        lookups = Lookups(self.node, lambda: [], PeerClient(FakeNetwork(), "n1"), self.clock, timeout=1)
        self.api = RecordAPI(self.node, lookups=lookups)
        resource = GuardResource(self.guard, self.api.resource())
        if client != "127.0.0.1":
            resource = FromAddress(resource, client)
        self.http = StubTreq(resource)

    def call(self, method, path, headers=None, data=None, json_body=None):
        headers = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers[b"content-type"] = [b"application/json"]
        d = self.http.request(method, "http://node.test:8001" + path, headers=headers, data=data)
        self.http.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, response.headers, body

    def error(self, method, path, **kwargs):
        code, headers, body = self.call(method, path, **kwargs)
        return code, json.loads(body)

    def metric(self, reason):
        text = self.node.metrics.exposition().decode()
        for line in text.splitlines():
            if line.startswith('minstore_auth_refused_total{reason="%s"}' % reason):
                return float(line.split()[-1])
        raise AssertionError("no metric for %s in:\n%s" % (reason, text))


class TokensFileTests(SynchronousTestCase):
    def test_lines_comments_and_scopes(self):
        """Each line is NAME SHA256HEX SCOPES; # comments and blank lines are skipped."""
        digest = hashlib.sha256(b"secret").hexdigest()
        tokens = parse_tokens("# who\n\nci %s read:books,write:logs-*\nops %s admin # no\n".replace(" # no", "") % (digest, "0" * 64))
        self.assertEqual([t.name for t in tokens.tokens], ["ci", "ops"])
        self.assertEqual(tokens.find(b"secret").name, "ci")
        self.assertIsNone(tokens.find(b"Secret"))
        ci = tokens.tokens[0]
        self.assertTrue(ci.allows("read", "books"))
        self.assertFalse(ci.allows("write", "books"))
        self.assertTrue(ci.allows("write", "logs-2026"))
        self.assertTrue(ci.allows("read", "logs-2026"))  # write implies read
        self.assertFalse(ci.allows("read", "logs"))
        self.assertFalse(ci.allows("admin"))
        self.assertTrue(tokens.tokens[1].allows("admin"))

    def test_bad_lines_name_file_and_line(self):
        """A bad line stops with the file and line number and what is wrong."""
        digest = hashlib.sha256(b"x").hexdigest()
        cases = [
            ("a %s\n" % digest, "tokens.txt:1: expected NAME SHA256HEX SCOPES"),
            ("# c\na abc read:x\n", "tokens.txt:2: a: the digest is not 64 hex"),
            ("a %s read:x\n" % ("z" * 64), "tokens.txt:1: a: the digest is not 64 hex"),
            ("a %s read\n" % digest, "tokens.txt:1: a: bad scope 'read'"),
            ("a %s delete:x\n" % digest, "tokens.txt:1: a: bad scope 'delete:x'"),
            ("a %s admin\na %s admin\n" % (digest, digest), "tokens.txt:2: the name a is used twice"),
        ]
        for text, message in cases:
            with self.assertRaises(AuthFileError) as caught:
                parse_tokens(text, "tokens.txt")
            self.assertIn(message, str(caught.exception), text)

    def test_unreadable_file(self):
        with self.assertRaises(AuthFileError) as caught:
            read_tokens(os.path.join(self.mktemp(), "none"))
        self.assertIn("cannot read", str(caught.exception))

    def test_new_token(self):
        """new: a fresh token of 32 random bytes; its line holds only its SHA-256."""
        token, line = new_token("ci", "read:books, write:logs")
        other, _ = new_token("ci", "admin")
        self.assertNotEqual(token, other)
        self.assertGreaterEqual(len(token), 43)  # 32 bytes, base64url
        name, digest, scopes = line.split()
        self.assertEqual((name, scopes), ("ci", "read:books,write:logs"))
        self.assertEqual(digest, hashlib.sha256(token.encode()).hexdigest())
        self.assertNotIn(token, line)
        self.assertEqual(parse_tokens(line).find(token.encode()).name, "ci")

    def test_command_line(self):
        """python -m minstore.auth new NAME SCOPES prints the token and its line."""
        import sys

        self.patch(sys, "stderr", io.StringIO())
        out = io.StringIO()
        self.assertEqual(auth.main(["new", "ci", "write:books"], out=out), 0)
        lines = out.getvalue().splitlines()
        token = lines[0].split(": ", 1)[1]
        self.assertEqual(parse_tokens(lines[-1]).find(token.encode()).name, "ci")
        self.assertEqual(auth.main(["new", "ci", "nope"], out=io.StringIO()), 2)
        out = io.StringIO()
        self.assertEqual(auth.main(["cluster-key"], out=out), 0)
        self.assertGreaterEqual(len(out.getvalue().strip()), 43)

    def test_constant_time_comparison(self):
        """Every digest is compared with hmac.compare_digest, never ==."""
        calls = []
        real = auth.hmac.compare_digest
        self.patch(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
        tokens = parse_tokens(Tokens().text)
        self.assertIsNone(tokens.find(b"wrong"))
        self.assertEqual(len(calls), 3)
        self.assertEqual(calls[0][0], hashlib.sha256(b"wrong").digest())


class TokenTests(GuardTestCase):
    def setUp(self):
        self.tokens = Tokens()
        self.make(tokens=parse_tokens(self.tokens.text, "tokens.txt"))

    def test_no_token_is_401_with_a_challenge(self):
        code, headers, body = self.call("GET", "/books/1")
        self.assertEqual(code, 401)
        self.assertEqual(json.loads(body)["error"], "unauthorized")
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="minstore"'])
        self.assertEqual(self.metric("unauthorized"), 1)

    def test_unknown_token_is_401(self):
        for header in (b"Bearer nope", b"Basic " + self.tokens.admin.encode(), b"Bearer "):
            code, body = self.error("GET", "/books/", headers={b"authorization": [header]})
            self.assertEqual((code, body["error"]), (401, "unauthorized"), header)

    def test_read_scope(self):
        """read:books reads books, not other collections; cannot write."""
        self.call("POST", "/books/1", headers=bearer(self.tokens.admin), json_body={"value": 1})
        self.assertEqual(self.call("GET", "/books/1", headers=bearer(self.tokens.reader))[0], 200)
        self.assertEqual(self.call("GET", "/books/", headers=bearer(self.tokens.reader))[0], 200)
        code, body = self.error("GET", "/cats/1", headers=bearer(self.tokens.reader))
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        self.assertIn("read:cats", body["message"])
        code, body = self.error("POST", "/books/2", headers=bearer(self.tokens.reader), json_body={"value": 2})
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        self.assertIn("write:books", body["message"])
        self.assertEqual(self.metric("forbidden"), 2)

    def test_write_scope_glob_implies_read(self):
        """write:b* writes and reads every collection starting with b, no other."""
        self.assertEqual(self.call("POST", "/books/1", headers=bearer(self.tokens.writer), json_body={"value": 1})[0], 200)
        self.assertEqual(self.call("GET", "/books/1", headers=bearer(self.tokens.writer))[0], 200)
        self.assertEqual(self.call("DELETE", "/bikes/1", headers=bearer(self.tokens.writer))[0], 404)
        code, body = self.error("PUT", "/cats/1", headers=bearer(self.tokens.writer), json_body={"value": 1})
        self.assertEqual(code, 403)
        self.assertIn("write:cats", body["message"])

    def test_node_routes_need_admin(self):
        for path in ("/_node/status", "/metrics", "/_cluster/lookup/books/1"):
            code, body = self.error("GET", path, headers=bearer(self.tokens.writer))
            self.assertEqual(code, 403, path)
            self.assertIn("admin", body["message"])
        self.assertEqual(self.call("GET", "/_node/status", headers=bearer(self.tokens.admin))[0], 200)
        self.assertEqual(self.call("GET", "/metrics", headers=bearer(self.tokens.admin))[0], 200)

    def test_health_and_console_are_open(self):
        """GET /_node/health and the HTML console need no token; the JSON root does."""
        self.assertEqual(self.call("GET", "/_node/health")[0], 200)
        code, headers, body = self.call("GET", "/", headers={b"accept": [b"text/html"]})
        self.assertEqual(code, 200)
        self.assertIn(b"<html", body.lower())
        self.assertEqual(self.call("GET", "/")[0], 401)
        self.assertEqual(self.call("GET", "/", headers=bearer(self.tokens.reader))[0], 200)
        self.assertEqual(self.call("POST", "/_node/health")[0], 401)

    def test_tokens_never_logged(self):
        """No log event holds a token, whatever the outcome."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.call("GET", "/books/1", headers=bearer(self.tokens.reader))
        self.call("GET", "/cats/1", headers=bearer(self.tokens.reader))
        self.call("GET", "/books/1", headers=bearer(self.tokens.reader + "x"))
        self.call("GET", "/books/1", headers={b"authorization": [b"Bearer"]})
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        for token in (self.tokens.reader, self.tokens.reader + "x"):
            self.assertNotIn(token, text)

    def test_status_shows_mode_and_refusals(self):
        self.call("GET", "/books/1")
        status = json.loads(self.call("GET", "/_node/status", headers=bearer(self.tokens.admin))[2])
        self.assertEqual(status["security"]["mode"], "tokens")
        self.assertEqual(status["security"]["tokens"], 3)
        self.assertEqual(status["security"]["refused"], {"unauthorized": 1})


class ReloadTests(GuardTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.first = Tokens()
        with open(self.path, "w") as f:
            f.write(self.first.text)
        self.make(tokens=read_tokens(self.path))

    def test_reload_takes_the_new_file(self):
        second = Tokens()
        with open(self.path, "w") as f:
            f.write(second.text)
        self.assertTrue(self.guard.reload())
        self.assertEqual(self.call("GET", "/books/", headers=bearer(second.reader))[0], 200)
        self.assertEqual(self.call("GET", "/books/", headers=bearer(self.first.reader))[0], 401)

    def test_bad_file_keeps_the_old_tokens(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        with open(self.path, "w") as f:
            f.write("broken line\n")
        self.assertFalse(self.guard.reload())
        self.assertEqual(self.call("GET", "/books/", headers=bearer(self.first.reader))[0], 200)
        self.assertTrue(any("keeping the current tokens" in formatEvent(e) and ":1:" in formatEvent(e) for e in events))

    def test_sighup_reloads_and_chains(self):
        """The service's SIGHUP handler re-reads the tokens and calls the handler installed before."""
        seen = []
        previous = signal.signal(signal.SIGHUP, lambda s, f: seen.append("servers"))
        self.addCleanup(signal.signal, signal.SIGHUP, previous)

        class Reactor:
            def callFromThread(self, f, *args):
                f(*args)

        service = TokensService(self.guard, Reactor())
        service.startService()
        second = Tokens()
        with open(self.path, "w") as f:
            f.write(second.text)
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        self.assertEqual(seen, ["servers"])
        self.assertEqual(self.call("GET", "/books/", headers=bearer(second.reader))[0], 200)
        service.stopService()
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)
        self.assertEqual(seen, ["servers", "servers"])  # the old handler is back


class ProtectedModeTests(GuardTestCase):
    def test_loopback_clients_answered(self):
        for host in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"):
            self.make(client=host)
            self.assertEqual(self.call("POST", "/books/1", json_body={"value": 1})[0], 200, host)

    def test_other_clients_refused(self):
        for host in ("10.0.0.5", "2001:db8::1", "::ffff:10.0.0.5"):
            self.make(client=host)
            code, body = self.error("GET", "/books/1")
            self.assertEqual((code, body["error"]), (403, "protected_mode"), host)
            self.assertIn("--tokens", body["message"])
            self.assertIn("--insecure", body["message"])
            self.assertEqual(self.call("GET", "/_node/health")[0], 200)
        self.assertEqual(self.metric("protected_mode"), 1)

    def test_insecure_answers_everybody(self):
        self.make(client="10.0.0.5", insecure=True)
        self.assertEqual(self.call("POST", "/books/1", json_body={"value": 1})[0], 200)
        self.assertEqual(self.guard.mode(), "insecure")

    def test_signed_requests_from_anywhere(self):
        """A request signed with the cluster key passes protected mode, on any route."""
        self.make(client="10.0.0.5", key=KEY)
        signer = ClusterKey(KEY, self.clock)
        headers = signer.sign(b"GET", b"/_cluster/lookup/books/1?visited=x")
        self.assertEqual(self.call("GET", "/_cluster/lookup/books/1?visited=x", headers=headers)[0], 404)
        headers = signer.sign(b"GET", b"/books/")
        self.assertEqual(self.call("GET", "/books/", headers=headers)[0], 200)
        self.assertEqual(self.error("GET", "/books/")[1]["error"], "protected_mode")

    def test_tokens_end_protected_mode(self):
        tokens = Tokens()
        self.make(tokens=parse_tokens(tokens.text), client="10.0.0.5")
        self.assertEqual(self.call("GET", "/books/", headers=bearer(tokens.reader))[0], 200)


class OriginTests(GuardTestCase):
    def setUp(self):
        self.make(insecure=True, allow_origins=["https://app.example.com"])

    def test_foreign_origin_cannot_change_data(self):
        """A cross-site form POST (the CSRF of a page the user visits) is refused."""
        for method in ("POST", "PUT", "DELETE"):
            code, body = self.error(
                method,
                "/books/1",
                headers={b"origin": [b"http://evil.example"], b"content-type": [b"application/x-www-form-urlencoded"]},
                data=b"value=pwned",
            )
            self.assertEqual((code, body["error"]), (403, "forbidden_origin"), method)
            self.assertIn("--allow-origin", body["message"])
        self.assertEqual(self.node.storage.count(), 0)
        code, body = self.error("POST", "/books/1", headers={b"sec-fetch-site": [b"cross-site"]}, json_body={"value": 1})
        self.assertEqual(code, 403)
        self.assertEqual(self.error("POST", "/books/1", headers={b"origin": [b"null"]}, json_body={"value": 1})[0], 403)
        self.assertEqual(self.metric("origin"), 5)

    def test_own_and_allowed_origins(self):
        own = {b"origin": [b"http://node.test:8001"]}
        self.assertEqual(self.call("POST", "/books/1", headers=own, json_body={"value": 1})[0], 200)
        allowed = {b"origin": [b"https://app.example.com"]}
        self.assertEqual(self.call("PUT", "/books/1", headers=allowed, json_body={"value": 2})[0], 200)

    def test_foreign_origin_may_read(self):
        self.assertEqual(self.call("GET", "/books/", headers={b"origin": [b"http://evil.example"]})[0], 200)


class ClusterKeyTests(GuardTestCase):
    def setUp(self):
        self.make(key=KEY, insecure=True)
        self.signer = ClusterKey(KEY, self.clock)
        self.body = b'{"collection":"books","uid":"1","value":1,"version":"x"}\n'

    def replicas(self, headers=None, body=None):
        return self.error("POST", "/_cluster/replicas", headers=headers, data=self.body if body is None else body)

    def test_unsigned_refused(self):
        code, body = self.replicas()
        self.assertEqual((code, body["error"]), (401, "unauthorized"))
        self.assertIn("unsigned", body["message"])
        self.assertEqual(self.metric("cluster_unsigned"), 1)
        # Also with a token that would be admin elsewhere: the key is what counts.
        self.assertEqual(self.error("GET", "/_cluster/lookup/books/1")[0], 401)

    def test_good_signature_accepted(self):
        code, _ = self.replicas(self.signer.sign(b"POST", b"/_cluster/replicas", self.body), self.body)
        self.assertNotEqual(code, 401)

    def test_wrong_key_refused(self):
        headers = ClusterKey(OTHER_KEY, self.clock).sign(b"POST", b"/_cluster/replicas", self.body)
        code, body = self.replicas(headers)
        self.assertEqual(code, 401)
        self.assertIn("bad signature", body["message"])
        self.assertEqual(self.metric("cluster_bad_signature"), 1)

    def test_tampered_request_refused(self):
        """Body, method, path and query are all signed."""
        headers = self.signer.sign(b"POST", b"/_cluster/replicas", self.body)
        self.assertEqual(self.replicas(headers, self.body.replace(b"1", b"2"))[0], 401)
        headers = self.signer.sign(b"POST", b"/_cluster/replicas", self.body)
        self.assertEqual(self.error("POST", "/_cluster/replicas?bridge=1", headers=headers, data=self.body)[0], 401)
        headers = self.signer.sign(b"DELETE", b"/_cluster/lookup/books/1")
        self.assertEqual(self.error("GET", "/_cluster/lookup/books/1", headers=headers)[0], 401)
        self.assertEqual(self.metric("cluster_bad_signature"), 3)

    def test_stale_refused(self):
        """A timestamp more than 300 s off, either way, is refused."""
        old = self.signer.sign(b"POST", b"/_cluster/replicas", self.body)
        self.clock.advance(301)
        code, body = self.replicas(old)
        self.assertEqual(code, 401)
        self.assertIn("stale", body["message"])
        future = ClusterKey(KEY, Clock())
        future.clock.advance(self.clock.seconds() + 301)
        self.assertEqual(self.replicas(future.sign(b"POST", b"/_cluster/replicas", self.body))[0], 401)
        self.assertEqual(self.metric("cluster_stale"), 2)
        near = ClusterKey(KEY, Clock())
        near.clock.advance(self.clock.seconds() - 299)
        self.assertEqual(self.replicas(near.sign(b"POST", b"/_cluster/replicas", self.body))[0], 200)

    def test_replay_refused(self):
        headers = self.signer.sign(b"POST", b"/_cluster/replicas", self.body)
        self.assertEqual(self.replicas(headers)[0], 200)
        code, body = self.replicas(headers)
        self.assertEqual(code, 401)
        self.assertIn("replayed", body["message"])
        self.assertEqual(self.metric("cluster_replayed"), 1)
        # Two requests alike, signed apart, are both taken (a nonce each).
        self.assertEqual(self.replicas(self.signer.sign(b"POST", b"/_cluster/replicas", self.body))[0], 200)

    def test_seen_set_is_bounded_without_replay_holes(self):
        """The set of seen signatures is bounded; a dropped one cannot be replayed."""
        verifier = ClusterKey(KEY, self.clock, max_seen=3)
        from twisted.web.http_headers import Headers

        signed = []
        for i in range(5):
            self.clock.advance(1)
            signed.append(Headers(self.signer.sign(b"GET", b"/x")))
            self.assertIsNone(verifier.verify(b"GET", b"/x", signed[-1], b""))
        self.assertLessEqual(len(verifier._seen), 3)
        self.assertIn(verifier.verify(b"GET", b"/x", signed[0], b""), ("stale", "replayed"))
        self.assertEqual(verifier.verify(b"GET", b"/x", signed[4], b""), "replayed")
        # Out of the window, entries are forgotten and the set shrinks.
        self.clock.advance(400)
        self.assertIsNone(verifier.verify(b"GET", b"/x", Headers(self.signer.sign(b"GET", b"/x")), b""))
        self.assertEqual(len(verifier._seen), 1)

    def test_key_file(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"short\n")
        with self.assertRaises(AuthFileError) as caught:
            auth.read_cluster_key(path)
        self.assertIn(path + ":1:", str(caught.exception))
        with open(path, "wb") as f:
            f.write(KEY + b"\n")
        self.assertEqual(auth.read_cluster_key(path), KEY)


class PeerSigningTests(SynchronousTestCase):
    """PeerClient signs every request; a node shows the peers that refuse it."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000000)
        self.net = FakeNetwork()
        self.b = Node(MemoryStorage(), node_id="b")
        self.b.open()
        self.b_guard = Guard(None, ClusterKey(KEY, self.clock), insecure=False)
        self.b_guard.attach(self.b)
        lookups = Lookups(self.b, lambda: [], PeerClient(FakeNetwork(), "b"), self.clock, timeout=1)
        api = RecordAPI(self.b, lookups=lookups)
        self.net.add(B, FromAddress(GuardResource(self.b_guard, api.resource()), "10.0.0.2"))

    def client(self, key):
        return PeerClient(self.net, "a", signer=ClusterKey(key, self.clock) if key else None, clock=self.clock)

    def replica(self, uid):
        return json.dumps(
            {"collection": "books", "uid": uid, "value": uid, "version": "0000000001-0000-a", "timestamp": 1.0},
            separators=(",", ":"),
        ).encode()

    def test_signed_replicas_applied(self):
        client = self.client(KEY)
        applied = self.successResultOf(ensureDeferred(client.send_replicas(B, [self.replica("1")])))
        self.assertEqual(applied, 1)
        self.assertEqual(client.refusals(), {})

    def test_odd_paths_signed_as_sent(self):
        """The signature covers the request line exactly as treq sends it."""
        self.b.create("books", "a b/ü?x", 1)
        client = self.client(KEY)
        lookups_path = self.successResultOf(
            ensureDeferred(client.lookup(B, "books", "a b/ü?x", ["a", "z z"], asked=["http://[::1]:1"]))
        )
        self.assertIsNotNone(lookups_path)
        self.assertEqual(self.b_guard.refused, {})

    def test_refused_by_a_peer_shows_in_status(self):
        for key in (OTHER_KEY, None):
            client = self.client(key)
            failure = self.failureResultOf(ensureDeferred(client.send_replicas(B, [self.replica("1")])), PeerError)
            self.assertEqual(failure.value.code, 401)
            refusal = client.refusals()[B]
            self.assertEqual(refusal["refused"], 1)
            self.assertIn("401 unauthorized", refusal["last_refusal"])
            self.assertEqual(refusal["at"], self.clock.seconds())
        self.assertEqual(self.b_guard.refused, {"cluster_bad_signature": 1, "cluster_unsigned": 1})

    def test_refused_lookups_show_in_status(self):
        """A lookup a peer refuses is a miss here, and the refusal is in /_node/status."""
        a = Node(MemoryStorage(), node_id="a")
        a.open()
        client = self.client(OTHER_KEY)
        guard = Guard(None, None)
        guard.peers = client
        guard.attach(a)
        self.b.create("books", "1", 1)
        a.remote = Lookups(a, lambda: [B], client, self.clock, timeout=1)
        http = StubTreq(GuardResource(guard, RecordAPI(a, lookups=a.remote).resource()))
        response = self.successResultOf(http.get("http://a/books/1"))
        self.assertEqual(response.code, 404)
        status = json.loads(self.successResultOf(self.successResultOf(http.get("http://a/_node/status")).content()))
        self.assertIn("bad signature", status["security"]["refused_by_peers"][B]["last_refusal"])


class CacheFrontTests(SynchronousTestCase):
    """
    A cache front passes the client's Authorization to its dependants and
    never serves a cached record to a client they would refuse.
    """

    FRONT = "http://127.0.0.1:9000"

    def setUp(self):
        from minstore.cache import CacheFront

        self.clock = Clock()
        self.clock.advance(1000000)
        self.tokens = Tokens()
        self.cats, line = new_token("cats", "read:cats")
        tokens = parse_tokens(self.tokens.text + line + "\n")
        self.net = FakeNetwork()
        self.nodes = {}
        for url, name in ((A, "a"), (B, "b")):
            node = self.nodes[url] = Node(MemoryStorage(), node_id=name)
            node.open()
            guard = Guard(tokens, ClusterKey(KEY, self.clock))
            self.net.add(url, FromAddress(GuardResource(guard, RecordAPI(node).resource()), "10.0.0.9"))
        front_node = Node(MemoryStorage(), node_id="front")
        front_node.open()
        client = PeerClient(self.net, "front", signer=ClusterKey(KEY, self.clock), clock=self.clock)
        self.front = CacheFront(client, lambda: [A, B], self.clock, ttl=60, timeout=5)
        self.front.attach(front_node)
        api = RecordAPI(front_node, front=self.front)
        self.http = StubTreq(GuardResource(Guard(), api.resource()))

    def call(self, method, path, token=None, **kwargs):
        headers = bearer(token) if token else {}
        d = self.http.request(method, self.FRONT + path, headers=headers, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        return response.code, self.successResultOf(response.content())

    def test_write_through_the_front_with_a_token(self):
        """
        The dependant takes the client's token.  (The front only routes: the
        dependants' own replication, signed, brings the record to the others.)
        """
        code, _ = self.call("POST", "/books/1?cache=1", self.tokens.writer, json={"value": 1})
        self.assertEqual(code, 200)
        self.assertIsNotNone(self.successResultOf(self.nodes[A].read("books", "1")))
        self.assertEqual([m for m, u in self.net.requests], ["POST"])
        code, body = self.call("POST", "/books/2?cache=1", json={"value": 1})
        self.assertEqual((code, json.loads(body)["error"]), (401, "unauthorized"))
        code, body = self.call("POST", "/books/2?cache=1", self.tokens.reader, json={"value": 1})
        self.assertEqual(code, 403)

    def test_cached_record_not_served_to_a_refused_client(self):
        self.assertEqual(self.call("POST", "/books/1?cache=1", self.tokens.writer, json={"value": 1})[0], 200)
        asked = len(self.net.requests)
        self.assertEqual(self.call("GET", "/books/1?cache=1", self.tokens.writer)[0], 200)
        self.assertEqual(len(self.net.requests), asked)  # a hit: the writer may read
        for token, code in ((None, 401), ("forged", 401), (self.cats, 403)):
            self.assertEqual(self.call("GET", "/books/1?cache=1", token)[0], code, token)
        self.assertGreater(len(self.net.requests), asked)
        # The reader is asked for once, then served from the cache.
        self.assertEqual(self.call("GET", "/books/1?cache=1", self.tokens.reader)[0], 200)
        asked = len(self.net.requests)
        self.assertEqual(self.call("GET", "/books/1?cache=1", self.tokens.reader)[0], 200)
        self.assertEqual(len(self.net.requests), asked)
        self.assertGreaterEqual(self.front.hits, 2)


class DocumentTests(SynchronousTestCase):
    def test_openapi_declares_bearer_and_refusals(self):
        from minstore.openapi import openapi_document

        document = openapi_document()
        self.assertEqual(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer")
        self.assertEqual(document["security"], [{"bearer": []}])
        self.assertEqual(document["paths"]["/_node/health"]["get"]["security"], [])
        for path, item in document["paths"].items():
            for method, operation in item.items():
                if isinstance(operation, dict) and "responses" in operation and path != "/_node/health":
                    self.assertIn("401", operation["responses"], (path, method))
                    self.assertIn("403", operation["responses"], (path, method))

    def test_console_asks_for_a_token_on_401(self):
        from minstore.console import CONSOLE_HTML

        page = CONSOLE_HTML.decode() if isinstance(CONSOLE_HTML, bytes) else CONSOLE_HTML
        self.assertIn("response.status === 401", page)
        self.assertIn('sessionStorage.getItem("minstore-token")', page)
        self.assertNotIn("localStorage", page)


class SecurityOptionTests(SynchronousTestCase):
    """The security options stop a bad start with one line naming the file."""

    def setUp(self):
        import sys

        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def parse(self, *args):
        from minstore.tap import Options

        options = Options()
        options.parseOptions(["--data", os.path.join(self.dir, "data"), "--processes", ""] + list(args))
        return options

    def bad(self, *args):
        e = self.assertRaises(SystemExit, self.parse, *args)
        self.assertEqual(e.code, 2)
        text = self.stderr.getvalue()
        self.stderr.seek(0)
        self.stderr.truncate()
        self.assertEqual(text.count("\n"), 1, text)
        return text

    def file(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_bad_files(self):
        tokens = self.file("tokens", "# ok\nbroken\n")
        self.assertIn("--tokens: %s:2: expected NAME SHA256HEX SCOPES" % tokens, self.bad("--tokens", tokens))
        self.assertIn("--cluster-key: %s:1:" % tokens, self.bad("--cluster-key", tokens))
        self.assertIn("cannot read", self.bad("--tokens", os.path.join(self.dir, "none")))
        self.assertIn("--allow-origin", self.bad("--allow-origin", "evil.example"))
        self.assertIn("ssl:", self.bad("--client-ca", tokens))
        self.assertIn("--peer-key", self.bad("--peer-cert", tokens))

    def test_good_options(self):
        _, line = new_token("ci", "admin")
        options = self.parse(
            "--tokens", self.file("tokens", line + "\n"),
            "--cluster-key", self.file("key", "x" * 40),
            "--allow-origin", "https://a.example, http://b.example:8080",
            "--insecure",
        )
        security = options["security"]
        self.assertEqual(len(security["tokens"]), 1)
        self.assertEqual(security["cluster_key"], b"x" * 40)
        self.assertEqual(security["allow_origins"], ["https://a.example", "http://b.example:8080"])
        self.assertTrue(options["insecure"])
