"""
``servers.list``: one peer base URL per line, ``#`` comments and blank lines
ignored, and a lone ``*`` as the first line for a bridge node.
"""

from urllib.parse import urlsplit

import attr


class ServersFileError(ValueError):
    """A servers.list that cannot be used; the message names file and line."""


@attr.s(frozen=True)
class ServerList:
    peers = attr.ib(converter=tuple, default=())
    bridge = attr.ib(default=False)
    path = attr.ib(default=None)


def normalise_peer(url):
    """``scheme://host:port`` of a peer URL, or None when it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    host = parts.hostname
    if ":" in host:
        host = "[%s]" % host
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return "%s://%s:%d" % (parts.scheme, host, port)


def parse_servers(text, path="servers.list"):
    peers = []
    bridge = False
    seen_entry = False
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line == "*":
            if seen_entry:
                raise ServersFileError(
                    "%s:%d: '*' (bridge) must be the first entry of the file" % (path, number)
                )
            bridge = True
            seen_entry = True
            continue
        seen_entry = True
        peer = normalise_peer(line)
        if peer is None:
            raise ServersFileError(
                "%s:%d: %r is not a peer URL (http://host:port or https://host:port)"
                % (path, number, line)
            )
        if peer in peers:
            raise ServersFileError("%s:%d: %s is listed twice" % (path, number, peer))
        peers.append(peer)
    return ServerList(peers=peers, bridge=bridge, path=path)


def read_servers(path):
    """The L{ServerList} of a file; L{ServersFileError} names what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ServersFileError("%s: cannot read the servers file: %s" % (path, e.strerror or e))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ServersFileError("%s: not UTF-8 text" % (path,))
    return parse_servers(text, path)
