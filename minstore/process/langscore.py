"""
py3langid 0.4.0's language identifier, scored in pure Python.

py3langid (a fork of langid.py) walks a text's UTF-8 bytes through a DFA
whose accepting states are its byte n-gram features, counts the features
seen, and scores each language with naive Bayes: ``log1p(count) @ P(t|c) +
P(c)``, a dense product with a float16 table of 100,053 features by 142
languages, in numpy.  Under PyPy numpy goes through the C-API emulation
(0.2-1.4 ms a text); L{SparseScorer} computes the same scores with plain
Python over arrays, which PyPy's JIT makes fast:

 * the table is kept only for the two-letter (ISO 639-1) languages minstore
   reports, and sparse: each language's most common weight is its ``base``
   (the weight of an n-gram its training text never had), and a feature
   keeps only the weights that differ from their language's base, as
   ``weight - base`` (exact: the difference of two float16 numbers fits a
   double);
 * a text's score for language ``c`` is ``P(c) + base[c] * sum(w) + sum(w *
   delta[f, c])`` over its features ``f``, with ``w = log1p(count)``: the
   same sum as py3langid's, in double precision (py3langid's is float32);
 * normalisation and decision are py3langid 0.4's: scores times
   ``1/sqrt(bytes)``, softmax, the probability of a duplicated label (``sr``,
   Cyrillic and Latin) folded into its first column, argmax.

The model is py3langid 0.4.0's own file (``data/py3langid-0.4.0-model.npz.xz``,
byte for byte, with its licence beside it): pip installs py3langid 0.3 (a
different model) on Python 3.9 and PyPy 3.9, and a record must get the same
``lang`` whichever interpreter the node that took the write runs.  numpy reads
it, once, at start; nothing in the per-text path uses numpy.
"""

import hashlib
import io
import lzma
import math
import os
import unicodedata
from array import array

MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "py3langid-0.4.0-model.npz.xz")
#: The SHA-256 of py3langid 0.4.0's py3langid/data/model.npz.xz.
MODEL_SHA256 = "f4f4a2c3465ca1f081541037f9cac23021d68151c2f709c55ae5eedfca522963"

_TYPECODE = {2: "H", 4: "I", 8: "L"}


class ModelError(Exception):
    """The model file is missing, altered or not in py3langid 0.4's layout."""


def read_model(path=MODEL_FILE):
    """
    py3langid 0.4's model, as its ``modelio.load_model`` reads it: ``(ptc,
    pc, classes, nextmove, row, output)``; ``ptc`` and ``pc`` numpy arrays,
    ``nextmove`` and ``row`` stdlib arrays, ``output`` a list.
    """
    import numpy

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelError("cannot read the language model %s: %s" % (path, e))
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise ModelError("%s is not py3langid 0.4.0's model (SHA-256 differs)" % (path,))
    with numpy.load(io.BytesIO(lzma.decompress(data)), allow_pickle=False) as npz:
        return (
            npz["ptc"],
            npz["pc"],
            npz["classes"].tolist(),
            _to_array(npz["nextmove"]),
            _to_array(npz["nextmove_row"]),
            npz["out_feat"].tolist(),
        )


def _to_array(values):
    import numpy

    out = array(_TYPECODE[values.dtype.itemsize])
    out.frombytes(memoryview(numpy.ascontiguousarray(values)).cast("B"))
    return out


def two_letter(classes):
    """The column indexes of the ISO 639-1 (two-letter) languages, in order."""
    return [i for i, c in enumerate(classes) if len(c) == 2]


def encode(text):
    """The bytes py3langid 0.4 scores for ``text`` (its ``_encode``)."""
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


class SparseScorer:
    """
    ``classify(text)`` gives py3langid 0.4's ``(language, confidence)`` for a
    str, with ``norm_probs=True`` and the languages kept to two-letter codes;
    thread-safe (nothing is written after construction).
    """

    def __init__(self, model=None):
        import numpy

        ptc, pc, classes, nextmove, row, output = model if model is not None else read_model()
        keep = two_letter(classes)
        self.classes = [classes[i] for i in keep]
        table = numpy.asarray(ptc)[:, keep]
        # Each language's most common weight (an n-gram never seen in it).
        base = numpy.empty(len(keep), dtype=table.dtype)
        for c in range(len(keep)):
            values, counts = numpy.unique(table[:, c], return_counts=True)
            base[c] = values[counts.argmax()]
        features, columns = numpy.nonzero(table != base)  # feature by feature
        deltas = table[features, columns].astype(numpy.float64) - base[columns].astype(numpy.float64)
        # The entries of feature f are starts[f]:starts[f + 1].
        starts = numpy.searchsorted(features, numpy.arange(table.shape[0] + 1))
        self.starts = array("l", starts.astype(numpy.int64).tolist())
        self.columns = array("B", columns.astype(numpy.uint8).tobytes())
        self.deltas = array("d", numpy.ascontiguousarray(deltas).tobytes())
        self.base = base.astype(numpy.float64).tolist()
        self.prior = numpy.asarray(pc)[keep].astype(numpy.float64).tolist()
        self.nextmove = nextmove
        self.rowbase = [r << 8 for r in row]
        self.output = output
        first, self.aliases = {}, []
        for i, c in enumerate(self.classes):
            if c in first:
                self.aliases.append((first[c], i))
            else:
                first[c] = i
        #: log1p(n) for the counts a text usually has.
        self.weights = [math.log1p(n) for n in range(256)]

    def features(self, data):
        """{feature: count} of the n-grams in ``data`` (bytes): py3langid's DFA walk."""
        nextmove, rowbase, output = self.nextmove, self.rowbase, self.output
        counts = {}
        state = 0
        for byte in data:
            state = nextmove[rowbase[state] + byte]
            f = output[state]
            if f >= 0:
                counts[f] = counts.get(f, 0) + 1
        return counts

    def scores(self, data):
        """The naive Bayes log-posterior of each language, or None without a feature."""
        counts = self.features(data)
        if not counts:
            return None
        scores = [0.0] * len(self.classes)
        starts, columns, deltas, weights = self.starts, self.columns, self.deltas, self.weights
        total = 0.0
        for f, n in counts.items():
            w = weights[n] if n < 256 else math.log1p(n)
            total += w
            for k in range(starts[f], starts[f + 1]):
                scores[columns[k]] += w * deltas[k]
        return [p + b * total + s for p, b, s in zip(self.prior, self.base, scores)]

    def probabilities(self, text):
        """py3langid 0.4's normalised probabilities, aliases folded."""
        data = encode(text)
        scores = self.scores(data)
        if scores is None:
            # No feature: py3langid scores every language 0, i.e. uniform.
            probs = [1.0 / len(self.classes)] * len(self.classes)
        else:
            scale = 1.0 / math.sqrt(len(data) or 1)
            top = max(scores)
            probs = [math.exp((s - top) * scale) for s in scores]
            total = sum(probs)
            probs = [p / total for p in probs]
        for i, j in self.aliases:
            probs[i] += probs[j]
            probs[j] = 0.0
        return probs

    def classify(self, text):
        probs = self.probabilities(text)
        best = 0
        for i in range(1, len(probs)):
            if probs[i] > probs[best]:
                best = i
        return self.classes[best], probs[best]


class Py3langidScorer:
    """
    py3langid 0.4's own numpy scoring (the faster one on CPython) over the
    same model file, its float16 table widened to float32 (see
    L{widen_table}).
    """

    def __init__(self):
        from py3langid import langid

        identifier = langid.LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        identifier.set_languages([identifier.nb_classes[i] for i in two_letter(identifier.nb_classes)])
        widen_table(identifier)
        self.identifier = identifier
        self.classify = identifier.classify


def widen_table(identifier):
    """
    Score with a float32 copy of py3langid 0.4's float16 feature table.

    numpy has no fast float16 arithmetic: each classification converted the
    rows it used to float32 on the way.  A contiguous float32 table costs
    46 MB more and makes a classification about 3x faster, with the same
    scores (py3langid computes in float32): checked in tests/test_process.py.
    """
    import numpy

    table = getattr(identifier, "nb_ptc", None)
    if isinstance(table, numpy.ndarray) and table.dtype == numpy.float16:
        identifier.nb_ptc = numpy.ascontiguousarray(table, dtype=numpy.float32)


def has_py3langid_04():
    """Whether the installed py3langid can score the 0.4 model itself."""
    try:
        from py3langid import langid
    except ImportError:
        return False
    return hasattr(getattr(langid, "LanguageIdentifier", None), "from_model_file")
