"""
Security with real nodes (DESIGN section 7): tokens and a cluster key on
two replicating nodes, a node refused for a wrong key showing why in its
``/_node/status``, and replication over TLS with client certificates.
"""

import datetime
import ipaddress
import json
import os

import treq
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from minstore.auth import new_token
from tests.harness import NodeProcess, NodeTestMixin, deferred_test, free_port, sleep

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from minstore import tls as _tls

    _tls._ssl()
    TLS_SKIP = None
except Exception as e:  # no cryptography, pyOpenSSL or service_identity
    TLS_SKIP = "TLS tests need cryptography, pyOpenSSL and service_identity (pip install 'minstore[tls]'): %s" % e


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


async def until(check, timeout=15.0, step=0.1):
    """Poll ``await check()`` until it is truthy; its last value."""
    waited = 0.0
    while True:
        value = await check()
        if value or waited >= timeout:
            return value
        await sleep(step)
        waited += step


class SecuredClusterTests(NodeTestMixin, TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.writer, writer_line = new_token("app", "write:books")
        self.admin, admin_line = new_token("ops", "admin")
        self.tokens = write(os.path.join(self.dir, "tokens"), "%s\n%s\n" % (writer_line, admin_line))
        self.key = write(os.path.join(self.dir, "cluster.key"), "a" * 43 + "\n")
        self.wrong_key = write(os.path.join(self.dir, "wrong.key"), "b" * 43 + "\n")

    def auth(self, token):
        return {"Authorization": "Bearer " + token}

    @deferred_test
    async def test_tokens_and_cluster_key(self):
        """Two nodes with tokens and one cluster key replicate; clients need tokens."""
        args = ["--storage", "memory", "--tokens", self.tokens, "--cluster-key", self.key]
        a, b = await self.start_cluster(2, args=args)
        self.assertIn("security: bearer tokens required (2 in", a.output())

        code, headers, _ = await self.call("POST", a.url + "/books/1", json={"value": "x"})
        self.assertEqual(code, 401)
        self.assertEqual(headers["www-authenticate"], 'Bearer realm="minstore"')
        code, _, body = await self.call("POST", a.url + "/books/1", json={"value": "x"}, headers=self.auth(self.writer))
        self.assertEqual(code, 200, body)

        async def replicated():
            code, _, got = await self.call("GET", b.url + "/books/1?local=1", headers=self.auth(self.writer))
            return code == 200 and got
        self.assertEqual(json.loads(await until(replicated))["value"], "x")
        self.assertEqual((await self.call("GET", b.url + "/books/1"))[0], 401)
        self.assertEqual((await self.call("GET", b.url + "/_node/health"))[0], 200)
        code, _, body = await self.call("GET", b.url + "/_node/status", headers=self.auth(self.writer))
        self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden"))

        # An unsigned replica is refused, and counted.
        code, _, _ = await self.call("POST", b.url + "/_cluster/replicas", data=b"{}\n")
        self.assertEqual(code, 401)
        _, _, metrics = await self.call("GET", b.url + "/metrics", headers=self.auth(self.admin))
        self.assertIn(b'minstore_auth_refused_total{reason="cluster_unsigned"} 1.0', metrics)

        # SIGHUP: a new tokens file, the old tokens are gone.
        reader, line = new_token("late", "read:books")
        write(self.tokens, line + "\n")
        a.hup()

        async def reloaded():
            return (await self.call("GET", a.url + "/books/1", headers=self.auth(reader)))[0] == 200
        self.assertTrue(await until(reloaded))
        self.assertEqual((await self.call("GET", a.url + "/books/1", headers=self.auth(self.writer)))[0], 401)
        self.assertNotIn(self.writer, a.output() + b.output())
        self.assertNotIn(reader, a.output())

    @deferred_test
    async def test_wrong_cluster_key_refused(self):
        """A node whose key the peer refuses shows the error in /_node/status."""
        a, b = await self.start_cluster(
            2,
            node_args={
                0: ["--storage", "memory", "--cluster-key", self.wrong_key],
                1: ["--storage", "memory", "--cluster-key", self.key],
            },
        )
        self.assertIn("protected mode: loopback clients only", a.output())
        code, _, _ = await self.call("POST", a.url + "/books/1", json={"value": "x"})
        self.assertEqual(code, 200)

        async def refused():
            _, _, body = await self.call("GET", a.url + "/_node/status")
            status = json.loads(body)
            peer = [p for p in status["peers"] if p["url"] == b.url][0]
            return "401" in (peer["last_error"] or "") and status
        status = await until(refused)
        self.assertTrue(status, "replication to b never failed with 401")
        refusal = status["security"]["refused_by_peers"][b.url]
        self.assertIn("401 unauthorized", refusal["last_refusal"])
        self.assertIn("bad signature", refusal["last_refusal"])
        self.assertEqual((await self.call("GET", b.url + "/books/1?local=1"))[0], 404)

        # Lookups are refused too: b's record is not found through a.
        await self.call("POST", b.url + "/books/2", json={"value": "y"})
        self.assertEqual((await self.call("GET", a.url + "/books/2"))[0], 404)
        _, _, metrics = await self.call("GET", b.url + "/metrics")
        line = [l for l in metrics.decode().splitlines() if 'reason="cluster_bad_signature"' in l][0]
        self.assertGreaterEqual(float(line.split()[-1]), 2)


# -- TLS ----------------------------------------------------------------------


def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def make_certificates(directory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("minstore test CA"))
        .issuer_name(_name("minstore test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM).decode())}
    for name, usage in (("server", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH), ("client", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("node " + name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[name + "-cert"] = write(os.path.join(directory, name + ".pem"), cert.public_bytes(serialization.Encoding.PEM).decode())
        paths[name + "-key"] = write(os.path.join(directory, name + ".key"), _pem_key(key))
    return paths


def https_client(reactor, ca, cert=None, key=None):
    pool = HTTPConnectionPool(reactor, persistent=False)
    policy = _tls.peer_policy(ca, cert, key)
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), pool


class TLSNode(NodeProcess):
    """A node on an ssl: port that requires client certificates; the harness checks it over https."""

    def __init__(self, certs, **kwargs):
        NodeProcess.__init__(self, **kwargs)
        self.certs = certs

    @property
    def url(self):
        return "https://127.0.0.1:%d" % self.port

    def _client(self):
        if self._http is None:
            c = self.certs
            self._http, self._pool = https_client(self.reactor, c["ca"], c["client-cert"], c["client-key"])
        return self._http


class TLSPeerTests(NodeTestMixin, TestCase):
    if TLS_SKIP:
        skip = TLS_SKIP

    @deferred_test
    async def test_replication_over_verified_tls(self):
        """
        A node replicates to an https:// peer verified against --peer-ca,
        presenting its --peer-cert; the peer's ssl: port requires one.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        c = make_certificates(directory)
        b_port = free_port()
        b = TLSNode(
            c,
            base_dir=os.path.join(directory, "b"),
            port=b_port,
            port_arg="ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (b_port, c["server-key"], c["server-cert"]),
            args=["--storage", "memory", "--client-ca", c["ca"]],
            reactor=self.reactor,
            name="b",
        )
        self.addCleanup(self._stop_at_cleanup, b)
        a = self.make_node(
            servers=[b.url],
            args=["--storage", "memory", "--peer-ca", c["ca"], "--peer-cert", c["client-cert"], "--peer-key", c["client-key"]],
            name="a",
        )
        # Without a client certificate, b's port refuses the handshake.
        await b.start()
        await a.start()
        bare, bare_pool = https_client(self.reactor, c["ca"])
        self.addCleanup(bare_pool.closeCachedConnections)
        with self.assertRaises(Exception):
            await bare.get(b.url + "/_node/health", timeout=5)

        code, _, _ = await self.call("POST", a.url + "/books/1", json={"value": "over tls"})
        self.assertEqual(code, 200)
        client, pool = https_client(self.reactor, c["ca"], c["client-cert"], c["client-key"])
        self.addCleanup(pool.closeCachedConnections)

        async def replicated():
            response = await client.get(b.url + "/books/1?local=1", timeout=5)
            body = await response.content()
            return response.code == 200 and json.loads(body)
        got = await until(replicated)
        self.assertEqual(got and got["value"], "over tls")

    @deferred_test
    async def test_peer_not_signed_by_the_ca(self):
        """A peer whose certificate --peer-ca does not vouch for is not sent records."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        c = make_certificates(directory)
        other = make_certificates(self._other(directory))
        b_port = free_port()
        b = TLSNode(
            c,
            base_dir=os.path.join(directory, "b"),
            port=b_port,
            port_arg="ssl:%d:privateKey=%s:certKey=%s:interface=127.0.0.1" % (b_port, c["server-key"], c["server-cert"]),
            args=["--storage", "memory"],
            reactor=self.reactor,
            name="b",
        )
        self.addCleanup(self._stop_at_cleanup, b)
        a = self.make_node(servers=[b.url], args=["--storage", "memory", "--peer-ca", other["ca"]], name="a")
        await b.start()
        await a.start()
        await self.call("POST", a.url + "/books/1", json={"value": "x"})

        async def failing():
            status = json.loads((await self.call("GET", a.url + "/_node/status"))[2])
            return status["peers"][0]["last_error"]
        self.assertTrue(await until(failing))
        response = await b._client().get(b.url + "/books/1?local=1", timeout=5)
        await response.content()
        self.assertEqual(response.code, 404)

    def _other(self, directory):
        path = os.path.join(directory, "other")
        os.makedirs(path)
        return path
