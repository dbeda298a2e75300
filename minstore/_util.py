"""Small pieces several modules share: durable files, JSON answers, plug-ins."""

import json
import os
import signal
from importlib.metadata import entry_points

JSON_TYPE = b"application/json; charset=utf-8"

#: Sync a file's data (and the size that reads need), not its other metadata.
sync_data = getattr(os, "fdatasync", os.fsync)


def ignore_stop_signals():
    """
    For a node's child process (the file writer): ignore
    SIGTERM and SIGINT, which systemd (without ``KillMode=mixed``) and a
    terminal's Ctrl-C send to the whole group.  The node stops first and
    ends the child by closing its stdin, once it has done what it was sent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fsync_dir(path):
    """Make the names created or renamed in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_response(request, code, obj):
    """Set the status and content type, and return the JSON body of ``obj``."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [JSON_TYPE])
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _entry_points(group):
    eps = entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=group))
    return list(eps.get(group, []))  # Python 3.9


def available(builtin, group):
    """Factories by name: the built-in ones, then those packages add to ``group``."""
    factories = dict(builtin)
    for ep in _entry_points(group):
        factories.setdefault(ep.name, ep)
    return factories


def load(factories, name):
    """The factory of a name (an entry point is imported now); KeyError when unknown."""
    factory = factories[name]
    if hasattr(factory, "load"):
        factory = factory.load()
    return factory
