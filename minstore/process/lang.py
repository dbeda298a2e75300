"""``lang``: the ISO 639-1 language of a record's text, or null."""

import threading

from zope.interface import implementer

from minstore.interfaces import IProcess
from minstore.process.langworker import LanguageWorker, WorkerGone

#: Below this normalised probability the language is undecidable.
MIN_CONFIDENCE = 0.5
#: Characters of a value's text that are classified: enough to tell a
#: language, and a bound on the CPU one record can cost.
MAX_TEXT = 1000

_identifier = None
_identifier_lock = threading.Lock()


def _get_identifier():
    """The py3langid model, loaded once per process and kept to ISO 639-1."""
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            from py3langid import langid

            if hasattr(langid, "_load_identifier"):  # py3langid 0.4 (Python 3.10+)
                identifier = langid._load_identifier(norm_probs=True)
            else:  # py3langid 0.3, what pip gives Python 3.9 and PyPy 3.9
                identifier = langid.LanguageIdentifier.from_pickled_model(
                    langid.MODEL_FILE, norm_probs=True
                )
            identifier.set_languages([l for l in identifier.nb_classes if len(l) == 2])
            _widen_table(identifier)
            _identifier = identifier
        return _identifier


def _widen_table(identifier):
    """
    Score with a float32 copy of py3langid 0.4's float16 feature table.

    numpy has no fast float16 arithmetic: each classification converted the
    rows it used to float32 on the way (95 of its 167 µs on a 190-character
    text).  A contiguous float32 table costs 46 MB more and brings a
    classification to 50 µs, with the same scores (py3langid computes in
    float32): checked in tests/test_process.py.
    """
    import numpy

    table = getattr(identifier, "nb_ptc", None)
    if isinstance(table, numpy.ndarray) and table.dtype == numpy.float16:
        identifier.nb_ptc = numpy.ascontiguousarray(table, dtype=numpy.float32)


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
    The ``lang`` process.  With the option ``lang-worker`` (what a node
    started by twistd has, unless ``--no-lang-worker``) texts are classified
    in a child process (L{minstore.process.langworker}); otherwise in this
    one.  Either way it is threaded: the node calls it off the reactor, with
    a whole batch of records at once (L{process_batch}).
    """

    name = "lang"
    threaded = True

    def __init__(self, options=None):
        options = options or {}
        self.worker = None
        if options.get("lang-worker"):
            self.worker = LanguageWorker()
        else:
            _get_identifier()

    def start(self):
        if self.worker is not None:
            self.worker.start()

    def stop(self):
        if self.worker is not None:
            self.worker.stop()

    def __call__(self, record):
        return self.process_batch([record])[0]

    def process_batch(self, records):
        """Set ``lang`` on each record (in place); the records."""
        texts = [text_of(record.get("value"))[:MAX_TEXT] for record in records]
        asked = [i for i, text in enumerate(texts) if _has_letters(text)]
        codes = [None] * len(records)
        if asked:
            for i, code in zip(asked, self._detect([texts[i] for i in asked])):
                codes[i] = code
        for record, code in zip(records, codes):
            record["lang"] = code
        return records

    def _detect(self, texts):
        if self.worker is not None:
            # Twice: a child that died is replaced by the second call.
            for _ in range(2):
                try:
                    return self.worker.detect(texts)
                except WorkerGone:
                    pass
            # Gone twice in a row: answer anyway, in this process (loading
            # the model here once), rather than fail the writes.
        return [detect_language(text) for text in texts]
