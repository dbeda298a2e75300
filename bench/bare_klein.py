"""
The yardstick of bench/run.py: a bare Klein app with the same URL shapes as a
minstore node, answering every GET, PUT and POST with a fixed ~250-byte JSON
record (no storage, no processes, no metrics), behind a Site with no access
log.  What a node costs beyond this is minstore's own.

    python bench/bare_klein.py PORT [INTERFACE]     (default 127.0.0.1)
    twistd -n --pidfile= -y bench/bare_klein.py     (BARE_KLEIN_PORT, default 8099)
"""

import json
import os
import sys

from klein import Klein
from twisted.web.server import Site

#: A record shaped like a stored minstore record, about 250 bytes.
RECORD = json.dumps(
    {
        "check_sum": "9b74c9897bac770ffc029102a200c5de1f3c5f2f4f6b2a1c2d3e4f5a6b7c8d9e",
        "collection": "bench",
        "lang": "en",
        "size": 62,
        "timestamp": 1764000000.123456,
        "uid": "u-000001",
        "value": "the quick brown fox jumps over the lazy dog, again and again",
        "version": "1764000000123-000000-0123456789ab",
    },
    sort_keys=True,
    separators=(",", ":"),
).encode("utf-8")

JSON_TYPE = b"application/json; charset=utf-8"

app = Klein()


@app.route("/<collection>/<path:uid>", methods=["GET"])
def get_record(request, collection, uid):
    request.setHeader(b"content-type", JSON_TYPE)
    return RECORD


@app.route("/<collection>/<path:uid>", methods=["PUT", "POST"])
def write_record(request, collection, uid):
    # Read the body as a real handler would, but do nothing with it.
    request.content.read()
    request.setHeader(b"content-type", JSON_TYPE)
    return RECORD


@app.route("/<collection>/", methods=["POST"])
def post_generated(request, collection):
    request.content.read()
    request.setHeader(b"content-type", JSON_TYPE)
    return RECORD


@app.route("/_node/health", methods=["GET"])
def health(request):
    request.setHeader(b"content-type", JSON_TYPE)
    return b'{"status":"ok"}'


class QuietSite(Site):
    """No access log line per request."""

    def log(self, request):
        pass


def site():
    s = QuietSite(app.resource())
    # As a minstore node does (minstore/tap.py): no parsing of every POST
    # body's Content-Type by twisted.web, which costs ~0.2 ms a request.
    s._parsePOSTFormSubmission = False
    return s


def main(argv):
    from twisted.internet import reactor

    if len(argv) < 2:
        sys.stderr.write("usage: %s PORT [INTERFACE]\n" % argv[0])
        return 2
    port = int(argv[1])
    interface = argv[2] if len(argv) > 2 else "127.0.0.1"
    reactor.listenTCP(port, site(), interface=interface)
    sys.stdout.write("bare klein on %s:%d\n" % (interface, port))
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
elif __name__ == "builtins":
    # twistd -y runs this file in a namespace of its own (no __name__ of
    # its own, so the builtins' shows through) and looks for ``application``.
    from twisted.application import internet, service

    application = service.Application("bare-klein")
    internet.TCPServer(
        int(os.environ.get("BARE_KLEIN_PORT", "8099")), site(), interface="127.0.0.1"
    ).setServiceParent(application)
