"""
TLS between nodes (DESIGN section 7): ``https://`` peers verified against
``--peer-ca``, a client certificate presented with ``--peer-cert`` and
``--peer-key``, and an ``ssl:`` port that requires client certificates
signed by ``--client-ca``.

Needs pyOpenSSL and service_identity (``pip install 'minstore[tls]'``,
which is ``Twisted[tls]``); they are imported only when an option asks.
"""

import re

from zope.interface import implementer
from twisted.web.iweb import IPolicyForHTTPS


class TLSConfigError(Exception):
    """A certificate or key file that cannot be used; the text names the file."""


def _ssl():
    try:
        from twisted.internet import ssl

        ssl.CertificateOptions  # noqa: B018 (absent without pyOpenSSL)
        import service_identity  # noqa: F401
    except (ImportError, AttributeError) as e:
        raise TLSConfigError("TLS needs pyOpenSSL and service_identity: pip install 'minstore[tls]' (%s)" % e)
    return ssl


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError("%s: cannot read the %s: %s" % (path, what, e.strerror or e))


def load_ca(path):
    """The CA certificates (Twisted Certificates) of a PEM file."""
    ssl = _ssl()
    pems = re.findall(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", _read(path, "CA certificate"), re.DOTALL
    )
    if not pems:
        raise TLSConfigError("%s: no PEM certificate in it" % path)
    try:
        return [ssl.Certificate.loadPEM(pem) for pem in pems]
    except Exception as e:
        raise TLSConfigError("%s: not a PEM certificate: %s" % (path, e))


def load_private_certificate(cert_path, key_path):
    """A Twisted PrivateCertificate from a PEM certificate and its PEM key."""
    ssl = _ssl()
    cert = _read(cert_path, "certificate")
    key = _read(key_path, "private key")
    try:
        return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
    except Exception as e:
        raise TLSConfigError("%s, %s: not a PEM certificate and its key: %s" % (cert_path, key_path, e))


@implementer(IPolicyForHTTPS)
class PeerTLSPolicy:
    """
    How this node's client checks ``https://`` peers: their certificate must
    chain to ``ca`` (the platform's roots when None) and name the host of
    the peer's URL; ``client`` is presented when a peer asks for one.
    """

    def __init__(self, ca=None, client=None):
        ssl = _ssl()
        self._ssl = ssl
        if ca is None:
            self.trust = ssl.platformTrust()
        elif len(ca) == 1:
            self.trust = ca[0]
        else:
            self.trust = ssl.trustRootFromCertificates(ca)
        self.client = client

    def creatorForNetloc(self, hostname, port):
        return self._ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
        )


def peer_policy(ca_path=None, cert_path=None, key_path=None):
    """A L{PeerTLSPolicy} from the option files, or None when none is given."""
    if not (ca_path or cert_path or key_path):
        return None
    if bool(cert_path) != bool(key_path):
        raise TLSConfigError("--peer-cert and --peer-key go together")
    ca = load_ca(ca_path) if ca_path else None
    client = load_private_certificate(cert_path, key_path) if cert_path else None
    return PeerTLSPolicy(ca, client)


def _split(description):
    return [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]


def client_cert_endpoint(reactor, description, ca_path):
    """
    The server endpoint of an ``ssl:PORT:privateKey=K[:certKey=C][:interface=I][:backlog=N]``
    port string that requires a client certificate signed by a CA of ``ca_path``.
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint

    parts = _split(description)
    if parts[0] != "ssl":
        raise TLSConfigError("--client-ca needs an ssl: --port (ssl:8443:privateKey=key.pem:certKey=cert.pem)")
    options, positional = {}, []
    for part in parts[1:]:
        name, sep, value = part.partition("=")
        if sep:
            options[name] = value
        else:
            positional.append(part)
    port = options.pop("port", positional[0] if positional else "")
    if not port.isdigit():
        raise TLSConfigError("--client-ca: no port number in %r" % description)
    unknown = set(options) - {"privateKey", "certKey", "interface", "backlog"}
    if unknown:
        raise TLSConfigError("--client-ca: the ssl: port option %s is not supported with it" % ", ".join(sorted(unknown)))
    key = options.get("privateKey", "server.pem")
    server = load_private_certificate(options.get("certKey", key), key)
    ca = load_ca(ca_path)
    ssl = _ssl()
    context = ssl.CertificateOptions(
        privateKey=server.privateKey.original,
        certificate=server.original,
        verify=True,
        caCerts=[c.original for c in ca],
        requireCertificate=True,
    )
    return SSL4ServerEndpoint(
        reactor,
        int(port),
        context,
        backlog=int(options.get("backlog", 50)),
        interface=options.get("interface", ""),
    )
