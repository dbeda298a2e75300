"""
End-to-end tests of one real node (issue 2): ``twistd -n minstore`` child
processes on loopback ports, driven over real HTTP with treq, stopped with
SIGTERM, killed with SIGKILL and restarted on the same data directory.

Versions are compared as strings: the node's versions are fixed-width
hybrid-logical-clock strings, ordered as strings (DESIGN section 2).
"""

import hashlib
import json
import os
import sys

from twisted.internet.defer import DeferredList, ensureDeferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.harness import NodeProcess, NodeTestMixin, deferred_test, sleep

OPTIONS = [
    "--port",
    "--servers",
    "--data",
    "--storage",
    "--processes",
    "--schemas",
    "--max-record-size",
]


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class CrudTests(NodeTestMixin, TestCase):
    """The records API of one node, over real HTTP."""

    def assertJSONError(self, code, headers, body, status, error=None):
        self.assertEqual(code, status, body)
        self.assertTrue(headers.get("content-type", "").startswith("application/json"), headers)
        document = json.loads(body)
        self.assertIsInstance(document.get("message"), str, document)
        if error is not None:
            self.assertEqual(document.get("error"), error, document)
        else:
            self.assertIsInstance(document.get("error"), str, document)
        return document

    @deferred_test
    async def test_crud(self):
        """POST, GET with ETag, PUT, DELETE, then GET 404, and listings."""
        node = await self.start_node()
        base = node.url + "/books/"

        # POST with a form body.
        code, headers, body = await self.call("POST", base + "b1", data={"value": "hello"})
        self.assertEqual(code, 200, body)
        self.assertTrue(headers["content-type"].startswith("application/json"))
        created = json.loads(body)
        self.assertEqual(created["uid"], "b1")
        self.assertEqual(created["collection"], "books")
        self.assertEqual(created["value"], "hello")
        self.assertEqual(created["check_sum"], hashlib.sha256(canonical("hello")).hexdigest())
        self.assertEqual(created["size"], len(canonical("hello")))
        self.assertIsInstance(created["timestamp"], float)
        self.assertEqual(headers["etag"], '"%s"' % created["version"])
        posted = body

        # A second POST of the same uid: a JSON 400.
        code, headers, body = await self.call("POST", base + "b1", data={"value": "again"})
        self.assertJSONError(code, headers, body, 400, "record_exists")

        # GET: the stored bytes, the same ETag; 304 for If-None-Match.
        code, headers, got = await self.call("GET", base + "b1")
        self.assertEqual(code, 200, got)
        self.assertEqual(got, posted)
        self.assertEqual(headers["etag"], '"%s"' % created["version"])
        code, _, _ = await self.call("GET", base + "b1", headers={"If-None-Match": headers["etag"]})
        self.assertEqual(code, 304)

        # PUT with a JSON body, then If-Match with the old ETag fails.
        value = {"title": "Dune", "tags": ["sf", "é"], "n": 1}
        code, headers, body = await self.call(
            "PUT", base + "b1", json={"value": value}, headers={"If-Match": '"%s"' % created["version"]}
        )
        self.assertEqual(code, 200, body)
        updated = json.loads(body)
        self.assertEqual(updated["value"], value)
        self.assertEqual(updated["check_sum"], hashlib.sha256(canonical(value)).hexdigest())
        self.assertGreater(updated["version"], created["version"])
        self.assertEqual(headers["etag"], '"%s"' % updated["version"])
        code, headers, body = await self.call(
            "PUT", base + "b1", json={"value": "x"}, headers={"If-Match": '"%s"' % created["version"]}
        )
        self.assertJSONError(code, headers, body, 412)
        # An unchanged PUT is idempotent: the stored record.
        code, _, body = await self.call("PUT", base + "b1", json={"value": value})
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["version"], updated["version"])
        # PUT of a missing uid: 404.
        code, headers, body = await self.call("PUT", base + "nope", json={"value": 1})
        self.assertJSONError(code, headers, body, 404)

        # POST to the collection: uid from the body, or generated.
        code, _, body = await self.call("POST", base, json={"uid": "b2", "value": [1, 2]})
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["uid"], "b2")
        code, _, body = await self.call("POST", base, json={"value": None})
        self.assertEqual(code, 200, body)
        generated = json.loads(body)["uid"]
        self.assertRegex(generated, r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
        # A multipart form body, and a uid that needs percent-encoding.
        boundary = "xYzZY"
        multipart = (
            "--%s\r\nContent-Disposition: form-data; name=\"value\"\r\n\r\n"
            "text with spaces\r\n--%s--\r\n" % (boundary, boundary)
        ).encode()
        code, _, body = await self.call(
            "POST",
            base + "a%2Fb%20c",
            data=multipart,
            headers={"Content-Type": "multipart/form-data; boundary=" + boundary},
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["uid"], "a/b c")
        self.assertEqual(json.loads(body)["value"], "text with spaces")

        # Listing: every record, in uid order; paging with limit and next.
        code, headers, body = await self.call("GET", base)
        self.assertEqual(code, 200, body)
        listing = json.loads(body)
        uids = [item["uid"] for item in listing["items"]]
        self.assertEqual(uids, sorted(["b1", "b2", generated, "a/b c"]))
        self.assertIsNone(listing["next"])
        seen = []
        url = base + "?limit=1"
        for _ in range(10):
            code, _, body = await self.call("GET", url)
            self.assertEqual(code, 200, body)
            page = json.loads(body)
            self.assertLessEqual(len(page["items"]), 1)
            seen += [item["uid"] for item in page["items"]]
            if page["next"] is None:
                break
            url = base + "?limit=1&after=" + page["next"]
        self.assertEqual(seen, uids)
        code, _, body = await self.call("GET", base + "?prefix=b")
        self.assertEqual(
            [item["uid"] for item in json.loads(body)["items"]],
            [uid for uid in uids if uid.startswith("b")],  # the generated uid may, too
        )

        # DELETE, then GET and DELETE are 404 (JSON).
        code, headers, body = await self.call("DELETE", base + "b1")
        self.assertEqual(code, 200, body)
        self.assertTrue(json.loads(body)["deleted"])
        code, headers, body = await self.call("GET", base + "b1")
        self.assertJSONError(code, headers, body, 404)
        code, headers, body = await self.call("DELETE", base + "b1")
        self.assertJSONError(code, headers, body, 404)
        code, _, body = await self.call("GET", base)
        self.assertNotIn("b1", [item["uid"] for item in json.loads(body)["items"]])
        # A deleted uid can be created again.
        code, _, body = await self.call("POST", base + "b1", data={"value": "back"})
        self.assertEqual(code, 200, body)
        self.assertGreater(json.loads(body)["version"], updated["version"])

    @deferred_test
    async def test_errors_are_json(self):
        """Bad input is answered with a JSON error body, never HTML."""
        node = await self.start_node()
        base = node.url + "/books/"
        code, headers, body = await self.call(
            "POST", base + "x", data=b"{not json", headers={"Content-Type": "application/json"}
        )
        self.assertJSONError(code, headers, body, 400, "invalid_json")
        code, headers, body = await self.call("POST", base + "x", json={"no": "value"})
        self.assertJSONError(code, headers, body, 400, "missing_value")
        code, headers, body = await self.call("POST", base + "x", data={"other": "field"})
        self.assertJSONError(code, headers, body, 400, "missing_value")
        code, headers, body = await self.call(
            "POST", base + "x", data=b"hello", headers={"Content-Type": "text/plain"}
        )
        self.assertJSONError(code, headers, body, 415)
        code, headers, body = await self.call("POST", base + "x", json={"uid": "y", "value": 1})
        self.assertJSONError(code, headers, body, 400)
        code, headers, body = await self.call("GET", node.url + "/bad%20name/x")
        self.assertJSONError(code, headers, body, 400)
        code, headers, body = await self.call("GET", base + "missing")
        self.assertJSONError(code, headers, body, 404)
        code, headers, body = await self.call("GET", base + "?limit=zero")
        self.assertJSONError(code, headers, body, 400)
        code, headers, body = await self.call("PATCH", base + "x", json={"value": 1})
        self.assertJSONError(code, headers, body, 405)
        code, headers, body = await self.call(
            "POST", base + "big", json={"value": "x" * (1024 * 1024 + 10)}
        )
        self.assertJSONError(code, headers, body, 413)
        # None of these stored anything.
        code, _, body = await self.call("GET", base)
        self.assertEqual(json.loads(body)["items"], [])

    @deferred_test
    async def test_lang(self):
        """
        The lang process runs in a real node, in the node's own process:
        English and French text are detected, and a node with the memory
        engine (no file writer) has no child process.
        """
        node = await self.start_node(args=["--storage", "memory"])
        sentences = {
            "en": "The quick brown fox jumps over the lazy dog while the farmer sleeps in the house.",
            "fr": "Le renard brun saute par-dessus le chien paresseux pendant que le fermier dort.",
        }
        for lang, text in sentences.items():
            code, _, body = await self.call("POST", node.url + "/texts/" + lang, data={"value": text})
            self.assertEqual(code, 200, body)
            self.assertEqual(json.loads(body)["lang"], lang, body)
            self.assertIn(b'"lang":"%s"' % lang.encode(), body)
            code, _, body = await self.call("GET", node.url + "/texts/" + lang)
            self.assertEqual(json.loads(body)["lang"], lang, body)
        code, _, body = await self.call("POST", node.url + "/texts/n", json={"value": 12345})
        self.assertEqual(code, 200, body)
        self.assertIsNone(json.loads(body)["lang"])
        children = "/proc/%d/task/%d/children" % (node.pid, node.pid)
        if os.path.exists(children):
            with open(children) as f:
                self.assertEqual(f.read().split(), [])


class DurabilityTests(NodeTestMixin, TestCase):
    """What a node keeps across SIGTERM, SIGKILL and restarts."""

    def assertCleanExit(self, node):
        self.assertEqual(
            node.exit_code,
            0,
            "exit code %s, signal %s; output:\n%s" % (node.exit_code, node.exit_signal, node.output()),
        )
        self.assertIn("storage closed", node.output())
        self.assertNotIn("Traceback", node.output())

    async def assertStored(self, node, acknowledged):
        """Every acknowledged ``uid -> record bytes`` is served exactly, after a restart."""
        results = await gatherResults(
            [ensureDeferred(self.call("GET", node.url + "/c/" + uid)) for uid in acknowledged]
        )
        for (uid, body), (code, _, got) in zip(acknowledged.items(), results):
            self.assertEqual((uid, code), (uid, 200), got)
            self.assertEqual(got, body, uid)

    @deferred_test
    async def test_sigterm_then_restart(self):
        """
        SIGTERM: exit 0 and the output says the storage was closed; a
        restart on the same data dir serves every record, and versions
        made after it are greater than those made before.
        """
        node = await self.start_node()
        acknowledged = {}
        for i in range(20):
            code, _, body = await self.call(
                "POST", node.url + "/c/r%02d" % i, json={"value": {"i": i, "text": "é" * i}}
            )
            self.assertEqual(code, 200, body)
            acknowledged["r%02d" % i] = body
        code, _, body = await self.call("PUT", node.url + "/c/r03", json={"value": "three"})
        self.assertEqual(code, 200, body)
        acknowledged["r03"] = body
        code, _, body = await self.call("DELETE", node.url + "/c/r04")
        self.assertEqual(code, 200, body)
        del acknowledged["r04"]
        before = max(json.loads(b)["version"] for b in acknowledged.values())

        await node.stop()
        self.assertCleanExit(node)

        await node.restart()
        await self.assertStored(node, acknowledged)
        code, _, body = await self.call("GET", node.url + "/c/r04")
        self.assertEqual(code, 404, body)
        code, _, body = await self.call("GET", node.url + "/c/?limit=1000")
        self.assertEqual(sorted(item["uid"] for item in json.loads(body)["items"]), sorted(acknowledged))

        code, _, body = await self.call("PUT", node.url + "/c/r03", json={"value": "four"})
        self.assertEqual(code, 200, body)
        self.assertGreater(json.loads(body)["version"], before)
        code, _, body = await self.call("POST", node.url + "/c/new", json={"value": 1})
        self.assertEqual(code, 200, body)
        self.assertGreater(json.loads(body)["version"], before)

    @deferred_test
    async def test_kill9_after_acknowledged_writes(self):
        """
        SIGKILL right after 50 concurrent POSTs were acknowledged: after a
        restart every one is there, with the exact bytes acknowledged.
        """
        node = await self.start_node()
        uids = ["k%03d" % i for i in range(50)]
        results = await gatherResults(
            [
                ensureDeferred(
                    self.call("POST", node.url + "/c/" + uid, json={"value": {"uid": uid, "pad": "ü" * 100}})
                )
                for uid in uids
            ]
        )
        acknowledged = {}
        for uid, (code, _, body) in zip(uids, results):
            self.assertEqual(code, 200, body)
            acknowledged[uid] = body
        await node.kill9()
        self.assertEqual(node.exit_signal, 9)

        await node.restart()
        await self.assertStored(node, acknowledged)

    @deferred_test
    async def test_sigterm_with_writes_in_flight(self):
        """
        SIGTERM while clients keep writing: the node exits 0, and every
        write answered 200 is there after a restart.
        """
        node = await self.start_node()
        acknowledged = {}
        answered = []

        async def writer(w):
            for i in range(60):
                uid = "w%02d-%03d" % (w, i)
                try:
                    code, _, body = await self.call(
                        "POST", node.url + "/c/" + uid, json={"value": [w, i, "x" * 200]}, timeout=5
                    )
                except Exception:
                    return  # refused or cut: the node is stopping
                answered.append(code)
                if code != 200:
                    return
                acknowledged[uid] = body

        writers = [ensureDeferred(writer(w)) for w in range(16)]
        for _ in range(100):  # at most 5 s for the first acknowledgements
            if len(acknowledged) >= 40:
                break
            await sleep(0.05)
        self.assertTrue(acknowledged, "no write was acknowledged:\n" + node.output())
        node.signal("TERM")
        await DeferredList(writers)
        await node.wait_exit(15)
        self.assertCleanExit(node)
        self.assertLess(
            len(acknowledged),
            16 * 60,
            "every write finished before the SIGTERM (answers: %s)" % sorted(set(answered)),
        )

        await node.restart()
        await self.assertStored(node, acknowledged)


class OptionTests(NodeTestMixin, TestCase):
    """A bad option stops the start quickly, non-zero, with one clear line."""

    async def refused(self, **kwargs):
        node = await self.run_node_to_exit(timeout=15, **kwargs)
        self.assertNotEqual(node.exit_code, 0, node.output())
        self.assertIsNotNone(node.exit_code, "killed by signal %s" % (node.exit_signal,))
        lines = node.output_lines()
        self.assertEqual(len(lines), 1, node.output())
        self.assertNotIn("Traceback", node.output())
        return lines[0]

    @deferred_test
    async def test_unknown_option(self):
        line = await self.refused(args=["--frobnicate", "3"])
        self.assertIn("--frobnicate", line)

    @deferred_test
    async def test_bad_port(self):
        line = await self.refused(port_arg="99999")
        self.assertIn("--port", line)
        self.assertIn("99999", line)
        line = await self.refused(port_arg="tcp:notaport")
        self.assertIn("--port", line)
        self.assertIn("notaport", line)

    @deferred_test
    async def test_port_in_use(self):
        """
        A real twistd start on a port in use: exit status 2, one line naming
        the endpoint, and no data directory created.
        """
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = os.path.abspath(os.path.join(self.mktemp(), "data"))
        node = await self.run_node_to_exit(timeout=15, port=port, data_dir=data)
        self.assertEqual(node.exit_code, 2, node.output())
        lines = node.output_lines()
        self.assertEqual(len(lines), 1, node.output())
        self.assertIn("tcp:%d:interface=127.0.0.1" % port, lines[0])
        self.assertIn("in use", lines[0])
        self.assertFalse(os.path.exists(data))

    @deferred_test
    async def test_missing_servers_file(self):
        missing = os.path.abspath(os.path.join(self.mktemp(), "servers.list"))
        line = await self.refused(args=["--servers", missing])
        self.assertIn(missing, line)

    @deferred_test
    async def test_bad_servers_line(self):
        line = await self.refused(
            servers="# peers\n\nhttp://127.0.0.1:1\nftp://example.org/x\nhttp://127.0.0.1:2\n"
        )
        self.assertIn("servers.list:4", line)
        self.assertIn("ftp://example.org/x", line)

    @deferred_test
    async def test_unknown_storage_engine(self):
        line = await self.refused(args=["--storage", "cassandra"])
        self.assertIn("--storage", line)
        self.assertIn("cassandra", line)


class PluginTests(NodeTestMixin, TestCase):
    """twistd finds the minstore plugin, as after ``pip install``."""

    @deferred_test
    async def test_help_lists_every_option(self):
        node = await self.run_node_to_exit(timeout=10, args=["--help"])
        self.assertEqual(node.exit_code, 0, node.output())
        for option in OPTIONS:
            self.assertIn(option, node.output())

    @deferred_test
    async def test_twistd_lists_minstore(self):
        probe = NodeProcess(self.mktemp())
        d = getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--help"],
            env=probe.environ(),
            path=probe.base_dir,
        )
        d.addTimeout(10, self.reactor)
        out, err, code = await d
        self.assertEqual(code, 0, err)
        self.assertIn(b"minstore", out)
