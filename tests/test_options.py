"""
``twistd minstore`` options: each bad one stops the start with exit status 2
and one line on stderr; good ones build the node's service tree.
"""

import io
import json
import os
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from minstore.api import BoundedRequest
from minstore.node import Node
from minstore.process.lang import LanguageDetection
from minstore.process.schema import SchemaValidation
from minstore.node import run_inline
from minstore.service import NodeRoot
from minstore.storage.files import FileStorage
from minstore.storage.memory import MemoryStorage
from minstore.api import BoundedChannel
from minstore.tap import ListeningService, Options, listens_beyond_loopback, makeService


class OptionsTestCase(SynchronousTestCase):
    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.data = os.path.join(self.dir, "data")

    def file(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def parse(self, *args, processes=""):
        """Parsed options; a fast default of no processes unless the test names some."""
        argv = ["--data", self.data]
        if processes is not None:
            argv += ["--processes", processes]
        options = Options()
        options.parseOptions(argv + list(args))
        return options

    def assertBad(self, *args, processes="", includes=()):
        """The options stop the start: exit status 2, one line on stderr naming the problem."""
        e = self.assertRaises(SystemExit, self.parse, *args, processes=processes)
        self.assertEqual(e.code, 2)
        text = self.stderr.getvalue()
        self.assertTrue(text.endswith("\n"), repr(text))
        self.assertEqual(text.count("\n"), 1, repr(text))
        self.assertTrue(text.startswith("minstore: error: "), repr(text))
        for fragment in includes:
            self.assertIn(fragment, text)
        self.stderr.seek(0)
        self.stderr.truncate()
        return text


class BadOptionTests(OptionsTestCase):
    def test_bad_port(self):
        """A port that is neither 1-65535 nor an endpoint string is refused."""
        self.assertBad("--port", "abc", includes=["--port", "'abc'"])
        self.assertBad("--port", "99999", includes=["--port", "99999"])
        self.assertBad("--port", "0", includes=["--port", "0"])
        self.assertBad("--port", "65536", includes=["65536"])
        self.assertBad("--port", "tcp:notaport", includes=["--port", "tcp:notaport"])

    def test_missing_servers_file(self):
        """A --servers file that does not exist is refused, naming it."""
        missing = os.path.join(self.dir, "nope.list")
        self.assertBad("--servers", missing, includes=[missing])

    def test_servers_file_bad_line(self):
        """A servers.list line that is not a peer URL is refused naming file:LINE."""
        path = self.file("servers.list", "# peers\n\nhttp://127.0.0.1:8002\nftp://example.com\n")
        self.assertBad("--servers", path, includes=["%s:4" % path, "ftp://example.com"])

    def test_servers_file_star_not_first(self):
        """A '*' after a peer is refused naming file:LINE."""
        path = self.file("servers.list", "http://127.0.0.1:8002\n*\n")
        self.assertBad("--servers", path, includes=["%s:2" % path, "*"])

    def test_servers_file_not_utf8(self):
        """A servers.list that is not UTF-8 text is refused naming the file."""
        path = os.path.join(self.dir, "servers.list")
        with open(path, "wb") as f:
            f.write(b"http://h\xff:1\n")
        self.assertBad("--servers", path, includes=[path])

    def test_unknown_storage(self):
        """An unknown --storage engine is refused, naming it and the known ones."""
        self.assertBad("--storage", "nope", includes=["--storage", "'nope'", "files", "memory"])

    def test_unknown_process(self):
        """An unknown --processes name is refused, naming it and the known ones."""
        self.assertBad(processes="lang,nope", includes=["--processes", "'nope'", "lang", "schema"])

    def test_schemas_not_a_directory(self):
        """--schemas that is not a directory is refused."""
        missing = os.path.join(self.dir, "no-schemas")
        self.assertBad("--schemas", missing, processes="schema", includes=["--schemas", missing])
        a_file = self.file("schema.json", "{}")
        self.assertBad("--schemas", a_file, processes="schema", includes=["--schemas", a_file])

    def test_schema_bad_json(self):
        """A schema file that is not JSON is refused naming the file."""
        schemas = os.path.join(self.dir, "schemas")
        os.makedirs(schemas)
        with open(os.path.join(schemas, "books.json"), "w") as f:
            f.write('{"type": "object",\n')
        self.assertBad(
            "--schemas", schemas, processes="schema",
            includes=["--schemas", os.path.join(schemas, "books.json"), "not a JSON document"],
        )

    def test_schema_invalid(self):
        """A schema file that is not a valid JSON Schema is refused naming the file."""
        schemas = os.path.join(self.dir, "schemas")
        os.makedirs(schemas)
        with open(os.path.join(schemas, "books.json"), "w") as f:
            json.dump({"type": "nonsense"}, f)
        self.assertBad("--schemas", schemas, processes="schema", includes=[os.path.join(schemas, "books.json")])

    def test_bad_max_record_size(self):
        """--max-record-size must be a whole number above 0."""
        self.assertBad("--max-record-size", "0", includes=["--max-record-size", "0"])
        self.assertBad("--max-record-size", "-5", includes=["--max-record-size", "-5"])
        self.assertBad("--max-record-size", "x", includes=["--max-record-size", "'x'"])
        self.assertBad("--max-record-size", "1.5", includes=["--max-record-size"])

    def test_bad_threads(self):
        """--threads must be a whole number above 0."""
        self.assertBad("--threads", "0", includes=["--threads"])

    def test_data_not_a_directory(self):
        """--data naming a file is refused."""
        a_file = self.file("plain", "")
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--data", a_file, "--processes", ""])
        self.assertEqual(e.code, 2)
        self.assertEqual(self.stderr.getvalue().count("\n"), 1)
        self.assertIn("--data", self.stderr.getvalue())

    def test_unknown_option(self):
        """An option minstore does not have is refused in one line."""
        self.assertBad("--colour", "red", includes=["colour"])


class GoodOptionTests(OptionsTestCase):
    def test_port_number(self):
        """A port number becomes a tcp endpoint string; the default is 8001."""
        self.assertEqual(self.parse("--port", "8001")["port"], "tcp:8001")
        self.assertEqual(self.parse("--port", "1")["port"], "tcp:1")
        self.assertEqual(self.parse()["port"], "tcp:8001")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_endpoint_string(self):
        """An endpoint string is kept as it is."""
        port = "tcp:8001:interface=127.0.0.1"
        self.assertEqual(self.parse("--port", port)["port"], port)

    def test_defaults(self):
        """Without options: files storage, lang and schema, 1 MiB bodies, no peers."""
        options = self.parse(processes=None)
        self.assertEqual(options["storage"], "files")
        self.assertEqual(options["max-record-size"], 1024 * 1024)
        # Replicas to one peer at most every 10 ms under load (bench/REPLICATION.md).
        self.assertEqual(options["replication-interval"], 0.01)
        self.assertEqual(
            [type(p) for p in options["process_list"]], [LanguageDetection, SchemaValidation]
        )
        self.assertEqual(options["server_list"].peers, ())
        self.assertFalse(options["server_list"].bridge)
        # Parsing creates nothing: makeService makes the data directory.
        self.assertFalse(os.path.exists(self.data))
        # lang scores in the node itself, in the thread pool: no child to start.
        lang = options["process_list"][0]
        self.assertTrue(lang.threaded)
        self.assertFalse(hasattr(lang, "start"))

    def test_no_lang_worker_gone(self):
        """--no-lang-worker is gone with the language worker: an unknown option."""
        self.assertBad("--no-lang-worker", includes=["no-lang-worker"])

    def test_servers_and_sizes(self):
        """A servers.list, sizes and processes are parsed into their values."""
        path = self.file("servers.list", "*\n# two peers\nhttp://127.0.0.1:8002/\nhttps://example.com\n")
        options = self.parse(
            "--servers", path, "--max-record-size", "100", "--storage", "memory", processes="schema"
        )
        self.assertEqual(options["server_list"].peers, ("http://127.0.0.1:8002", "https://example.com:443"))
        self.assertTrue(options["server_list"].bridge)
        self.assertEqual(options["max-record-size"], 100)
        self.assertEqual([p.name for p in options["process_list"]], ["schema"])


class MakeServiceTests(OptionsTestCase):
    def test_service_tree(self):
        """
        makeService wires, without starting, a NodeRoot holding the thread
        pool, the node, the cluster and the HTTP server on the --port
        endpoint, already bound (before the data directory is made: a busy
        port stops the start with nothing created); no thread runs before it
        starts, and nothing is read from the port before the reactor runs.
        """
        options = self.parse("--port", "tcp:0:interface=127.0.0.1", "--max-record-size", "500")
        reactor = MemoryReactorClock()
        root = makeService(options, reactor=reactor)
        self.assertIsInstance(root, NodeRoot)
        self.assertFalse(root.running)
        self.assertFalse(root.pool.started)
        self.assertEqual(root.pool.max, 10)
        node = root.node
        self.assertIsInstance(node, Node)
        self.assertIsInstance(node.storage, FileStorage)
        self.assertEqual(node.storage.root, os.path.join(self.data, "records"))
        self.assertEqual(node.processes, [])
        self.assertIsInstance(root.port, ListeningService)
        self.assertFalse(root.port.running)
        [(port, site, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIs(site.requestFactory, BoundedRequest)
        self.assertIs(site.protocol, BoundedChannel)
        self.assertEqual(site.max_body, 500)

    def test_start_and_stop_in_order(self):
        """
        Started, the node opens its storage before the port is served (it is
        bound since makeService, but read only once the reactor runs, after
        the start); at stop the port is closed first, then the writes drain,
        replication saves its checkpoints, the storage closes, and the thread
        pool stops last.
        """
        options = self.parse("--port", "tcp:0:interface=127.0.0.1", "--storage", "sqlite")
        reactor = MemoryReactorClock()
        root = makeService(options, reactor=reactor)
        events = []
        storage = root.node.storage
        real_open, real_close = storage.open, storage.close

        def opened():
            events.append(("open", root.port.running))
            real_open()

        def closed():
            events.append(("close", root.port.running))
            real_close()

        storage.open, storage.close = opened, closed
        root.pool.start = lambda: events.append("pool start")
        root.pool.stop = lambda: events.append("pool stop")
        root.node.in_thread = run_inline
        root.cluster.replication.in_thread = run_inline
        root.startService()
        self.assertEqual(events, ["pool start", ("open", False)])
        self.assertTrue(root.port.running)
        self.successResultOf(root.stopService())
        self.assertEqual(events[2:], [("close", False), "pool stop"])

    def test_port_in_use(self):
        """
        A port in use stops the start with one line naming the endpoint and
        exit status 2, before anything is created: no data directory.
        """
        import socket

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        endpoint = "tcp:%d:interface=127.0.0.1" % busy.getsockname()[1]
        options = self.parse("--port", endpoint, "--storage", "memory")
        from twisted.internet import reactor

        e = self.assertRaises(SystemExit, makeService, options, reactor=reactor)
        self.assertEqual(e.code, 2)
        text = self.stderr.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("minstore: error: --port: cannot listen on " + endpoint), text)
        self.assertFalse(os.path.exists(self.data))

    def test_start_that_fails_after_listening(self):
        """
        A start refused after the port is bound (here the node id cannot be
        read: a directory in its place; a full disk ends the same way) is one
        line on stderr and exit status 1, not a traceback.
        """
        os.makedirs(os.path.join(self.data, "node_id"))
        options = self.parse("--port", "tcp:0:interface=127.0.0.1", "--storage", "memory")
        from twisted.internet import reactor

        e = self.assertRaises(SystemExit, makeService, options, reactor=reactor)
        self.assertEqual(e.code, 1)
        text = self.stderr.getvalue()
        self.assertEqual(text.count("\n"), 1, text)
        self.assertTrue(text.startswith("minstore: cannot start: "), text)
        self.assertIn("node_id", text)

    def test_ascii_digits_only(self):
        """Whole-number options and --port take ASCII digits only, not other Unicode digits."""
        for option, value in [("--threads", "\u0661\u0660"), ("--max-record-size", "\uff15"),
                              ("--threads", "\u00b2"), ("--port", "\u0668\u0660\u0660\u0661")]:
            self.assertBad(option, value, includes=[option])

    def test_processes_start_and_stop_with_the_node(self):
        """A process's start() runs when the node starts, its stop() after the node's last write."""
        options = self.parse("--storage", "memory")
        calls = []

        class Lifecycle:
            name = "lifecycle"
            threaded = False

            def __call__(self, record):
                return record

            def start(self):
                calls.append("start")

            def stop(self):
                calls.append("stop (writes pending: %d)" % node.pending())

        options["process_list"] = [Lifecycle()]
        root = makeService(options, reactor=MemoryReactorClock())
        node = root.node
        root.pool.start = root.pool.stop = lambda: None
        node.in_thread = run_inline
        root.cluster.replication.in_thread = run_inline
        root.startService()
        self.assertEqual(calls, ["start"])
        self.successResultOf(root.stopService())
        self.assertEqual(calls, ["start", "stop (writes pending: 0)"])

    def test_node_id_kept(self):
        """A node keeps its id across service builds over the same data directory."""
        options = self.parse("--storage", "memory")
        first = makeService(options, reactor=MemoryReactorClock()).node
        second = makeService(options, reactor=MemoryReactorClock()).node
        self.assertIsInstance(first.storage, MemoryStorage)
        self.assertEqual(first.node_id, second.node_id)
        with open(os.path.join(self.data, "node_id")) as f:
            self.assertEqual(f.read(), first.node_id)


class LoopbackTests(SynchronousTestCase):
    def test_beyond_loopback(self):
        """Endpoints on every interface or a public address listen beyond loopback."""
        for endpoint in ["tcp:8001", "tcp:8001:interface=0.0.0.0", "tcp:8001:interface=10.0.0.5",
                         "tcp6:8001", "tcp6:8001:interface=\\:\\:", "ssl:8443:privateKey=k.pem"]:
            self.assertTrue(listens_beyond_loopback(endpoint), endpoint)

    def test_loopback_only(self):
        """Endpoints bound to a loopback address or a unix socket do not."""
        for endpoint in ["tcp:8001:interface=127.0.0.1", "tcp6:8001:interface=\\:\\:1",
                         "tcp:8001:interface=localhost", "tcp:8001:interface=127.0.0.2",
                         "ssl:8443:privateKey=k.pem:interface=127.0.0.1", "unix:/tmp/minstore.sock"]:
            self.assertFalse(listens_beyond_loopback(endpoint), endpoint)


class IndexOptionTests(OptionsTestCase):
    def test_indexes_parsed_and_passed_to_the_node(self):
        """--indexes COLLECTION:FIELD,... (with *) becomes the node's declarations."""
        options = self.parse("--indexes", "books:value.year, *:lang,books:value.author.name,books:value.year")
        self.assertEqual(
            [str(d) for d in options["index_list"]], ["books:value.year", "*:lang", "books:value.author.name"]
        )
        root = makeService(options, MemoryReactorClock())
        self.assertEqual([str(d) for d in root.node.indexes], ["books:value.year", "*:lang", "books:value.author.name"])
        self.assertEqual(self.parse()["index_list"], [])

    def test_bad_indexes(self):
        """A declaration that is not COLLECTION:FIELD, or names a listing parameter, stops the start naming it."""
        for bad in ["books", "bad/name:x", "books:", "books:value..year", "books:limit", "books:min_x", "_x:y"]:
            self.assertBad("--indexes", bad, includes=["--indexes"])

    def test_help_documents_indexes(self):
        text = str(Options())
        self.assertIn("--indexes", text)
        self.assertIn("--index-build-rate", text)
