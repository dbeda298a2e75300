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
``lang`` whichever interpreter the node that took the write runs.  It is read
once, at start (2-4 s), with the standard library only: a PyPy node imports
no numpy at all.
"""

import ast
import collections
import gc
import hashlib
import itertools
import lzma
import math
import operator
import os
import struct
import sys
import tempfile
import unicodedata
import zipfile
from array import array

MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "py3langid-0.4.0-model.npz.xz")
#: The SHA-256 of py3langid 0.4.0's py3langid/data/model.npz.xz.
MODEL_SHA256 = "f4f4a2c3465ca1f081541037f9cac23021d68151c2f709c55ae5eedfca522963"

class ModelError(Exception):
    """The model file is missing, altered or not in py3langid 0.4's layout."""


def read_model(path=MODEL_FILE):
    """
    py3langid 0.4's model file, read without numpy: a dict of its arrays
    (``ptc``: the float16 table's bits, row-major, an ``array("H")``;
    ``pc``, ``nextmove``, ``nextmove_row``, ``out_feat``: stdlib arrays;
    ``classes``: a list of str), and ``shape``, the table's (features,
    languages).
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        raise ModelError("cannot read the language model %s: %s" % (path, e))
    if digest.hexdigest() != MODEL_SHA256:
        raise ModelError("%s is not py3langid 0.4.0's model (SHA-256 differs)" % (path,))
    # Decompressed (68 MB) into a temporary file through one buffer, as
    # py3langid does: never all in memory, and no garbage for PyPy's GC.
    with tempfile.TemporaryFile(suffix=".npz") as tmp:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with lzma.open(path) as source:
            while True:
                n = source.readinto(buffer)
                if not n:
                    break
                tmp.write(view[:n])
        tmp.seek(0)
        model = {}
        with zipfile.ZipFile(tmp) as npz:
            for name in ("ptc", "pc", "classes", "nextmove", "nextmove_row", "out_feat"):
                with npz.open(name + ".npy") as member:
                    model[name], shape = _read_npy(member, name)
                if name == "ptc":
                    model["shape"] = shape
    return model


#: numpy's little-endian dtypes in the model, as stdlib array type codes.
_NPY_TYPES = {"<f2": "H", "<f4": "f", "<u2": "H", "<u4": "I", "<i4": "i", "<U3": None}


def _read_npy(member, name):
    """The array of an .npy file (numpy's format 1.0-3.0) and its shape."""
    magic = member.read(8)
    if magic[:6] != b"\x93NUMPY":
        raise ModelError("the language model's %s is not an .npy array" % (name,))
    size = member.read(2 if magic[6] == 1 else 4)
    header = ast.literal_eval(member.read(int.from_bytes(size, "little")).decode("latin-1"))
    descr, shape = header["descr"], header["shape"]
    if descr not in _NPY_TYPES or header["fortran_order"] or sys.byteorder != "little":
        raise ModelError("the language model's %s has an unexpected layout (%r)" % (name, header))
    count = 1
    for n in shape:
        count *= n
    if descr == "<U3":  # fixed-width UTF-32 strings
        data = member.read(12 * count)
        return [data[i : i + 12].decode("utf-32-le").rstrip("\x00") for i in range(0, len(data), 12)], shape
    values = array(_NPY_TYPES[descr])
    while len(values) < count:
        chunk = member.read(min(1 << 20, (count - len(values)) * values.itemsize))
        if not chunk:
            raise ModelError("the language model's %s is truncated" % (name,))
        values.frombytes(chunk)
    return values, shape


def two_letter(classes):
    """The column indexes of the ISO 639-1 (two-letter) languages, in order."""
    return [i for i, c in enumerate(classes) if len(c) == 2]


def encode(text):
    """The bytes py3langid 0.4 scores for ``text`` (its ``_encode``)."""
    if text.isupper():
        text = text.lower()
    if text.isascii():
        return text.encode("ascii")  # NFC leaves ASCII as it is (12 us a text saved on PyPy)
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


class SparseScorer:
    """
    ``classify(text)`` gives py3langid 0.4's ``(language, confidence)`` for a
    str, with ``norm_probs=True`` and the languages kept to two-letter codes;
    thread-safe (nothing is written after construction).
    """

    def __init__(self, model=None):
        model = model if model is not None else read_model()
        ptc, (n_features, n_classes) = model["ptc"], model["shape"]
        keep = two_letter(model["classes"])
        self.classes = [model["classes"][i] for i in keep]
        # float16 bits -> float, for all 65,536 of them.
        half = struct.unpack("<65536e", array("H", range(65536)).tobytes())
        # Each language's most common weight (an n-gram never seen in it).
        base_bits = [collections.Counter(ptc[c::n_classes]).most_common(1)[0][0] for c in keep]
        base = [half[b] for b in base_bits]
        # Feature by feature, the languages whose weight is not their base:
        # the entries of feature f are starts[f]:starts[f + 1].
        kept_of = operator.itemgetter(*keep)
        languages = range(len(keep))
        ne = operator.ne
        # Signed ("l"): PyPy reads an "L" item as an unsigned machine word,
        # and the arithmetic on it made scores() half again as slow.
        self.starts = starts = array("l", [0])
        self.columns = columns = array("B")
        self.deltas = deltas = array("d")
        for f in range(n_features):
            kept = kept_of(ptc[f * n_classes : (f + 1) * n_classes])
            differ = list(itertools.compress(languages, map(ne, kept, base_bits)))
            columns.extend(differ)
            deltas.extend([half[kept[j]] - base[j] for j in differ])
            starts.append(len(columns))
        self.base = base
        self.prior = [float(model["pc"][i]) for i in keep]
        self.nextmove = model["nextmove"]
        self.rowbase = [r << 8 for r in model["nextmove_row"]]
        self.output = model["out_feat"]
        first, self.aliases = {}, []
        for i, c in enumerate(self.classes):
            if c in first:
                self.aliases.append((first[c], i))
            else:
                first[c] = i
        #: log1p(n) for the counts a text usually has.
        self.weights = [math.log1p(n) for n in range(256)]
        del model, ptc
        release_memory()

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


def release_memory():
    """
    Collect the garbage of loading the model (the 28 MB table, the file's
    chunks) and give the freed memory back to the system: glibc keeps freed
    blocks for reuse otherwise, 40-70 MB of a PyPy node's RSS.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass  # not glibc: what was freed stays with the process, for reuse


class Py3langidScorer:
    """
    py3langid 0.4's own numpy scoring (the faster one on CPython) over the
    same model file, its float16 table widened to float32 (see
    L{widen_table}).
    """

    def __init__(self):
        from py3langid import langid

        identifier = _compact_identifier_class(langid).from_model_file(MODEL_FILE, norm_probs=True)
        identifier.set_languages([identifier.nb_classes[i] for i in two_letter(identifier.nb_classes)])
        widen_table(identifier)
        identifier.compact_dfa()
        # Let the full float16 table (28 MB) go: set_languages is not called again.
        identifier._full_model = (identifier.nb_ptc, identifier.nb_pc, identifier.nb_classes)
        self.identifier = identifier
        release_memory()
        self.classify = identifier.classify


def _compact_identifier_class(langid):
    """
    py3langid's LanguageIdentifier with its DFA's transition table held in
    12 MB less: 9.8 M entries naming one of 104,583 states, 42 MB as 32-bit
    integers, kept as their low 16 bits (an ``array("H")``) and their high
    bits (a ``bytes``), 3 bytes an entry.  The walk reads one byte more a
    step (about 1 µs more for a 75-byte text; the per-state row offsets and
    outputs stay lists: as arrays they would save 6 MB more and cost 2 µs
    more); the features, counts and scores are py3langid's.
    """

    class CompactIdentifier(langid.LanguageIdentifier):
        __slots__ = ("_low", "_high")

        def compact_dfa(self):
            import numpy

            # numpy, not a loop over the 9.8 M entries: 0.08 s of start-up against 1 s.
            moves = numpy.asarray(memoryview(self.tk_nextmove))
            if moves.max() >= 1 << 24:
                raise ModelError("the language model's DFA has more states than this walk holds")
            self._low = array("H")
            self._low.frombytes(moves.astype(numpy.uint16).data.cast("B"))  # the cast keeps the low 16 bits
            self._high = (moves >> 16).astype(numpy.uint8).tobytes()
            self.tk_nextmove = None

        def _raw_score(self, text):
            low, high, rowbase, output = self._low, self._high, self._rowbase, self.tk_output
            state, indexes = 0, []
            append = indexes.append
            for letter in text:
                at = rowbase[state] + letter
                state = low[at] | high[at] << 16
                feature = output[state]
                if feature >= 0:
                    append(feature)
            if indexes:
                return self._sparse_score(collections.Counter(indexes), self.nb_ptc)
            # No feature: py3langid's own answer for that (its walk of no byte).
            return langid.LanguageIdentifier._raw_score(self, b"")

    return CompactIdentifier


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
