"""
The HTTP API of DESIGN section 3, through real HTTP in memory (StubTreq)
against a node on the memory engine.
"""

import gc
import hashlib
import io
import json
import re
import uuid
from urllib.parse import quote

from openapi_spec_validator import validate as validate_openapi
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from minstore import __version__
from minstore.api import RecordAPI
from minstore.errors import Rejected
from minstore.node import Node
from minstore.records import canonical_json
from minstore.storage.memory import MemoryStorage

BASE = "http://node.test"
JSON_TYPE = b"application/json; charset=utf-8"
START = 1_700_000_000.0
VERSION_RE = re.compile(r"\A\d{13}-\d{6}-node1\Z")


class FakeTime:
    def __init__(self, seconds=START):
        self.seconds = seconds

    def __call__(self):
        return self.seconds


class ManualThreads:
    """
    An ``in_thread`` that queues each call and runs it only when the test
    says, so several requests can be in flight at once.
    """

    def __init__(self):
        self.pending = []
        self.called = []
        #: True while a queued call runs: "in the thread pool".
        self.running = False

    def __call__(self, f, *args):
        d = Deferred()
        self.called.append(f)
        self.pending.append((f, args, d))
        return d

    def flush(self):
        while self.pending:
            self.run_one()

    def run_one(self):
        """Run the oldest queued call (what it queues in turn waits)."""
        f, args, d = self.pending.pop(0)
        self.running = True
        try:
            result = f(*args)
        except BaseException:
            result = Failure()
        finally:
            self.running = False
        # What waits for the call runs back on the "reactor", out of the pool.
        d.callback(result) if not isinstance(result, Failure) else d.errback(result)


class Response:
    """A finished response: code, headers and body, read in memory."""

    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[-1]

    def json(self):
        return json.loads(self.body)


class Upper:
    """A process that upper-cases string values."""

    name = "upper"
    threaded = False

    def __call__(self, record):
        if isinstance(record["value"], str):
            record["value"] = record["value"].upper()
        return record


class RejectOdd:
    """A process that refuses odd numbers, synchronously or through a Deferred."""

    name = "reject-odd"
    threaded = False

    def __init__(self, deferred=False):
        self.deferred = deferred

    def __call__(self, record):
        if isinstance(record["value"], int) and record["value"] % 2:
            error = Rejected("rejected", "odd numbers are not welcome: %d" % record["value"])
            if self.deferred:
                return fail(error)
            raise error
        record["checked"] = True
        return succeed(record) if self.deferred else record


class APITestCase(SynchronousTestCase):
    max_record_size = 1024 * 1024

    def setUp(self):
        self.time = FakeTime()
        self.threads = ManualThreads()
        self.node = self.make_node()
        self.node.open()
        self.api = RecordAPI(self.node, max_record_size=self.max_record_size)
        self.http = StubTreq(self.api.resource())

    def make_node(self, processes=()):
        return Node(
            MemoryStorage(),
            processes,
            node_id="node1",
            now=self.time,
            in_thread=self.threads,
        )

    def use_node(self, node, **kwargs):
        self.node = node
        self.node.open()
        self.api = RecordAPI(node, **kwargs)
        self.http = StubTreq(self.api.resource())

    def start(self, method, path, **kwargs):
        """Send a request; the Deferred of its Response."""
        d = self.http.request(method, BASE + path, **kwargs)

        def read(response):
            return response.content().addCallback(
                lambda body: Response(response.code, response.headers, body)
            )

        return d.addCallback(read)

    def request(self, method, path, **kwargs):
        """Send a request and run it to its end: the Response."""
        d = self.start(method, path, **kwargs)
        for _ in range(10):
            self.http.flush()
            self.threads.flush()
        self.http.flush()
        return self.successResultOf(d)

    def post(self, path, value, **kwargs):
        return self.request("POST", path, json={"value": value}, **kwargs)

    def put(self, path, value, **kwargs):
        return self.request("PUT", path, json={"value": value}, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def raw(self, method, path, body, content_type, **kwargs):
        headers = kwargs.pop("headers", {})
        if content_type is not None:
            headers["Content-Type"] = content_type
        return self.request(method, path, data=body, headers=headers, **kwargs)

    def assertError(self, response, code, error):
        """A JSON error body ``{"error", "message"}`` with this status and code."""
        self.assertEqual(
            (response.code, response.header(b"content-type")),
            (code, JSON_TYPE),
            response.body,
        )
        document = response.json()
        self.assertEqual(sorted(document), ["error", "message"])
        self.assertEqual(document["error"], error, document)
        self.assertIsInstance(document["message"], str)
        self.assertTrue(document["message"])
        return document

    def assertRecord(self, response, collection, uid, value, code=200):
        """A full record, served as JSON, with its version as a quoted ETag."""
        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.header(b"content-type"), JSON_TYPE)
        record = response.json()
        body = canonical_json(value)
        self.assertEqual(
            {k: record[k] for k in ("uid", "collection", "value", "check_sum", "size")},
            {
                "uid": uid,
                "collection": collection,
                "value": value,
                "check_sum": hashlib.sha256(body).hexdigest(),
                "size": len(body),
            },
        )
        self.assertRegex(record["version"], VERSION_RE)
        self.assertIsInstance(record["timestamp"], float)
        self.assertEqual(response.header(b"etag"), ('"%s"' % record["version"]).encode())
        return record


class CreateTests(APITestCase):
    def test_post_returns_full_record(self):
        """POST /c/u answers 200 with the whole stored record and its version as ETag."""
        self.time.seconds = START + 0.25
        response = self.post("/books/dune", {"title": "Dune"})
        record = self.assertRecord(response, "books", "dune", {"title": "Dune"})
        self.assertEqual(
            record,
            {
                "uid": "dune",
                "collection": "books",
                "value": {"title": "Dune"},
                "version": "1700000000250-000000-node1",
                "timestamp": START + 0.25,
                "check_sum": hashlib.sha256(b'{"title":"Dune"}').hexdigest(),
                "size": 16,
            },
        )
        self.assertEqual(response.header(b"etag"), b'"1700000000250-000000-node1"')
        # The body is the stored record's canonical JSON, byte for byte.
        self.assertEqual(response.body, canonical_json(record))

    def test_post_existing(self):
        """POSTing a uid that exists is refused with 400 record_exists; the record is unchanged."""
        first = self.post("/books/dune", 1).json()
        self.assertError(self.post("/books/dune", 2), 400, "record_exists")
        self.assertEqual(self.get("/books/dune").json(), first)

    def test_post_after_delete(self):
        """A deleted uid can be created again, with a newer version."""
        first = self.post("/books/dune", 1).json()
        self.assertEqual(self.delete("/books/dune").code, 200)
        again = self.assertRecord(self.post("/books/dune", 2), "books", "dune", 2)
        self.assertGreater(again["version"], first["version"])

    def test_post_collection_with_body_uid(self):
        """POST /c/ takes the uid from the body's uid."""
        response = self.request("POST", "/books/", json={"uid": "from-body", "value": [1, 2]})
        self.assertRecord(response, "books", "from-body", [1, 2])
        self.assertEqual(self.get("/books/from-body").json()["value"], [1, 2])

    def test_post_collection_generates_uuid(self):
        """POST /c/ without a uid stores the record under a new UUID."""
        response = self.post("/books/", "x")
        uid = response.json()["uid"]
        self.assertEqual(str(uuid.UUID(uid)), uid)
        first = self.assertRecord(response, "books", uid, "x")
        second = self.post("/books/", "x").json()
        self.assertNotEqual(first["uid"], second["uid"])
        self.assertEqual(self.get("/books/" + first["uid"]).json(), first)

    def test_post_collection_existing_body_uid(self):
        """POST /c/ with the uid of an existing record is refused with record_exists."""
        self.post("/books/a", 1)
        response = self.request("POST", "/books/", json={"uid": "a", "value": 2})
        self.assertError(response, 400, "record_exists")

    def test_body_uid_must_match_path(self):
        """A body uid that is not the path's uid is refused with 400, for POST and PUT."""
        response = self.request("POST", "/books/a", json={"uid": "b", "value": 1})
        self.assertError(response, 400, "uid_mismatch")
        self.assertError(self.get("/books/a"), 404, "not_found")
        self.assertError(self.get("/books/b"), 404, "not_found")
        self.post("/books/a", 1)
        response = self.request("PUT", "/books/a", json={"uid": "b", "value": 2})
        self.assertError(response, 400, "uid_mismatch")
        response = self.request("POST", "/books/c", data={"uid": "d", "value": "x"})
        self.assertError(response, 400, "uid_mismatch")

    def test_body_uid_equal_to_path(self):
        """A body uid equal to the path's is accepted."""
        response = self.request("POST", "/books/a", json={"uid": "a", "value": 1})
        self.assertRecord(response, "books", "a", 1)

    def test_body_uid_not_a_string(self):
        """A JSON body whose uid is not a string is refused with bad_uid."""
        response = self.request("POST", "/books/", json={"uid": 7, "value": 1})
        self.assertError(response, 400, "bad_uid")

    def test_value_of_every_json_type(self):
        """The value of a record is any JSON value, stored and served as sent."""
        values = {
            "object": {"b": {"c": [1, None]}, "a": "x"},
            "list": [1, "two", 3.5, False, None, {"k": []}],
            "int": 42,
            "negative": -7,
            "float": 2.5,
            "null": None,
            "true": True,
            "false": False,
            "string": "caf\u00e9 \u65e5\u672c \U0001f600",
            "empty": "",
        }
        for uid, value in values.items():
            self.assertRecord(self.post("/any/" + uid, value), "any", uid, value)
        for uid, value in values.items():
            self.assertRecord(self.get("/any/" + uid), "any", uid, value)

    def test_non_ascii_served_as_utf8(self):
        """Non-ASCII text is served as UTF-8, not as \\u escapes."""
        response = self.post("/books/u", "\u00e9t\u00e9")
        self.assertIn("\u00e9t\u00e9".encode("utf-8"), response.body)
        self.assertNotIn(b"\\u", response.body)

    def test_form_urlencoded(self):
        """A form's value field is stored as a string."""
        response = self.request("POST", "/books/f", data={"value": "\u00e9t\u00e9 42"})
        self.assertRecord(response, "books", "f", "\u00e9t\u00e9 42")
        response = self.raw("POST", "/books/g", b"value=42", "application/x-www-form-urlencoded")
        self.assertRecord(response, "books", "g", "42")
        response = self.raw("PUT", "/books/g", b"value=%7B%7D", "application/x-www-form-urlencoded")
        self.assertRecord(response, "books", "g", "{}")

    def test_form_with_uid_on_collection(self):
        """POST /c/ with a form takes the uid from its uid field."""
        response = self.raw("POST", "/books/", b"uid=x1&value=v", "application/x-www-form-urlencoded")
        self.assertRecord(response, "books", "x1", "v")

    def test_form_empty_value(self):
        """An empty value field is an empty string, not a missing value."""
        response = self.raw("POST", "/books/e", b"value=", "application/x-www-form-urlencoded")
        self.assertRecord(response, "books", "e", "")

    def test_multipart(self):
        """A multipart/form-data body's value (and uid) fields are used, as UTF-8 text."""
        boundary = "minstore-test-boundary-7d3f"
        body = (
            "--{b}\r\n"
            'Content-Disposition: form-data; name="uid"\r\n'
            "\r\n"
            "mp1\r\n"
            "--{b}\r\n"
            'Content-Disposition: form-data; name="value"\r\n'
            "Content-Type: text/plain; charset=utf-8\r\n"
            "\r\n"
            "line one \u00e9\r\nline two\r\n"
            "--{b}\r\n"
            'Content-Disposition: form-data; name="ignored"; filename="x.txt"\r\n'
            "Content-Type: application/octet-stream\r\n"
            "\r\n"
            "\x00\x01\r\n"
            "--{b}--\r\n"
        ).format(b=boundary).encode("utf-8")
        response = self.raw("POST", "/books/", body, "multipart/form-data; boundary=" + boundary)
        self.assertRecord(response, "books", "mp1", "line one \u00e9\r\nline two")

    def test_multipart_without_value(self):
        """A multipart body with no value field is refused with missing_value."""
        body = b'--B\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--B--\r\n'
        response = self.raw("POST", "/books/m", body, "multipart/form-data; boundary=B")
        self.assertError(response, 400, "missing_value")

    def test_missing_value(self):
        """A JSON object or a form without value is refused with 400 missing_value."""
        self.assertError(self.request("POST", "/books/a", json={"uid": "a"}), 400, "missing_value")
        self.assertError(self.request("POST", "/books/a", json={}), 400, "missing_value")
        self.assertError(self.request("POST", "/books/a", data={"other": "1"}), 400, "missing_value")
        self.post("/books/a", 1)
        self.assertError(self.request("PUT", "/books/a", json={"val": 2}), 400, "missing_value")

    def test_malformed_json(self):
        """A body that is not JSON is refused with 400 invalid_json."""
        for body in [b"{", b"{'value': 1}", b"", b'{"value": 1,}', b"\xff\xfe", b'{"value": "\xff"}']:
            response = self.raw("POST", "/books/a", body, "application/json")
            self.assertError(response, 400, "invalid_json")
        self.assertError(self.get("/books/a"), 404, "not_found")

    def test_json_that_python_accepts_but_is_not_json(self):
        """
        NaN, infinities and lone surrogates are not JSON: refused with 400
        invalid_json on POST and PUT, never a 500.
        """
        self.post("/books/p", 1)
        for body in [b'{"value": NaN}', b'{"value": [Infinity]}', b'{"value": -Infinity}',
                     b'{"value": 1e999}', b'{"value": "\\ud800"}', b'{"value": {"k": "a\\udfff"}}']:
            for method, uid in [("POST", "n"), ("PUT", "p")]:
                response = self.raw(method, "/books/" + uid, body, "application/json")
                self.assertError(response, 400, "invalid_json")
        self.assertError(self.get("/books/n"), 404, "not_found")
        self.assertEqual(self.get("/books/p").json()["value"], 1)

    def test_json_body_not_an_object(self):
        """A JSON body that is not an object is refused with 400."""
        for body in [b"[1]", b'"value"', b"1", b"null"]:
            response = self.raw("POST", "/books/a", body, "application/json")
            self.assertError(response, 400, "invalid_body")

    def test_json_media_type_with_suffix(self):
        """application/...+json bodies and parameters after the media type are JSON too."""
        response = self.raw("POST", "/books/a", b'{"value": 1}', "application/merge+json")
        self.assertRecord(response, "books", "a", 1)
        response = self.raw("POST", "/books/b", b'{"value": 2}', "Application/JSON; charset=UTF-8")
        self.assertRecord(response, "books", "b", 2)

    def test_unsupported_media_type(self):
        """A body of another content type, or none, is refused with 415."""
        response = self.raw("POST", "/books/a", b"value", "text/plain")
        self.assertError(response, 415, "unsupported_media_type")
        response = self.raw("POST", "/books/a", b'{"value": 1}', None)
        self.assertError(response, 415, "unsupported_media_type")
        self.post("/books/b", 1)
        response = self.raw("PUT", "/books/b", b"<value/>", "application/xml")
        self.assertError(response, 415, "unsupported_media_type")

    def test_bad_collection(self):
        """Collections starting with _, over 64 characters or with a space are refused with bad_collection."""
        for collection in ["_x", "a" * 65, "a%20b", ".hidden", "-x"]:
            response = self.post("/%s/u" % collection, 1)
            self.assertError(response, 400, "bad_collection")
            response = self.post("/%s/" % collection, 1)
            self.assertError(response, 400, "bad_collection")
            self.assertError(self.get("/%s/u" % collection), 400, "bad_collection")
            self.assertError(self.get("/%s/" % collection), 400, "bad_collection")
        self.assertRecord(self.post("/%s/u" % ("a" * 64), 1), "a" * 64, "u", 1)

    def test_uid_length(self):
        """A uid of 255 bytes of UTF-8 is accepted; 256 bytes is refused with bad_uid."""
        longest = "\u00e9" * 127 + "x"  # 255 bytes
        response = self.post("/books/" + quote(longest, safe=""), 1)
        self.assertRecord(response, "books", longest, 1)
        too_long = "\u00e9" * 128  # 256 bytes
        self.assertError(self.post("/books/" + quote(too_long, safe=""), 1), 400, "bad_uid")
        self.assertError(self.get("/books/" + quote(too_long, safe="")), 400, "bad_uid")
        self.assertError(self.post("/books/" + "a" * 256, 1), 400, "bad_uid")
        response = self.request("POST", "/books/", json={"uid": "a" * 256, "value": 1})
        self.assertError(response, 400, "bad_uid")

    def test_path_not_utf8(self):
        """A percent-encoded path that is not UTF-8 is refused with a JSON 400 bad_path."""
        self.assertError(self.post("/books/%FF%FE", 1), 400, "bad_path")
        self.assertError(self.get("/books/%C3"), 400, "bad_path")
        self.assertError(self.get("/b%FFks/"), 400, "bad_path")

    def test_encoded_uids_round_trip(self):
        """Uids holding %2F, %25, spaces or non-ASCII characters round-trip through the path."""
        uids = ["a/b", "/lead", "/", "//", "a//b", "trail/", "50%", "%2F", "two words", "\u00e9t\u00e9", "\u65e5/\u672c", "..", "a?b#c"]
        for i, uid in enumerate(uids):
            path = "/books/" + quote(uid, safe="")
            self.assertRecord(self.post(path, i), "books", uid, i)
        for i, uid in enumerate(uids):
            path = "/books/" + quote(uid, safe="")
            self.assertRecord(self.get(path), "books", uid, i)
        listed = [r["uid"] for r in self.get("/books/").json()["items"]]
        self.assertEqual(listed, sorted(uids))
        self.assertEqual(self.delete("/books/" + quote("a/b", safe="")).json()["uid"], "a/b")
        self.assertError(self.get("/books/a%2Fb"), 404, "not_found")
        self.assertRecord(self.get("/books/%2Flead"), "books", "/lead", 1)

    def test_body_over_max_record_size(self):
        """A body over --max-record-size is refused with 413; one at the limit is taken."""
        self.use_node(self.make_node(), max_record_size=100)
        at_limit = b'{"value": "' + b"x" * 87 + b'"}'
        self.assertEqual(len(at_limit), 100)
        self.assertRecord(self.raw("POST", "/books/a", at_limit, "application/json"), "books", "a", "x" * 87)
        over = b'{"value": "' + b"x" * 88 + b'"}'
        self.assertError(self.raw("POST", "/books/b", over, "application/json"), 413, "payload_too_large")
        self.assertError(self.raw("PUT", "/books/a", over, "application/json"), 413, "payload_too_large")
        form = b"value=" + b"y" * 200
        self.assertError(self.raw("POST", "/books/c", form, "application/x-www-form-urlencoded"), 413, "payload_too_large")
        self.assertError(self.get("/books/b"), 404, "not_found")
        self.assertEqual(self.get("/books/a").json()["value"], "x" * 87)


class UpdateTests(APITestCase):
    def test_put(self):
        """PUT replaces the value of an existing record with a newer version."""
        first = self.post("/books/a", 1).json()
        self.time.seconds += 1
        second = self.assertRecord(self.put("/books/a", {"n": 2}), "books", "a", {"n": 2})
        self.assertGreater(second["version"], first["version"])
        self.assertEqual(second["timestamp"], START + 1)
        self.assertEqual(self.get("/books/a").json(), second)

    def test_put_missing(self):
        """PUT of a uid that does not exist answers 404 and creates nothing."""
        self.assertError(self.put("/books/nope", 1), 404, "not_found")
        self.assertError(self.get("/books/nope"), 404, "not_found")

    def test_put_deleted(self):
        """PUT of a deleted record answers 404."""
        self.post("/books/a", 1)
        self.delete("/books/a")
        self.assertError(self.put("/books/a", 2), 404, "not_found")

    def test_put_unchanged_is_idempotent(self):
        """PUT of the stored value answers 200 with the stored record: same version, same ETag."""
        first = self.post("/books/a", {"x": 1, "y": [1, 2]})
        self.time.seconds += 5
        again = self.put("/books/a", {"y": [1, 2], "x": 1})
        self.assertEqual(again.code, 200)
        self.assertEqual(again.body, first.body)
        self.assertEqual(again.header(b"etag"), first.header(b"etag"))
        self.assertEqual(self.get("/books/a").json()["version"], first.json()["version"])

    def test_if_match(self):
        """PUT with If-Match of the current ETag (or *) updates; another ETag answers 412."""
        etag = self.post("/books/a", 1).header(b"etag")
        stale = self.put("/books/a", 2, headers={"If-Match": etag.decode()})
        self.assertRecord(stale, "books", "a", 2)
        response = self.put("/books/a", 3, headers={"If-Match": etag.decode()})
        self.assertError(response, 412, "precondition_failed")
        self.assertEqual(self.get("/books/a").json()["value"], 2)
        self.assertRecord(self.put("/books/a", 4, headers={"If-Match": "*"}), "books", "a", 4)
        current = self.get("/books/a").header(b"etag").decode()
        listed = '"nope", ' + current
        self.assertRecord(self.put("/books/a", 5, headers={"If-Match": listed}), "books", "a", 5)
        self.assertError(self.put("/books/a", 6, headers={"If-Match": '"nope"'}), 412, "precondition_failed")

    def test_if_match_missing_record(self):
        """PUT with If-Match * of a missing record answers 404."""
        self.assertError(self.put("/books/a", 1, headers={"If-Match": "*"}), 404, "not_found")


class ReadTests(APITestCase):
    def test_get(self):
        """GET answers 200 with the record, its version as a quoted ETag."""
        posted = self.post("/books/a", [1, "x"])
        response = self.get("/books/a")
        record = self.assertRecord(response, "books", "a", [1, "x"])
        self.assertEqual(record, posted.json())
        self.assertEqual(response.header(b"etag"), posted.header(b"etag"))

    def test_get_missing(self):
        """GET of an unknown uid answers 404 not_found."""
        self.assertError(self.get("/books/nope"), 404, "not_found")
        self.post("/books/a", 1)
        self.assertError(self.get("/books/nope"), 404, "not_found")
        self.assertError(self.get("/films/a"), 404, "not_found")

    def test_if_none_match(self):
        """GET with a matching If-None-Match answers 304 with the ETag and no body."""
        etag = self.post("/books/a", 1).header(b"etag").decode()
        for header in [etag, "*", 'W/' + etag, '"other", ' + etag]:
            response = self.get("/books/a", headers={"If-None-Match": header})
            self.assertEqual((response.code, response.body), (304, b""), header)
            self.assertEqual(response.header(b"etag"), etag.encode())
        response = self.get("/books/a", headers={"If-None-Match": '"other"'})
        self.assertRecord(response, "books", "a", 1)
        self.put("/books/a", 2)
        response = self.get("/books/a", headers={"If-None-Match": etag})
        self.assertRecord(response, "books", "a", 2)

    def test_if_none_match_not_cached(self):
        """A 304 is also given for a record read from storage, not from the read cache."""
        etag = self.post("/books/a", 1).header(b"etag").decode()
        self.node._cache.clear()
        response = self.get("/books/a", headers={"If-None-Match": etag})
        self.assertEqual(response.code, 304)

    def test_local_without_peers(self):
        """local=1 answers from this node: 200 when held, 404 when not."""
        self.post("/books/a", 1)
        self.assertRecord(self.get("/books/a?local=1"), "books", "a", 1)
        self.assertError(self.get("/books/b?local=1"), 404, "not_found")
        self.assertError(self.delete("/books/b?local=1"), 404, "not_found")
        self.assertEqual(self.delete("/books/a?local=1").code, 200)
        self.assertError(self.get("/books/a?local=1"), 404, "not_found")


class DeleteTests(APITestCase):
    def test_delete(self):
        """DELETE answers 200 naming the tombstone; the record is then gone."""
        posted = self.post("/books/a", 1).json()
        self.time.seconds += 1
        response = self.delete("/books/a")
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        document = response.json()
        self.assertEqual(
            {k: document[k] for k in ("deleted", "collection", "uid")},
            {"deleted": True, "collection": "books", "uid": "a"},
        )
        self.assertGreater(document["version"], posted["version"])
        self.assertError(self.get("/books/a"), 404, "not_found")
        self.assertEqual(self.get("/books/").json(), {"items": [], "next": None})

    def test_delete_missing(self):
        """DELETE of an unknown or already deleted uid answers 404."""
        self.assertError(self.delete("/books/nope"), 404, "not_found")
        self.post("/books/a", 1)
        self.delete("/books/a")
        self.assertError(self.delete("/books/a"), 404, "not_found")

    def test_delete_if_match(self):
        """DELETE with a stale If-Match answers 412 and keeps the record; a current one deletes."""
        etag = self.post("/books/a", 1).header(b"etag").decode()
        self.put("/books/a", 2)
        self.assertError(self.delete("/books/a", headers={"If-Match": etag}), 412, "precondition_failed")
        self.assertEqual(self.get("/books/a").json()["value"], 2)
        current = self.get("/books/a").header(b"etag").decode()
        self.assertEqual(self.delete("/books/a", headers={"If-Match": current}).code, 200)
        self.assertError(self.get("/books/a"), 404, "not_found")


class ListTests(APITestCase):
    def fill(self, n, collection="books"):
        uids = ["r%03d" % i for i in range(n)]
        for uid in reversed(uids):
            self.post("/%s/%s" % (collection, uid), uid)
        return uids

    def test_list(self):
        """GET /c/ answers {"items": [...], "next": null}, full records in uid order."""
        self.post("/books/b", 2)
        self.post("/books/a", 1)
        self.post("/films/c", 3)
        response = self.get("/books/")
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        document = response.json()
        self.assertEqual(sorted(document), ["items", "next"])
        self.assertIsNone(document["next"])
        self.assertEqual(document["items"], [self.get("/books/a").json(), self.get("/books/b").json()])

    def test_list_empty(self):
        """An unknown collection lists as empty."""
        self.assertEqual(self.get("/books/").json(), {"items": [], "next": None})

    def test_paging(self):
        """limit and the next cursor page through 25 records, visiting each once."""
        uids = self.fill(25)
        seen = []
        pages = []
        path = "/books/?limit=10"
        while len(pages) < 10:  # bounded: a cursor that does not advance must fail, not hang
            document = self.get(path).json()
            pages.append(len(document["items"]))
            seen.extend(r["uid"] for r in document["items"])
            if document["next"] is None:
                break
            path = "/books/?limit=10&after=" + quote(document["next"], safe="")
        self.assertEqual(pages, [10, 10, 5])
        self.assertEqual(seen, uids)

    def test_paging_exact_multiple(self):
        """When the records fill the last page exactly, its next is null."""
        self.fill(20)
        first = self.get("/books/?limit=10").json()
        self.assertIsNotNone(first["next"])
        second = self.get("/books/?limit=10&after=" + first["next"]).json()
        self.assertEqual(len(second["items"]), 10)
        self.assertIsNone(second["next"])

    def test_default_limit(self):
        """Without limit, a page holds 100 records."""
        self.fill(101)
        document = self.get("/books/").json()
        self.assertEqual(len(document["items"]), 100)
        self.assertIsNotNone(document["next"])
        rest = self.get("/books/?after=" + document["next"]).json()
        self.assertEqual([r["uid"] for r in rest["items"]], ["r100"])
        self.assertIsNone(rest["next"])

    def test_prefix(self):
        """prefix keeps the uids starting with it, and pages with after."""
        for uid in ["ab1", "ab2", "ab3", "ac1", "b1", "a"]:
            self.post("/books/" + uid, uid)
        document = self.get("/books/?prefix=ab").json()
        self.assertEqual([r["uid"] for r in document["items"]], ["ab1", "ab2", "ab3"])
        first = self.get("/books/?prefix=ab&limit=2").json()
        self.assertEqual([r["uid"] for r in first["items"]], ["ab1", "ab2"])
        rest = self.get("/books/?prefix=ab&limit=2&after=" + first["next"]).json()
        self.assertEqual(rest, {"items": [self.get("/books/ab3").json()], "next": None})
        self.assertEqual(self.get("/books/?prefix=zz").json(), {"items": [], "next": None})
        encoded = self.get("/books/?prefix=" + quote("\u00e9", safe="")).json()
        self.assertEqual(encoded["items"], [])

    def test_deleted_not_listed(self):
        """Deleted records are not listed."""
        self.fill(3)
        self.delete("/books/r001")
        self.assertEqual([r["uid"] for r in self.get("/books/").json()["items"]], ["r000", "r002"])

    def test_bad_parameters(self):
        """limit outside 1..1000, a non-number or a field not indexed answer 400."""
        self.fill(2)
        for query in ["limit=0", "limit=1001", "limit=abc", "limit=-1", "limit=1.5"]:
            self.assertError(self.get("/books/?" + query), 400, "bad_parameter")
        # A parameter that is neither a listing's nor an indexed field's.
        self.assertError(self.get("/books/?colour=red"), 400, "field_not_indexed")
        self.assertEqual(len(self.get("/books/?limit=1000").json()["items"]), 2)
        self.assertEqual(len(self.get("/books/?limit=1").json()["items"]), 1)

    def test_bad_cursor(self):
        """An after cursor that does not decode to UTF-8 answers 400."""
        self.assertError(self.get("/books/?after=__8"), 400, "bad_parameter")

    def test_garbage_cursor(self):
        """An after cursor that is not base64url at all answers 400, not page one."""
        self.assertError(self.get("/books/?after=!!"), 400, "bad_parameter")


class ErrorShapeTests(APITestCase):
    def test_unknown_route(self):
        """A path no route serves answers a JSON 404."""
        self.assertError(self.get("/_cluster/nope"), 404, "not_found")
        self.assertError(self.get("/_cluster/"), 404, "not_found")
        self.assertError(self.request("PUT", "/_cluster/replicas/x", json={}), 404, "not_found")
        self.assertError(self.request("GET", "/_cluster/replicas"), 405, "method_not_allowed")
        # Under the reserved prefix, other names are not collections.
        self.assertError(self.get("/_node/nope"), 400, "bad_collection")

    def test_wrong_method(self):
        """A method a route does not serve answers a JSON 405 with Allow."""
        for method, path, allowed in [
            ("PATCH", "/books/a", ["DELETE", "GET", "HEAD", "POST", "PUT"]),
            ("PUT", "/books/", ["GET", "HEAD", "POST"]),
            ("DELETE", "/metrics", ["GET", "HEAD"]),
            ("POST", "/", ["GET", "HEAD"]),
        ]:
            response = self.request(method, path, json={"value": 1})
            self.assertError(response, 405, "method_not_allowed")
            self.assertEqual(
                sorted(m.strip() for m in response.header(b"allow").decode().split(",")), allowed
            )

    def test_collection_without_slash(self):
        """
        A collection path without its trailing slash is a JSON 404 naming the
        listing's path: never a redirect, which a client would follow with
        its method and body to another route.
        """
        self.post("/books/a", 1)
        for method in ("GET", "POST"):
            response = self.request(method, "/books?limit=5", json={"value": 1}, allow_redirects=False)
            self.assertError(response, 404, "not_found")
            self.assertIsNone(response.header(b"location"))
            self.assertIn("/books/", response.json()["message"])
        self.assertEqual([r["uid"] for r in self.get("/books/").json()["items"]], ["a"])

    def test_errors_are_json(self):
        """Every failure is a JSON body with error and message, as application/json."""
        self.post("/books/a", 1)
        cases = [
            (self.post("/books/a", 1), 400, "record_exists"),
            (self.put("/books/zz", 1), 404, "not_found"),
            (self.get("/books/zz"), 404, "not_found"),
            (self.raw("POST", "/books/x", b"{", "application/json"), 400, "invalid_json"),
            (self.raw("POST", "/books/x", b"x", "text/plain"), 415, "unsupported_media_type"),
            (self.get("/books/?limit=0"), 400, "bad_parameter"),
            (self.get("/nothing/at/all/here/"), 400, "bad_path"),
            (self.get("/nothing"), 404, "not_found"),
            (self.get("/_cluster/nothing"), 404, "not_found"),
            (self.request("OPTIONS", "/_node/status"), 405, "method_not_allowed"),
        ]
        for response, code, error in cases:
            self.assertError(response, code, error)


class ConcurrencyTests(APITestCase):
    def test_concurrent_posts_of_one_uid(self):
        """Of five POSTs of one uid in flight together, exactly one is stored; the others get record_exists."""
        pending = [
            self.start("POST", "/books/race", json={"value": i}) for i in range(5)
        ]
        self.http.flush()
        self.assertTrue(self.threads.pending)  # storage calls waiting: all five are in flight
        for d in pending:
            self.assertNoResult(d)
        for _ in range(10):
            self.threads.flush()
            self.http.flush()
        responses = [self.successResultOf(d) for d in pending]
        self.assertEqual(sorted(r.code for r in responses), [200, 400, 400, 400, 400])
        winner = [r for r in responses if r.code == 200][0]
        for r in responses:
            if r.code == 400:
                self.assertError(r, 400, "record_exists")
        self.assertEqual(self.get("/books/race").json(), winner.json())
        self.assertEqual(self.node.storage.count(), 1)

    def test_concurrent_posts_of_distinct_uids(self):
        """POSTs of different uids in flight together are all stored."""
        pending = [self.start("POST", "/books/u%d" % i, json={"value": i}) for i in range(5)]
        self.http.flush()
        for _ in range(10):
            self.threads.flush()
            self.http.flush()
        self.assertEqual([self.successResultOf(d).code for d in pending], [200] * 5)
        self.assertEqual(self.node.storage.count(), 5)

    def test_writes_refused_while_draining(self):
        """
        While the node stops, writes in flight finish but new POST, PUT and
        DELETE are refused with 503; reads still work.
        """
        self.post("/books/kept", 1)
        in_flight = self.start("POST", "/books/late", json={"value": 2})
        self.http.flush()
        self.assertNoResult(in_flight)
        stopped = self.node.stop()
        self.assertNoResult(stopped)
        refused = [
            self.start("POST", "/books/new", json={"value": 3}),
            self.start("POST", "/books/", json={"value": 3}),
            self.start("PUT", "/books/kept", json={"value": 4}),
            self.start("DELETE", "/books/kept"),
        ]
        self.http.flush()
        for d in refused:
            self.assertError(self.successResultOf(d), 503, "unavailable")
        for _ in range(10):
            self.threads.flush()
            self.http.flush()
        self.assertRecord(self.successResultOf(in_flight), "books", "late", 2)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertRecord(self.get("/books/kept"), "books", "kept", 1)
        self.assertError(self.get("/books/new"), 404, "not_found")


class ProcessTests(APITestCase):
    def test_process_transforms_record(self):
        """The node's processes transform a record before it is stored."""
        self.use_node(self.make_node([Upper()]))
        record = self.assertRecord(self.post("/books/a", "shout"), "books", "a", "SHOUT")
        self.assertEqual(self.get("/books/a").json(), record)

    def test_put_same_value_through_transforming_process(self):
        """
        With a process that changes values, a PUT of the value sent before
        answers the stored record (same version); a new value makes a new one.
        """
        self.use_node(self.make_node([Upper()]))
        first = self.post("/books/a", "shout")
        self.time.seconds += 1
        again = self.put("/books/a", "shout")
        self.assertEqual((again.code, again.body), (200, first.body))
        self.assertEqual(again.header(b"etag"), first.header(b"etag"))
        changed = self.assertRecord(self.put("/books/a", "whisper"), "books", "a", "WHISPER")
        self.assertGreater(changed["version"], first.json()["version"])

    def test_rejected(self):
        """A process raising Rejected answers 400 with its reason; nothing is stored."""
        for deferred in (False, True):
            self.use_node(self.make_node([RejectOdd(deferred)]))
            response = self.post("/books/a", 3)
            document = self.assertError(response, 400, "rejected")
            self.assertEqual(document["message"], "odd numbers are not welcome: 3")
            self.assertError(self.get("/books/a"), 404, "not_found")
            record = self.post("/books/a", 4).json()
            self.assertTrue(record["checked"])
            response = self.put("/books/a", 5)
            self.assertError(response, 400, "rejected")
            self.assertEqual(self.get("/books/a").json(), record)

    def test_threaded_process_runs_through_in_thread(self):
        """A threaded process runs through the node's in_thread, not inline."""
        threads = self.threads
        in_pool = []

        class PooledUpper(Upper):
            threaded = True

            def __call__(self, record):
                in_pool.append(threads.running)
                return Upper.__call__(self, record)

        self.use_node(self.make_node([PooledUpper()]))
        d = self.start("POST", "/books/a", json={"value": "x"})
        self.http.flush()
        for _ in range(5):
            self.threads.flush()
            self.http.flush()
        self.assertRecord(self.successResultOf(d), "books", "a", "X")
        self.assertEqual(in_pool, [True])

    def test_threaded_processes_of_concurrent_writes_share_a_hop(self):
        """
        The threaded processes at the end of the chain run in the storage
        write's own hop, with every write of the batch: one thread-pool
        call per batch, none of their own.
        """
        threads = self.threads
        self.use_node(self.make_node([type("PooledUpper", (Upper,), {"threaded": True})()]))
        hops = lambda: [(f.__name__, len(args[0])) for f, args, _ in threads.pending]
        # Two writes in flight (the node's max_inflight_writes), one hop each...
        first = [self.start("POST", "/books/%s" % uid, json={"value": uid}) for uid in "ab"]
        self.http.flush()
        self.assertEqual(hops(), [("_process_and_write", 1)] * 2)
        # ...these three wait for one of them...
        rest = [self.start("POST", "/books/%s" % uid, json={"value": uid}) for uid in "cde"]
        self.http.flush()
        self.assertEqual(len(threads.pending), 2)
        threads.run_one()
        self.http.flush()
        # ...and then go together, in one call that processes and stores them.
        self.assertEqual(hops(), [("_process_and_write", 1), ("_process_and_write", 3)])
        for _ in range(5):
            threads.flush()
            self.http.flush()
        for d, uid in zip(first + rest, "abcde"):
            self.assertRecord(self.successResultOf(d), "books", uid, uid.upper())

    def test_reads_that_miss_the_cache_together_share_a_hop(self):
        """
        GETs that miss the read cache while a read is in the thread pool go
        to the storage together, in the next hop and one get_many: under
        load a read costs its share of a hop, not a hop.
        """
        threads = self.threads
        self.use_node(Node(MemoryStorage(), (), node_id="node1", now=self.time, in_thread=threads, read_cache_bytes=0))
        for uid in "abcde":
            self.post("/books/%s" % uid, uid)
        reads = lambda: [(args[1].__name__, [uid for _, uid in args[2]]) for f, args, _ in threads.pending]
        calls = []
        storage = self.node.storage
        get_many = storage.get_many
        storage.get_many = lambda keys: calls.append(list(keys)) or get_many(keys)
        first = self.start("GET", "/books/a")
        self.http.flush()
        self.assertEqual(reads(), [("_get_many", ["a"])])
        rest = [self.start("GET", "/books/%s" % uid) for uid in "bcde"]
        self.http.flush()
        self.assertEqual(reads(), [("_get_many", ["a"])])
        threads.run_one()
        self.http.flush()
        self.assertEqual(reads(), [("_get_many", ["b", "c", "d", "e"])])
        for _ in range(3):
            threads.flush()
            self.http.flush()
        for d, uid in zip([first] + rest, "abcde"):
            self.assertRecord(self.successResultOf(d), "books", uid, uid)
        self.assertEqual(calls, [[("books", "a")], [("books", u) for u in "bcde"]])

    def test_engine_without_get_many_is_read_a_key_at_a_time(self):
        """An engine written before IStorage had get_many still serves GETs."""

        class OldEngine(MemoryStorage):
            get_many = property(lambda self: None)

        threads = self.threads
        self.use_node(Node(OldEngine(), (), node_id="node1", now=self.time, in_thread=threads, read_cache_bytes=0))
        self.post("/books/a", "A")
        ds = [self.start("GET", "/books/%s" % uid) for uid in ("a", "a", "nope")]
        for _ in range(3):
            threads.flush()
            self.http.flush()
        self.assertRecord(self.successResultOf(ds[0]), "books", "a", "A")
        self.assertRecord(self.successResultOf(ds[1]), "books", "a", "A")
        self.assertEqual(self.successResultOf(ds[2]).code, 404)

    def test_read_cache_holds_nothing_the_cyclic_gc_walks(self):
        """
        The read cache keeps records as tuples of bytes, str, bool and int,
        which CPython's cyclic GC stops tracking: a cache of 100,000 records
        adds nothing to its full collections.
        """
        if not hasattr(gc, "is_tracked") or not hasattr(gc, "freeze"):
            raise SkipTest("CPython's gc.is_tracked")
        self.post("/books/a", "x")
        self.post("/books/b", "y")
        self.assertEqual(self.get("/books/b").code, 200)
        gc.collect()
        gc.collect()
        held = list(self.node._cache._entries.items())
        self.assertEqual(len(held), 2)
        self.assertEqual([(k, gc.is_tracked(k), gc.is_tracked(v)) for k, v in held],
                         [(k, False, False) for k, _ in held])

    def test_threaded_process_before_a_reactor_process_has_a_hop_of_its_own(self):
        """The configured order holds: a threaded process followed by one that is not runs first, in the pool."""
        order = []

        class Heavy:
            name, threaded = "heavy", True

            def __call__(self, record):
                order.append(("heavy", self_threads.running))
                record["value"] += "-heavy"
                return record

        class Light(Upper):
            def __call__(self, record):
                order.append(("light", self_threads.running))
                return Upper.__call__(self, record)

        self_threads = self.threads
        self.use_node(self.make_node([Heavy(), Light()]))
        d = self.start("POST", "/books/a", json={"value": "x"})
        for _ in range(5):
            self.http.flush()
            self.threads.flush()
        self.assertRecord(self.successResultOf(d), "books", "a", "X-HEAVY")
        self.assertEqual(order, [("heavy", True), ("light", False)])

    def test_refused_in_the_writer_hop_fails_that_write_only(self):
        """A threaded process that refuses one record of a batch: the others are stored."""
        self.use_node(self.make_node([type("PooledRejectOdd", (RejectOdd,), {"threaded": True})()]))
        blocker = self.start("POST", "/books/first", json={"value": 2})
        self.http.flush()
        writes = {uid: self.start("POST", "/books/%s" % uid, json={"value": n})
                  for uid, n in (("a", 4), ("b", 5), ("c", 6))}
        self.http.flush()
        for _ in range(5):
            self.threads.flush()
            self.http.flush()
        self.assertEqual(self.successResultOf(blocker).code, 200)
        self.assertEqual(self.successResultOf(writes["a"]).code, 200)
        self.assertError(self.successResultOf(writes["b"]), 400, "rejected")
        self.assertEqual(self.successResultOf(writes["c"]).code, 200)
        self.assertError(self.get("/books/b"), 404, "not_found")
        self.assertEqual(self.get("/books/c").json()["value"], 6)

    def test_batch_process_gets_the_whole_batch(self):
        """A threaded process with process_batch is called once per batch, with every record."""
        calls = []

        class Counted(Upper):
            threaded = True

            def process_batch(self, records):
                calls.append([r["uid"] for r in records])
                return [Upper.__call__(self, r) for r in records]

        self.use_node(self.make_node([Counted()]))
        ds = [self.start("POST", "/books/%s" % uid, json={"value": uid}) for uid in "ab"]
        self.http.flush()
        ds += [self.start("POST", "/books/%s" % uid, json={"value": uid}) for uid in "cde"]
        for _ in range(5):
            self.http.flush()
            self.threads.flush()
        self.assertEqual(calls, [["a"], ["b"], ["c", "d", "e"]])
        for d, uid in zip(ds, "abcde"):
            self.assertRecord(self.successResultOf(d), "books", uid, uid.upper())


    def test_threaded_process_answering_with_a_fired_deferred(self):
        """In the writer hop a threaded process may answer with a Deferred that has fired: its result or refusal counts."""
        self.use_node(self.make_node([type("PooledRejectOdd", (RejectOdd,), {"threaded": True})(deferred=True)]))
        accepted = self.start("POST", "/books/a", json={"value": 2})
        refused = self.start("POST", "/books/b", json={"value": 3})
        for _ in range(5):
            self.http.flush()
            self.threads.flush()
        self.assertTrue(self.successResultOf(accepted).json()["checked"])
        self.assertError(self.successResultOf(refused), 400, "rejected")

    def test_batch_process_with_a_wrong_count_fails_the_batch(self):
        """A process_batch that loses a record fails the writes of that batch (500), stores none."""

        class Lossy(Upper):
            threaded = True

            def process_batch(self, records):
                return records[1:]

        self.use_node(self.make_node([Lossy()]))
        d = self.start("POST", "/books/a", json={"value": "a"})
        for _ in range(5):
            self.http.flush()
            self.threads.flush()
        self.assertError(self.successResultOf(d), 500, "internal_error")
        self.assertError(self.get("/books/a"), 404, "not_found")
        self.flushLoggedErrors(TypeError)


class DirectRecordPathTests(APITestCase):
    """
    Plain record paths are answered by their handlers without Klein's
    routing: the same answers, errors included, as through Klein.
    """

    def test_parse_path(self):
        """One parser gives the route, collection and uid of every raw path."""
        from minstore.api import parse_path

        self.assertEqual(parse_path(b"/books/a"), ("record", "books", "a"))
        self.assertEqual(parse_path(b"/b%C3%BCcher/a%2Fb"), ("record", "b\u00fccher", "a/b"))
        self.assertEqual(parse_path(b"/books/a/b"), ("record", "books", "a/b"))
        self.assertEqual(parse_path(b"/books/"), ("collection", "books", None))
        self.assertEqual(parse_path(b"/"), ("root", None, None))
        self.assertEqual(parse_path(b"/_node/health"), ("health", None, None))
        self.assertEqual(parse_path(b"/_cluster/replicas"), ("replicas", None, None))
        self.assertEqual(parse_path(b"/_cluster/lookup/books/%2F"), ("lookup", "books", "/"))
        self.assertEqual(parse_path(b"/_cluster/lookup/books/a/b"), ("lookup", "books", "a/b"))
        for path in [b"//a", b"//", b"/books//a", b"/books/a/", b"/books/a//b", b"///x",
                     b"/_cluster/lookup/books//a", b"/b%FF/a", b"/books/%C3"]:
            with self.assertRaises(Exception) as caught:
                parse_path(path)
            self.assertEqual((caught.exception.code, caught.exception.error), (400, "bad_path"), path)
        for path in [b"/books", b"/_cluster/", b"/_cluster/nope", b"/_cluster/lookup/books"]:
            with self.assertRaises(Exception) as caught:
                parse_path(path)
            self.assertEqual(caught.exception.code, 404, path)

    def test_exception_in_handler_is_json_500(self):
        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        self.node.create = broken
        response = self.request("POST", "/books/a", json={"value": 1})
        self.assertError(response, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_deferred_is_json_500(self):
        from twisted.internet.defer import fail

        self.node.update = lambda *args, **kwargs: fail(RuntimeError("boom"))
        self.post("/books/a", 1)
        response = self.request("PUT", "/books/a", json={"value": 2})
        self.assertError(response, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_gone_before_the_answer(self):
        """
        A client that hangs up while its write is in the pool gets nothing
        written (no error either); the write itself still completes.
        """
        import io

        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.server import NOT_DONE_YET, Request
        from twisted.web.test.requesthelper import DummyChannel

        channel = DummyChannel()
        request = Request(channel, False)
        request.method, request.uri, request.path = b"POST", b"/books/a", b"/books/a"
        request.args, request.prepath, request.postpath = {}, [], [b"books", b"a"]
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.content = io.BytesIO(b'{"value": 1}')
        self.assertIs(self.api.resource().render(request), NOT_DONE_YET)
        request.connectionLost(Failure(ConnectionDone()))
        self.threads.flush()
        self.assertEqual(channel.transport.written.getvalue(), b"")
        self.assertEqual(self.get("/books/a").json()["value"], 1)

    def test_uids_with_raw_slashes(self):
        """A uid may hold raw slashes between non-empty segments; %2F stays distinct from none."""
        self.post("/books/a", 1)
        self.assertEqual(self.get("/books/a%2Fb").code, 404)
        self.assertEqual(self.request("POST", "/books/a/b", json={"value": 2}).code, 200)
        self.assertEqual(self.get("/books/a/b").json()["uid"], "a/b")
        self.assertEqual(self.get("/_node/health").code, 200)


class NodeRouteTests(APITestCase):
    def test_health(self):
        """GET /_node/health answers 200 ok with the node id."""
        response = self.get("/_node/health")
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        self.assertEqual(response.json(), {"status": "ok", "node_id": "node1"})

    def test_health_says_the_storage_is_unreachable(self):
        """An engine that cannot reach its database (postgresql's ``unavailable``) makes health 503, and 200 once back."""
        self.node.storage.unavailable = "connection refused"
        response = self.get("/_node/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.json()["error"], "storage_unavailable")
        self.assertIn("connection refused", response.json()["message"])
        self.node.storage.unavailable = None
        self.assertEqual(self.get("/_node/health").code, 200)

    def test_status(self):
        """GET /_node/status gives the node id, version, uptime and record count."""
        self.post("/books/a", 1)
        self.post("/books/b", 1)
        self.post("/films/a", 1)
        self.delete("/books/b")
        self.time.seconds += 12.5
        response = self.get("/_node/status")
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        status = response.json()
        self.assertEqual(
            {k: status[k] for k in ("node_id", "version", "uptime", "records")},
            {"node_id": "node1", "version": __version__, "uptime": 12.5, "records": 2},
        )

    def test_metrics(self):
        """GET /metrics is Prometheus text counting requests by route, method and status."""
        self.post("/books/a", 1)
        self.post("/books/a", 1)
        self.get("/books/a")
        self.get("/books/nope")
        self.get("/books/?limit=many")  # refused before any Deferred
        response = self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.header(b"content-type").startswith(b"text/plain; version=0.0.4"))
        text = response.body.decode("utf-8")
        for line in [
            'minstore_http_requests_total{method="POST",route="record",status="200"} 1.0',
            'minstore_http_requests_total{method="POST",route="record",status="400"} 1.0',
            'minstore_http_requests_total{method="GET",route="record",status="200"} 1.0',
            'minstore_http_requests_total{method="GET",route="record",status="404"} 1.0',
            'minstore_http_requests_total{method="GET",route="collection",status="400"} 1.0',
        ]:
            self.assertIn(self._normalise(line), self._lines(text))
        self.assertIn("# TYPE minstore_storage_operation_duration_seconds histogram", text)
        self.assertIn(
            self._normalise('minstore_storage_operation_duration_seconds_count{operation="write"} 1.0'),
            self._lines(text),
        )
        self.assertIn("minstore_records 1.0", text.splitlines())

    @staticmethod
    def _normalise(line):
        """A sample line with its labels sorted, whatever order the exporter writes them in."""
        match = re.match(r"(\w+)\{(.*)\} (.*)", line)
        if not match:
            return line
        labels = ",".join(sorted(match.group(2).split(",")))
        return "%s{%s} %s" % (match.group(1), labels, match.group(3))

    def _lines(self, text):
        return [self._normalise(line) for line in text.splitlines()]

    def test_openapi(self):
        """GET /openapi.json is a valid OpenAPI 3 document."""
        response = self.get("/openapi.json")
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        document = response.json()
        self.assertTrue(document["openapi"].startswith("3."))
        self.assertEqual(document["info"]["version"], __version__)
        validate_openapi(document)

    def test_openapi_documents_every_public_route(self):
        """Every public route and method of the app has its path and operation in the document."""
        document = self.get("/openapi.json").json()
        from minstore.api import _FIXED_ROUTES

        paths = {route: path.decode() for path, route in _FIXED_ROUTES.items()}
        paths.update(collection="/{collection}/", record="/{collection}/{uid}")
        checked = 0
        for route, (_, methods) in self.api.routes().items():
            if route == "lookup" or paths.get(route, "").startswith("/_cluster/"):
                continue  # inter-node routes, not public
            self.assertIn(paths[route], document["paths"], route)
            for method in methods:
                self.assertIn(method.decode().lower(), document["paths"][paths[route]], "%s %s" % (method, route))
                checked += 1
        self.assertGreaterEqual(checked, 10)

    def test_root_json(self):
        """GET / as JSON gives the node's name, version, id and collections."""
        self.post("/books/a", 1)
        self.post("/films/a", 1)
        response = self.get("/", headers={"Accept": "application/json"})
        self.assertEqual((response.code, response.header(b"content-type")), (200, JSON_TYPE))
        self.assertEqual(
            response.json(),
            {"name": "minstore", "version": __version__, "node_id": "node1", "collections": ["books", "films"]},
        )
        self.assertEqual(self.get("/").json()["node_id"], "node1")

    def test_root_html(self):
        """GET / from a browser (Accept: text/html) is the HTML console."""
        response = self.get("/", headers={"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), b"text/html; charset=utf-8")
        self.assertTrue(response.body.lower().startswith(b"<!doctype html>"), response.body[:50])
        self.assertIn(b"<title>minstore", response.body)


class FakeLookups:
    """The node's lookups, answering for any uid with the uid it was asked."""

    def __init__(self):
        self.asked = []

    def answer(self, collection, uid, visited, method, if_match, asked=()):
        self.asked.append((method, collection, uid, visited, if_match))
        return succeed(json.dumps({"collection": collection, "uid": uid}).encode("utf-8"))


class ClusterRouteTests(APITestCase):
    def test_lookup_any_uid(self):
        """The inter-node lookup route takes every uid, even one that starts with / or is /."""
        lookups = FakeLookups()
        self.use_node(self.make_node(), lookups=lookups)
        uids = ["a", "a/b", "/lead", "/", "//", "\u00e9t\u00e9", "50%"]
        for uid in uids:
            response = self.get("/_cluster/lookup/books/" + quote(uid, safe="") + "?visited=n2,n3")
            self.assertEqual(response.code, 200, uid)
            self.assertEqual(response.json(), {"collection": "books", "uid": uid})
        response = self.request("DELETE", "/_cluster/lookup/books/%2Fx", headers={"If-Match": '"v1"'})
        self.assertEqual(response.code, 200)
        self.assertEqual(lookups.asked[0], ("GET", "books", "a", ["n2", "n3"], None))
        self.assertEqual([uid for _, _, uid, _, _ in lookups.asked], uids + ["/x"])
        self.assertEqual(lookups.asked[-1], ("DELETE", "books", "/x", [], '"v1"'))


class BadRequestTests(APITestCase):
    """
    Defects found by fuzzing /openapi.json (issue 12): each bad request is a
    clear JSON 4xx, never a 500, a silent close, a redirect or a guess.
    """

    def test_numeric_parameters_take_ascii_digits_only(self):
        """limit with a superscript, Arabic-Indic or fullwidth digit: 400 bad_parameter, not 500 or a number."""
        for i in range(3):
            self.post("/books/%d" % i, i)
        for limit in ["%C2%B2", "%D9%A1", "%EF%BC%92", "%E2%91%A0", "1%C2%B2", "+1", "-1", "1.0", " 1"]:
            self.assertError(self.get("/books/?limit=" + limit), 400, "bad_parameter")
        self.assertEqual(len(self.get("/books/?limit=2").json()["items"]), 2)

    def test_content_length_takes_ascii_digits_only(self):
        """A Content-Length of non-ASCII digits is not taken as a number."""
        from minstore.api import ascii_digits

        self.assertTrue(ascii_digits(b"123") and ascii_digits("0"))
        for text in ["\u00b2", "\u0661", "\uff12", "", "1 ", b"\xd9\xa1", "1e3"]:
            self.assertFalse(ascii_digits(text), text)

    def test_deep_json_is_400(self):
        """
        A JSON body nested deeper than MAX_JSON_DEPTH (2 KB, 1,000 deep):
        400 invalid_json, not a RecursionError 500; MAX_JSON_DEPTH is taken.
        """
        for body in [b'{"value": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                     b'{"value": ' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}",
                     b"[" * 100000]:
            response = self.raw("POST", "/books/deep", body, "application/json")
            self.assertError(response, 400, "invalid_json")
        from minstore.api import MAX_JSON_DEPTH

        too_deep = b'{"value": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
        self.assertError(self.raw("POST", "/books/deep", too_deep, "application/json"), 400, "invalid_json")
        value = json.loads(b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1))
        self.assertRecord(self.post("/books/deep", value), "books", "deep", value)
        # Brackets inside strings do not nest; many siblings are not deep.
        wide = {"text": "[" * 5000, "items": [[i] for i in range(1000)]}
        self.assertRecord(self.post("/books/wide", wide), "books", "wide", wide)
        self.assertEqual(self.get("/books/").code, 200)

    def test_cache_without_dependants_is_a_client_error(self):
        """cache=1 on a node with no dependants: 400 no_dependants, not 502."""
        self.post("/books/a", 1)
        for method, path in [("GET", "/books/a"), ("PUT", "/books/a"), ("POST", "/books/b"),
                             ("DELETE", "/books/a"), ("POST", "/books/"), ("GET", "/books/"), ("GET", "/")]:
            response = self.request(method, path + "?cache=1", json={"value": 2})
            self.assertError(response, 400, "no_dependants")
        self.assertEqual(self.get("/books/a").json()["value"], 1)

    def test_empty_segment_is_bad_path(self):
        """
        //a/x, //x, /books//x, /books/x/ and an empty segment of a lookup
        are 400 bad_path: no merged slashes, no redirect, nothing stored.
        """
        for method, path in [("POST", "//a/x"), ("POST", "//x"), ("POST", "/books//x"),
                             ("POST", "/books/x/"), ("PUT", "//a/x"), ("GET", "//a/x"),
                             ("DELETE", "/books//x"), ("GET", "//"), ("GET", "/_cluster/lookup/books//x")]:
            response = self.request(method, path, json={"value": 1}, allow_redirects=False)
            self.assertError(response, 400, "bad_path")
            self.assertIsNone(response.header(b"location"))
        self.assertEqual(self.node.storage.collections(), [])
        # A uid that starts with, ends with or holds a slash is percent-encoded.
        self.assertRecord(self.post("/a/%2Fx", 1), "a", "/x", 1)
        self.assertRecord(self.post("/books/x%2F", 1), "books", "x/", 1)

    def test_root_varies_on_accept(self):
        """GET / negotiates HTML or JSON, and says so: Vary: Accept on both."""
        for accept in ["text/html", "application/json"]:
            response = self.get("/", headers={"Accept": accept})
            self.assertEqual(response.code, 200)
            self.assertEqual(response.header(b"vary"), b"Accept")

    def test_disk_full_is_507(self):
        """A write the disk has no room for: 507 insufficient_storage, not 500."""
        import errno

        self.node.create = lambda *args: fail(OSError(errno.ENOSPC, "No space left on device"))
        self.assertError(self.post("/books/a", 1), 507, "insufficient_storage")

    def test_client_gone_cancels_a_read(self):
        """A client that hangs up while its GET asks the peers cancels that work."""
        from twisted.internet.error import ConnectionDone
        from twisted.web.server import NOT_DONE_YET
        from twisted.web.test.requesthelper import DummyChannel

        cancelled = []

        class Remote:
            def get(self, collection, uid):
                return Deferred(lambda d: cancelled.append(uid))

        self.node.remote = Remote()
        channel = DummyChannel()
        from twisted.web.server import Request

        request = Request(channel, False)
        request.method, request.uri, request.path = b"GET", b"/books/far", b"/books/far"
        request.args, request.prepath, request.postpath = {}, [], [b"books", b"far"]
        self.assertIs(self.api.resource().render(request), NOT_DONE_YET)
        self.threads.flush()
        self.assertEqual(cancelled, [])
        request.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, ["far"])
        self.assertEqual(channel.transport.written.getvalue(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])


class ChannelLimitTests(SynchronousTestCase):
    """Request lines and headers over the limits: a JSON 414 or 431, then the connection closes."""

    def site(self):
        from twisted.internet.task import Clock

        from minstore.service import QuietSite

        node = Node(MemoryStorage(), node_id="node1")
        node.open()
        return QuietSite(RecordAPI(node).resource(), reactor=Clock())

    def answer(self, data, site=None):
        from twisted.internet.testing import StringTransport

        site = site or self.site()
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        self.addCleanup(channel.connectionLost, None)
        return transport

    def assertRefused(self, transport, code, error):
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % code), head)
        self.assertIn(b"Content-Type: " + JSON_TYPE, head)
        self.assertEqual(json.loads(body)["error"], error)
        self.assertTrue(transport.disconnecting)

    def test_request_line_over_16k_is_414(self):
        MAX_REQUEST_LINE = 16 * 1024
        line = b"GET /books/" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n"
        self.assertRefused(self.answer(line + b"Host: x\r\n\r\n"), 414, "uri_too_long")
        # Not even its end received: still 414.
        self.assertRefused(self.answer(line[: MAX_REQUEST_LINE * 2]), 414, "uri_too_long")
        self.assertRefused(self.answer(b"GET /" + b"a" * (4 * MAX_REQUEST_LINE)), 414, "uri_too_long")

    def test_headers_over_16k_are_431(self):
        MAX_HEADER_BYTES, MAX_HEADERS = 16 * 1024, 100
        start = b"GET /books/ HTTP/1.1\r\nHost: x\r\n"
        one_long = start + b"X-Big: " + b"b" * MAX_HEADER_BYTES + b"\r\n\r\n"
        self.assertRefused(self.answer(one_long), 431, "headers_too_large")
        many = start + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20)) + b"\r\n"
        self.assertRefused(self.answer(many), 431, "headers_too_large")
        lines = start + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n"
        self.assertRefused(self.answer(lines), 431, "headers_too_large")

    def test_a_body_of_unknown_length_is_held_in_memory(self):
        # Chunked: twisted.web's own default is a temporary file, written
        # on the reactor thread; within the site's body limit, memory.
        site = self.site()
        site.max_body = 1000
        content = site.getContentFile(None)
        self.assertIsInstance(content, io.BytesIO)
        transport = self.answer(
            b"POST /books/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"d\r\n{\"value\": 12}\r\n0\r\n\r\n",
            site,
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:200])

    def test_the_local_address_is_asked_once_a_connection(self):
        # A TCP transport answers getHost with a system call; twisted.web
        # asks at every request.  Three requests on one connection: one
        # call, and every request sees the address.
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        asked = []

        class CountingTransport(StringTransport):
            def getHost(self):
                asked.append(True)
                return IPv4Address("TCP", "127.0.0.1", 8001)

        from twisted.internet.task import Clock

        from minstore.service import QuietSite

        node = Node(MemoryStorage(), node_id="node1")
        node.open()
        hosts = []
        api = RecordAPI(node)
        site = QuietSite(api.resource(), reactor=Clock())
        channel = site.buildProtocol(None)
        transport = CountingTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        original = site.requestFactory

        def request_factory(*args, **kwargs):
            request = original(*args, **kwargs)
            hosts.append(request.getHost())
            return request

        channel.requestFactory = request_factory
        channel.dataReceived(b"GET /_node/health HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 3)
        self.assertEqual(hosts, [IPv4Address("TCP", "127.0.0.1", 8001)] * 3)
        self.assertEqual(len(asked), 1)

    def test_within_the_limits_is_served(self):
        start = b"GET /books/?prefix=" + b"p" * 15000 + b" HTTP/1.1\r\nHost: x\r\n"
        transport = self.answer(start + b"X-Big: " + b"b" * 15000 + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:100])
        self.assertFalse(transport.disconnecting)
