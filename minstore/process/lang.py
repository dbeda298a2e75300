"""``lang``: the ISO 639-1 language of a record's text, or null."""

import platform
import threading

from zope.interface import implementer

from minstore.interfaces import IProcess
from minstore.process import langscore

#: Below this normalised probability the language is undecidable.
MIN_CONFIDENCE = 0.5
#: Characters of a value's text that are classified: enough to tell a
#: language, and a bound on the CPU one record can cost.
MAX_TEXT = 1000

_identifier = None
_identifier_lock = threading.Lock()


def make_scorer(implementation=None):
    """
    The scorer of py3langid 0.4.0's model for this interpreter; both give
    py3langid's answers (L{minstore.process.langscore}).  On CPython with
    py3langid 0.4, py3langid's own numpy scoring (50-100 µs a sentence,
    10x faster there than pure Python); anywhere else (PyPy, or Python 3.9,
    where pip installs py3langid 0.3) the pure-Python sparse scorer (about
    30 µs a sentence on PyPy, where numpy's C-API emulation makes py3langid
    take 0.4-1.4 ms).
    """
    implementation = implementation or platform.python_implementation()
    if implementation == "CPython" and langscore.has_py3langid_04():
        return langscore.Py3langidScorer()
    return langscore.SparseScorer()


def _get_identifier():
    """The scorer, made once per process (the model loads in 2-4 s)."""
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            _identifier = make_scorer()
        return _identifier


def text_of(value):
    """The text of a value: a string, or the strings inside an object or array."""
    if isinstance(value, str):
        return value
    parts = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return " ".join(parts)


def _has_letters(text):
    return any(ch.isalpha() for ch in text)


def detect_language(text):
    if not _has_letters(text):
        return None
    lang, confidence = _get_identifier().classify(text[:MAX_TEXT])
    return lang if confidence >= MIN_CONFIDENCE else None


@implementer(IProcess)
class LanguageDetection:
    """
    The ``lang`` process.  Threaded: the node calls it off the reactor, in
    the writer thread's hop (with a whole batch of records at once,
    L{process_batch}); the model is loaded when the process is made, before
    the node serves.
    """

    name = "lang"
    threaded = True

    def __init__(self, options=None):
        _get_identifier()

    def __call__(self, record):
        return self.process_batch([record])[0]

    def process_batch(self, records):
        """Set ``lang`` on each record (in place); the records."""
        for record in records:
            record["lang"] = detect_language(text_of(record.get("value"))[:MAX_TEXT])
        return records
