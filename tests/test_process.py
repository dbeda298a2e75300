"""
Processes: language detection, JSON Schema validation, the pipeline that
chains them, and processes added by a third-party package.
"""

import importlib
import json
import os
import random
import sys
import textwrap
from array import array

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from minstore.api import RecordAPI
from minstore.errors import Rejected
from minstore.interfaces import IProcess
from minstore.node import Node
from minstore.process import BUILTIN, DEFAULT, available_processes, make_processes, run_pipeline
from minstore.process import lang as lang_module, langscore
from minstore.process.lang import LanguageDetection, detect_language, make_scorer, text_of
from minstore.process.schema import SchemaError, SchemaValidation, SchemaViolation, json_path, load_schemas
from minstore.records import make_record
from minstore.storage.memory import MemoryStorage

ENGLISH = "The quick brown fox jumps over the lazy dog while the children are playing in the garden."
FRENCH = "Le renard brun rapide saute par-dessus le chien paresseux pendant que les enfants jouent dans le jardin."
GERMAN = "Der schnelle braune Fuchs springt \u00fcber den faulen Hund, w\u00e4hrend die Kinder im Garten spielen."

BOOKS_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "authors": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title"],
}


def record(value, collection="books", uid="u"):
    return make_record(collection, uid, value, "0000000000001-000000-n", 1.0)


CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lang_corpus.txt")
#: Written without spaces between words: windows of characters, not words.
NO_SPACES = {"ja", "zh", "th"}

#: The README's example values and the lang py3langid gave them before the
#: pure-Python scorer (a node at bfb782c, with the language worker).
README_EXAMPLES = [
    ("hello world, this is minstore", "en"),
    ("A desert planet and its spice", "en"),
    ({"title": "Dune Messiah", "year": 1969}, None),
    ("Children of Dune", None),
    (42, None),
    ("Dune, by Frank Herbert", None),
    ("x", None),
    ("again", None),
    ("Le chat dort sur le canap\u00e9", "fr"),
]


def corpus():
    """
    ``(language, text)`` pairs, the same on every run: for each language of
    tests/lang_corpus.txt, its sentences, all of them as one text, and 16
    windows of 1-12 words (2-40 characters for the languages written without
    spaces) at seeded random places, some upper-cased (py3langid lower-cases
    an all-capitals text) or lower-cased.  Short windows are where the
    confidence is near the undecidable threshold.
    """
    by_lang = {}
    with open(CORPUS_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                code, sentence = line.rstrip("\n").split("\t")
                by_lang.setdefault(code, []).append(sentence)
    rng = random.Random(11)
    texts = []
    for code in sorted(by_lang):
        whole = " ".join(by_lang[code])
        texts.extend((code, sentence) for sentence in by_lang[code])
        texts.append((code, whole))
        for i in range(16):
            if code in NO_SPACES:
                n = rng.randint(2, 40)
                start = rng.randrange(max(1, len(whole) - n))
                text = whole[start : start + n]
            else:
                words = whole.split()
                n = rng.randint(1, 12)
                start = rng.randrange(max(1, len(words) - n))
                text = " ".join(words[start : start + n])
            if i % 8 == 3:
                text = text.upper()
            elif i % 8 == 5:
                text = text.lower()
            texts.append((code, text))
    return texts


EXPECTED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lang_corpus_expected.txt")


def expected_answers():
    """py3langid 0.4's (language, confidence) for each text of L{corpus}, as recorded."""
    with open(EXPECTED_FILE, encoding="utf-8") as f:
        return [(code, float(confidence)) for code, confidence in
                (line.split() for line in f if not line.startswith("#"))]


def write_expected():
    """Re-record tests/lang_corpus_expected.txt (after changing the corpus), on CPython."""
    stock = stock_py3langid()
    with open(EXPECTED_FILE, "w", encoding="utf-8") as f:
        f.write("# py3langid 0.4.0's classify of each text of tests.test_process.corpus(), in order:\n")
        f.write("# language, confidence (norm_probs=True, two-letter codes).  Made on CPython with\n")
        f.write("# tests/test_process.py's write_expected(); test_expected_is_py3langids checks it.\n")
        for _, text in corpus():
            f.write("%s %.7f\n" % stock.classify(text))


_cache = {}


def sparse_scorer():
    """One SparseScorer for all the tests (it takes seconds to build)."""
    if "sparse" not in _cache:
        _cache["sparse"] = langscore.SparseScorer()
    return _cache["sparse"]


def stock_py3langid():
    """py3langid 0.4's own identifier, as it loads itself, kept to two-letter codes."""
    if not langscore.has_py3langid_04():
        raise SkipTest("py3langid 0.4 is not installed (pip has only 0.3 for Python 3.9 and PyPy 3.9)")
    if "stock" not in _cache:
        from py3langid import langid

        stock = langid._load_identifier(norm_probs=True)
        stock.set_languages([l for l in stock.nb_classes if len(l) == 2])
        _cache["stock"] = stock
    return _cache["stock"]


def decision(answer):
    """What lang stores for a classify answer: the code, or None under MIN_CONFIDENCE."""
    code, confidence = answer
    return code if confidence >= lang_module.MIN_CONFIDENCE else None


class Client:
    """A node with the given processes behind the HTTP API, in memory."""

    def __init__(self, testcase, processes):
        self.testcase = testcase
        self.node = Node(MemoryStorage(), processes, node_id="n1")
        self.node.open()
        self.http = StubTreq(RecordAPI(self.node).resource())

    def request(self, method, path, **kwargs):
        d = self.http.request(method, "http://node.test" + path, **kwargs)
        self.http.flush()
        response = self.testcase.successResultOf(d)
        body = self.testcase.successResultOf(response.content())
        return response.code, json.loads(body)


class LanguageTests(SynchronousTestCase):
    def setUp(self):
        self.lang = LanguageDetection({})

    def test_interface(self):
        """lang is an IProcess named lang, run in the thread pool."""
        self.assertTrue(verifyObject(IProcess, self.lang))
        self.assertEqual(self.lang.name, "lang")
        self.assertTrue(self.lang.threaded)

    def test_languages(self):
        """English, French and German sentences are detected as en, fr and de."""
        for text, code in [(ENGLISH, "en"), (FRENCH, "fr"), (GERMAN, "de")]:
            self.assertEqual(self.lang(record(text))["lang"], code, text)

    def test_undecidable(self):
        """Digits, an empty string, punctuation or a value with no text give null."""
        for value in ["12345", "", "   ", "?!... 42", 12345, None, True, [], {}, [1, 2.5]]:
            self.assertIsNone(self.lang(record(value))["lang"], repr(value))
            self.assertIn("lang", self.lang(record(value)))

    def test_gibberish_undecidable(self):
        """Text too short or too odd to tell a language apart gives null, not a guess."""
        for text in ["ok", "asdf qwer zxcv", "x1 y2 z3"]:
            self.assertIsNone(self.lang(record(text))["lang"], text)

    def test_text_inside_objects(self):
        """The strings inside an object or array value are what is detected."""
        value = {"title": "Le Petit Prince", "year": 1943, "body": [FRENCH, {"more": FRENCH}]}
        self.assertEqual(self.lang(record(value))["lang"], "fr")
        value = {"n": 1, "text": {"deep": [GERMAN]}}
        self.assertEqual(self.lang(record(value))["lang"], "de")

    def test_text_of(self):
        """text_of joins the strings of a value in document order, skipping other types."""
        self.assertEqual(text_of({"a": "one", "b": [2, "two", {"c": "three"}], "d": None}), "one two three")
        self.assertEqual(text_of("plain"), "plain")
        self.assertEqual(text_of(7), "")

    def test_record_otherwise_unchanged(self):
        """lang adds its field and leaves the rest of the record as it was."""
        original = record(ENGLISH)
        result = self.lang(dict(original))
        self.assertEqual(result, dict(original, lang="en"))

    def test_detect_language(self):
        """detect_language gives an ISO 639-1 code (two letters), or None."""
        self.assertEqual(detect_language(ENGLISH), "en")
        self.assertIsNone(detect_language("1234 5678"))

    def test_through_the_api(self):
        """A record POSTed to a node running lang carries the language."""
        client = Client(self, [self.lang])
        code, document = client.request("POST", "/notes/a", json={"value": {"text": GERMAN}})
        self.assertEqual((code, document["lang"]), (200, "de"))
        code, document = client.request("POST", "/notes/b", json={"value": 12345})
        self.assertEqual(code, 200)
        self.assertIsNone(document["lang"])
        self.assertIsNone(client.request("GET", "/notes/b")[1]["lang"])


    def test_readme_examples(self):
        """The README's example values get the lang they got before the pure-Python scorer."""
        for value, code in README_EXAMPLES:
            self.assertEqual(self.lang(record(value))["lang"], code, value)

    def test_process_batch(self):
        """process_batch sets lang on every record of a batch, in order, as one by one."""
        values = [ENGLISH, 12345, {"t": FRENCH}, "", GERMAN, "ok"]
        records = [record(v, uid=str(i)) for i, v in enumerate(values)]
        result = self.lang.process_batch(records)
        self.assertEqual([r["lang"] for r in result], ["en", None, "fr", None, "de", None])
        self.assertEqual([r["uid"] for r in result], [str(i) for i in range(len(values))])
        self.assertEqual(result, [self.lang(record(v, uid=str(i))) for i, v in enumerate(values)])

    def test_no_child_process(self):
        """lang has no life of its own: nothing for the node to start or stop."""
        self.assertFalse(hasattr(self.lang, "start"))
        self.assertFalse(hasattr(self.lang, "stop"))


class SparseLanguageTests(LanguageTests):
    """The same tests, whatever this interpreter uses, with the pure-Python sparse scorer."""

    def setUp(self):
        self.patch(lang_module, "_identifier", sparse_scorer())
        self.lang = LanguageDetection({})


class ScorerTests(SynchronousTestCase):
    """The pure-Python sparse scorer gives py3langid 0.4's answers."""

    def test_corpus(self):
        """The corpus has at least 1,000 texts in at least 40 languages."""
        texts = corpus()
        self.assertGreaterEqual(len(texts), 1000)
        self.assertGreaterEqual(len({code for code, _ in texts}), 40)

    def test_sparse_equals_py3langid(self):
        """
        On every text of the corpus the sparse scorer gives py3langid's
        language and the same decision (a code, or null under 0.5), its
        confidence within 1e-5.  Most texts are classified as written, and
        some short ones are undecidable: both sides of the threshold are
        exercised.
        """
        stock, sparse = stock_py3langid(), sparse_scorer()
        right = undecided = 0
        for code, text in corpus():
            expected, got = stock.classify(text), sparse.classify(text)
            self.assertEqual(got[0], expected[0], text)
            self.assertEqual(decision(got), decision(expected), text)
            self.assertAlmostEqual(got[1], expected[1], places=5, msg=text)
            right += decision(expected) == code
            undecided += decision(expected) is None
        self.assertGreater(right, 900)
        self.assertGreater(undecided, 50)

    def test_sparse_equals_recorded_py3langid(self):
        """
        The same, against py3langid's answers recorded on CPython, so that it
        holds on an interpreter without py3langid 0.4 (PyPy 3.9): a record
        gets the same lang whichever interpreter the node runs.
        """
        sparse = sparse_scorer()
        texts, expected = corpus(), expected_answers()
        self.assertEqual(len(expected), len(texts))
        for (_, text), answer in zip(texts, expected):
            got = sparse.classify(text)
            self.assertEqual(got[0], answer[0], text)
            self.assertEqual(decision(got), decision(answer), text)
            self.assertAlmostEqual(got[1], answer[1], places=5, msg=text)

    def test_expected_is_py3langids(self):
        """
        tests/lang_corpus_expected.txt is py3langid's answers for the corpus
        of today.  The confidences to 5 decimals, as everywhere here:
        py3langid sums in float32, and numpy's BLAS kernels sum in an order
        of their own per CPU (up to 1.8e-6 apart seen on an AVX-512 machine).
        """
        stock = stock_py3langid()
        for (_, text), (code, confidence) in zip(corpus(), expected_answers()):
            self.assertEqual(stock.classify(text)[0], code, text)
            self.assertAlmostEqual(stock.classify(text)[1], confidence, places=5, msg=text)

    def test_sparse_edge_texts(self):
        """No feature, one letter, digits, capitals, mixed scripts: py3langid's answers."""
        stock, sparse = stock_py3langid(), sparse_scorer()
        texts = ["", " ", "x", "ok", "12345", "?!", "HELLO THERE MY FRIEND", "\u00c9T\u00c9",
                 ENGLISH + " " + GERMAN, FRENCH[:20] + "\u7d20\u65e9\u3044", "e\u0301t\u00e9",
                 "word " * 300, "\ud800 lone surrogate"]
        for text in texts:
            expected, got = stock.classify(text), sparse.classify(text)
            self.assertEqual(got[0], expected[0], repr(text))
            self.assertAlmostEqual(got[1], expected[1], places=5, msg=repr(text))

    def test_numpy_scorer_equals_py3langid(self):
        """
        The scorer CPython uses (py3langid's numpy over a float32 copy of its
        float16 table) gives py3langid's answers and confidences on the corpus.
        """
        stock = stock_py3langid()
        widened = langscore.Py3langidScorer()
        self.assertEqual(str(widened.identifier.nb_ptc.dtype), "float32")
        self.assertEqual(str(stock.nb_ptc.dtype), "float16")
        edge = ["", " ", "x", "ok", "12345", "HELLO THERE MY FRIEND", FRENCH[:20] + "\u7d20\u65e9\u3044",
                "word " * 300, "\ud800 lone surrogate", "\U0001f600 \u0645\u0631\u062d\u0628\u0627"]
        for text in [text for _, text in corpus()] + edge:
            (code, confidence), (stock_code, stock_confidence) = widened.classify(text), stock.classify(text)
            self.assertEqual(code, stock_code, repr(text))
            self.assertAlmostEqual(confidence, stock_confidence, places=5, msg=repr(text))

    def test_numpy_scorer_holds_its_dfa_in_3_bytes_an_entry(self):
        """Its DFA's transitions are 16-bit arrays and bytes, not 32-bit integers."""
        identifier = langscore.Py3langidScorer().identifier
        stock = stock_py3langid()
        self.assertIsNone(identifier.tk_nextmove)
        self.assertEqual(identifier._low.typecode, "H")
        self.assertEqual(len(identifier._low), len(stock.tk_nextmove))
        self.assertEqual(len(identifier._high), len(stock.tk_nextmove))
        self.assertGreater(max(stock.tk_nextmove), 0xFFFF)  # the high part is needed

    def test_no_numpy_in_the_sparse_scorer(self):
        """The sparse scorer keeps only stdlib arrays, lists and numbers: no numpy per call."""
        for name, value in vars(sparse_scorer()).items():
            self.assertIn(type(value), (array, list, int, float), name)
            if isinstance(value, list):
                for item in value[:1000]:
                    self.assertIn(type(item), (int, float, str, tuple), name)

    def test_model_is_py3langid_04s(self):
        """The shipped model is byte for byte the file py3langid 0.4.0 installs."""
        stock_py3langid()
        from py3langid import langid

        with open(os.path.join(langid.MODEL_DIR, langid.MODEL_FILE), "rb") as f:
            installed = f.read()
        with open(langscore.MODEL_FILE, "rb") as f:
            self.assertEqual(f.read(), installed)

    def test_model_read_without_numpy(self):
        """The model is read with the standard library only (a PyPy node imports no numpy)."""
        saved = sys.modules.get("numpy")
        sys.modules["numpy"] = None  # import numpy: ImportError
        self.addCleanup(lambda: sys.modules.pop("numpy") if saved is None else sys.modules.update(numpy=saved))
        model = langscore.read_model()
        self.assertEqual(model["shape"], (100053, 142))
        self.assertEqual(len(model["ptc"]), 100053 * 142)
        self.assertEqual(len(model["classes"]), 142)
        self.assertEqual(len(model["pc"]), 142)
        self.assertEqual(len(model["out_feat"]), len(model["nextmove_row"]))
        self.assertEqual(len(model["nextmove"]) % 256, 0)
        self.assertIn("en", model["classes"])

    def test_altered_model_refused(self):
        """A model file that is not py3langid 0.4.0's is refused, naming it."""
        path = self.mktemp()
        with open(langscore.MODEL_FILE, "rb") as f:
            data = bytearray(f.read())
        data[1000] ^= 1
        with open(path, "wb") as f:
            f.write(bytes(data))
        e = self.assertRaises(langscore.ModelError, langscore.read_model, path)
        self.assertIn(path, str(e))
        e = self.assertRaises(langscore.ModelError, langscore.read_model, path + ".missing")
        self.assertIn(path + ".missing", str(e))

    def test_scorer_per_interpreter(self):
        """PyPy scores in pure Python; CPython with py3langid 0.4 with py3langid's numpy."""
        made = []
        self.patch(langscore, "SparseScorer", lambda: made.append("sparse") or "sparse")
        self.patch(langscore, "Py3langidScorer", lambda: made.append("numpy") or "numpy")
        self.assertEqual(make_scorer("PyPy"), "sparse")
        self.patch(langscore, "has_py3langid_04", lambda: True)
        self.assertEqual(make_scorer("CPython"), "numpy")
        self.patch(langscore, "has_py3langid_04", lambda: False)
        self.assertEqual(make_scorer("CPython"), "sparse")
        self.assertEqual(made, ["sparse", "numpy", "sparse"])


class SchemaTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.write("books.json", json.dumps(BOOKS_SCHEMA))
        self.write("README.txt", "not a schema, ignored")

    def write(self, name, text):
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(text)

    def test_interface(self):
        """schema is an IProcess named schema, run off the reactor thread."""
        process = SchemaValidation({"schemas": self.directory})
        self.assertTrue(verifyObject(IProcess, process))
        self.assertEqual(process.name, "schema")
        self.assertTrue(process.threaded)
        self.assertEqual(sorted(process.validators), ["books"])

    def test_match_accepted(self):
        """A value matching its collection's schema passes unchanged."""
        process = SchemaValidation({"schemas": self.directory})
        original = record({"title": "Dune", "year": 1965, "authors": ["Herbert"]})
        self.assertEqual(process(dict(original)), original)

    def test_mismatch_names_path(self):
        """A mismatch raises schema_violation (a 400) naming the JSON path."""
        process = SchemaValidation({"schemas": self.directory})
        e = self.assertRaises(SchemaViolation, process, record({"title": "Dune", "year": "1965"}))
        self.assertEqual((e.code, e.error), (400, "schema_violation"))
        self.assertIn("$.year", e.message)
        self.assertIn("'books'", e.message)
        e = self.assertRaises(SchemaViolation, process, record({"title": "Dune", "authors": ["a", 2]}))
        self.assertIn("$.authors[1]", e.message)
        e = self.assertRaises(SchemaViolation, process, record({"year": 1965}))
        self.assertIn(" $: ", e.message)
        self.assertIn("'title' is a required property", e.message)
        e = self.assertRaises(SchemaViolation, process, record("just text"))
        self.assertIn(" $: ", e.message)

    def test_collection_without_schema(self):
        """Collections without a schema file take any value."""
        process = SchemaValidation({"schemas": self.directory})
        for value in ["text", 1, None, {"year": "x"}]:
            self.assertEqual(process(record(value, collection="films"))["value"], value)

    def test_no_schemas_option(self):
        """Without --schemas, every value passes."""
        for options in [None, {}, {"schemas": None}]:
            process = SchemaValidation(options)
            self.assertEqual(process.validators, {})
            self.assertEqual(process(record({"year": "x"}))["value"], {"year": "x"})

    def test_json_path(self):
        """json_path writes keys with dots and indexes in brackets."""
        self.assertEqual(json_path([]), "$")
        self.assertEqual(json_path(["a", 0, "b", 12]), "$.a[0].b[12]")

    def test_through_the_api(self):
        """Through the API, a mismatch is 400 schema_violation and nothing is stored; a match is 200."""
        client = Client(self, [SchemaValidation({"schemas": self.directory})])
        code, document = client.request("POST", "/books/a", json={"value": {"title": "Dune", "year": "soon"}})
        self.assertEqual((code, document["error"]), (400, "schema_violation"))
        self.assertEqual(sorted(document), ["error", "message"])
        self.assertIn("$.year", document["message"])
        self.assertEqual(client.request("GET", "/books/a")[0], 404)
        code, document = client.request("POST", "/books/a", json={"value": {"title": "Dune", "year": 1965}})
        self.assertEqual((code, document["value"]["year"]), (200, 1965))
        code, document = client.request("PUT", "/books/a", json={"value": {"title": 7}})
        self.assertEqual((code, document["error"]), (400, "schema_violation"))
        self.assertIn("$.title", document["message"])
        self.assertEqual(client.request("GET", "/books/a")[1]["value"], {"title": "Dune", "year": 1965})
        code, document = client.request("POST", "/films/a", json={"value": {"year": "soon"}})
        self.assertEqual(code, 200)

    def test_load_invalid_json(self):
        """A schema file that is not JSON raises SchemaError naming the file."""
        self.write("films.json", "{not json")
        e = self.assertRaises(SchemaError, load_schemas, self.directory)
        self.assertIn(os.path.join(self.directory, "films.json"), str(e))
        self.assertIn("not a JSON document", str(e))

    def test_load_invalid_schema(self):
        """A JSON file that is not a valid JSON Schema raises SchemaError naming the file."""
        self.write("films.json", json.dumps({"type": 12}))
        e = self.assertRaises(SchemaError, load_schemas, self.directory)
        self.assertIn(os.path.join(self.directory, "films.json"), str(e))
        self.assertIn("not a valid JSON Schema", str(e))

    def test_load_schemas(self):
        """load_schemas maps each {collection}.json to a validator; no directory gives none."""
        self.write("films.json", json.dumps({"type": "array"}))
        validators = load_schemas(self.directory)
        self.assertEqual(sorted(validators), ["books", "films"])
        self.assertTrue(validators["films"].is_valid([]))
        self.assertFalse(validators["films"].is_valid({}))
        self.assertEqual(load_schemas(None), {})
        self.assertEqual(load_schemas(""), {})


class Tag:
    """A process that appends its tag to the record's trace."""

    threaded = False

    def __init__(self, tag, threaded=False, deferred=None):
        self.name = tag
        self.tag = tag
        self.threaded = threaded
        self.deferred = deferred

    def __call__(self, record):
        record.setdefault("trace", []).append(self.tag)
        if self.deferred is not None:
            return self.deferred.addCallback(lambda _: record)
        return record


def refuse_inline(f, *args):
    raise AssertionError("in_thread called for a process that is not threaded")


class PipelineTests(SynchronousTestCase):
    def test_order(self):
        """Processes run in the order given, each on the previous one's output."""
        result = self.successResultOf(
            run_pipeline(record(1), [Tag("a"), Tag("b"), Tag("c")], refuse_inline)
        )
        self.assertEqual(result["trace"], ["a", "b", "c"])

    def test_no_processes(self):
        """With no process the record comes out as it went in."""
        original = record({"x": 1})
        self.assertEqual(self.successResultOf(run_pipeline(dict(original), [], refuse_inline)), original)

    def test_deferred_process(self):
        """A process returning a Deferred holds the chain until it fires."""
        gate = Deferred()
        d = run_pipeline(record(1), [Tag("a"), Tag("slow", deferred=gate), Tag("c")], refuse_inline)
        self.assertNoResult(d)
        gate.callback(None)
        self.assertEqual(self.successResultOf(d)["trace"], ["a", "slow", "c"])

    def test_threaded_process_through_in_thread(self):
        """Threaded processes are called through in_thread; the others are called directly."""
        calls = []

        def in_thread(f, *args):
            calls.append((f, args))
            return succeed(f(*args))

        heavy = Tag("heavy", threaded=True)
        light = Tag("light")
        result = self.successResultOf(run_pipeline(record(1), [light, heavy, light], in_thread))
        self.assertEqual(result["trace"], ["light", "heavy", "light"])
        self.assertEqual([f for f, _ in calls], [heavy])
        self.assertIs(calls[0][1][0], result)

    def test_threaded_waits_for_thread(self):
        """The chain waits for the thread pool's answer before the next process."""
        pending = []

        def in_thread(f, *args):
            d = Deferred()
            pending.append((f, args, d))
            return d

        d = run_pipeline(record(1), [Tag("heavy", threaded=True), Tag("after")], in_thread)
        self.assertNoResult(d)
        f, args, thread_d = pending.pop()
        thread_d.callback(f(*args))
        self.assertEqual(self.successResultOf(d)["trace"], ["heavy", "after"])

    def test_rejection_stops_chain(self):
        """A process that raises Rejected fails the pipeline; later processes do not run."""
        after = Tag("after")

        def reject(record):
            raise Rejected("rejected", "no thanks")

        failure = self.failureResultOf(run_pipeline(record(1), [Tag("a"), reject, after], refuse_inline), Rejected)
        self.assertEqual((failure.value.code, failure.value.message), (400, "no thanks"))


class RegistryTests(SynchronousTestCase):
    def test_builtins(self):
        """lang and schema are the built-in processes, both run by default."""
        self.assertEqual(BUILTIN, {"lang": LanguageDetection, "schema": SchemaValidation})
        self.assertEqual(DEFAULT, "lang,schema")
        processes = make_processes(["schema", "lang"], {})
        self.assertEqual([p.name for p in processes], ["schema", "lang"])

    def test_unknown(self):
        """An unknown process name raises KeyError naming it."""
        e = self.assertRaises(KeyError, make_processes, ["lang", "nosuch"], {})
        self.assertEqual(e.args, ("nosuch",))


FANCYPROC = '''
"""A third-party minstore process: upper-cases string values."""

from zope.interface import implementer

from minstore.interfaces import IProcess


@implementer(IProcess)
class Shout:
    name = "shout"
    threaded = False

    def __init__(self, options):
        self.options = options

    def __call__(self, record):
        if isinstance(record["value"], str):
            record["value"] = record["value"].upper() + self.options.get("suffix", "")
        record["shouted"] = True
        return record
'''


class ThirdPartyTests(SynchronousTestCase):
    """A package adds a process through the minstore.processes entry point group."""

    def setUp(self):
        site = os.path.abspath(self.mktemp())
        info = os.path.join(site, "fancyproc-1.0.dist-info")
        os.makedirs(info)
        with open(os.path.join(site, "fancyproc.py"), "w") as f:
            f.write(textwrap.dedent(FANCYPROC))
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: fancyproc\nVersion: 1.0\n")
        with open(os.path.join(info, "entry_points.txt"), "w") as f:
            f.write("[minstore.processes]\nshout = fancyproc:Shout\n")
        sys.path.insert(0, site)
        importlib.invalidate_caches()

        def cleanup():
            sys.path.remove(site)
            sys.modules.pop("fancyproc", None)
            importlib.invalidate_caches()

        self.addCleanup(cleanup)

    def test_registered(self):
        """The package's process is known by name without any change to minstore."""
        self.assertIn("shout", available_processes())
        self.assertNotIn("shout", BUILTIN)
        [process] = make_processes(["shout"], {"suffix": "!"})
        self.assertEqual(type(process).__module__, "fancyproc")
        self.assertTrue(verifyObject(IProcess, process))
        self.assertEqual(process.options, {"suffix": "!"})

    def test_record_transformed(self):
        """A record POSTed to a node running the package's process is transformed by it."""
        processes = make_processes(["schema", "shout"], {"suffix": "!"})
        client = Client(self, processes)
        code, document = client.request("POST", "/notes/a", json={"value": "hello"})
        self.assertEqual(code, 200)
        self.assertEqual((document["value"], document["shouted"]), ("HELLO!", True))
        self.assertEqual(client.request("GET", "/notes/a")[1], document)

    def test_gone_after_cleanup(self):
        """Without the package on sys.path, the process is unknown again."""
        site = sys.path[0]
        sys.path.remove(site)
        importlib.invalidate_caches()
        try:
            self.assertNotIn("shout", available_processes())
            self.assertRaises(KeyError, make_processes, ["shout"], {})
        finally:
            sys.path.insert(0, site)
            importlib.invalidate_caches()


class LangModelLoadingTests(SynchronousTestCase):
    def test_long_text_is_cut(self):
        """Only the first MAX_TEXT characters of a value's text are classified."""
        from minstore.process import lang

        seen = []

        class Recorder:
            def classify(self, text):
                seen.append(len(text))
                return ("en", 0.99)

        self.patch(lang, "_identifier", Recorder())
        self.assertEqual(lang.detect_language("word " * 5000), "en")
        self.assertEqual(seen, [lang.MAX_TEXT])
