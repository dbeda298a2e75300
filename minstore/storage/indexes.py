"""
Secondary indexes on declared fields (``--indexes COLLECTION:FIELD,...``):
what every engine shares.  The declarations, the path of a field into a
record, and the byte encoding of a field's value that sorts as the listing
order of DESIGN section 3, so that an engine orders entries by comparing
bytes (SQLite's BLOB order, Python's ``bytes`` order).

The order across types: null < false < true < numbers < strings < arrays <
objects.  Numbers are ordered by value (``2`` and ``2.0`` are one value), as
IEEE doubles: integers beyond 2**53 are ordered by their nearest double.
Strings are ordered by code point (the uid order of a listing).  Arrays and
objects are ordered by their canonical JSON bytes (equality is exact; a range
over them follows those bytes).  ``2`` and ``"2"`` are different values in
different groups.

A record whose field is absent (or whose path crosses a value that is not an
object) has no entry in the index: no filter finds it.

An entry's key is one type byte then the value's bytes; the key just above
every key ``k`` and below every other is ``k + b"\\x00"`` (see L{bounds}).
"""

import json
import re
import struct

from minstore.records import canonical_json

#: Listing parameters that are not filters: no top-level field may be named so.
RESERVED = frozenset(["limit", "after", "prefix", "local", "cache"])
#: The filter operators, as parameter name prefixes.
OPERATORS = ("min_", "max_", "gt_", "lt_")

_SEGMENT = re.compile(r"[A-Za-z0-9_@$-]+\Z")
_COLLECTION = re.compile(r"(\*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})\Z")

_NULL, _FALSE, _TRUE, _NUMBER, _STRING, _ARRAY, _OBJECT = (bytes([b]) for b in range(1, 8))


class Declaration(tuple):
    """``(collection or "*", field)``; ``str()`` is ``COLLECTION:FIELD``."""

    __slots__ = ()

    def __new__(cls, collection, field):
        return tuple.__new__(cls, (collection, field))

    collection = property(lambda self: self[0])
    field = property(lambda self: self[1])

    def __str__(self):
        return "%s:%s" % self

    def covers(self, collection):
        return self[0] == "*" or self[0] == collection


def parse_declarations(text):
    """
    The L{Declaration}s of ``COLLECTION:FIELD,...`` (duplicates once, in the
    given order); ValueError with a reason naming the bad item.
    """
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        collection, sep, field = item.partition(":")
        if not sep or not _COLLECTION.match(collection):
            raise ValueError("%r: not COLLECTION:FIELD (COLLECTION a collection name or *)" % (item,))
        segments = field.split(".")
        if not all(_SEGMENT.match(s) for s in segments):
            raise ValueError("%r: FIELD is a dotted path of names, like lang or value.author.name" % (item,))
        if field in RESERVED or segments[0].startswith(OPERATORS):
            raise ValueError("%r: %s is a listing parameter (or starts like min_, max_, gt_, lt_)" % (item, segments[0]))
        declaration = Declaration(collection, field)
        if declaration not in out:
            out.append(declaration)
    return out


def fields_by_collection(declarations):
    """A function ``collection -> tuple of fields`` declared for it (``*`` included), memoised."""
    everywhere = tuple(d.field for d in declarations if d.collection == "*")
    own = {}
    for d in declarations:
        if d.collection != "*" and d.field not in everywhere:
            own.setdefault(d.collection, []).append(d.field)
    cache = {}

    def fields(collection):
        result = cache.get(collection)
        if result is None:
            result = cache[collection] = everywhere + tuple(own.get(collection, ()))
        return result

    return fields


_MISSING = object()


def extract(record, field):
    """The value at a dotted path of a record (a dict), or L{_MISSING}."""
    value = record
    for name in field.split("."):
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(name, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def _double(x):
    if x != x:
        raise ValueError("NaN has no place in the order")
    if x == 0:
        x = 0.0  # -0.0 and 0.0 are one value
    (bits,) = struct.unpack(">Q", struct.pack(">d", x))
    bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
    return struct.pack(">Q", bits)


def encode_key(value):
    """The sortable bytes of a JSON value (see the module's doc)."""
    if value is None:
        return _NULL
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:
            x = float("inf") if value > 0 else float("-inf")
        return _NUMBER + _double(x)
    if isinstance(value, str):
        return _STRING + value.encode("utf-8", "surrogatepass")
    if isinstance(value, list):
        return _ARRAY + canonical_json(value)
    return _OBJECT + canonical_json(value)


def record_keys(data, fields):
    """``{field: key}`` of a record's bytes, for the fields it has."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}  # not a record's JSON: nothing to index
    keys = {}
    for field in fields:
        value = extract(record, field)
        if value is not _MISSING:
            try:
                keys[field] = encode_key(value)
            except ValueError:
                pass
    return keys


def parse_value(text):
    """A filter's value: JSON when it parses (``1965``, ``"1965"``, ``true``, ``null``), else the string."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text


def _no_constant(name):
    raise ValueError(name)


def bounds(operators):
    """
    ``(start, stop)`` keys (start included, stop excluded; None: open) of
    filter operators ``{"eq"|"min"|"max"|"gt"|"lt": value}`` combined.
    """
    start = stop = None
    for op, value in operators.items():
        key = encode_key(value)
        low = high = None
        if op == "eq":
            low, high = key, key + b"\x00"
        elif op == "min":
            low = key
        elif op == "gt":
            low = key + b"\x00"
        elif op == "max":
            high = key + b"\x00"
        elif op == "lt":
            high = key
        if low is not None and (start is None or low > start):
            start = low
        if high is not None and (stop is None or high < stop):
            stop = high
    return start, stop


def encode_index_cursor(field, key, uid):
    """The ``next`` of a filtered listing: its field, and the (key, uid) of the last item."""
    import base64

    f, u = field.encode("utf-8"), uid.encode("utf-8")
    payload = struct.pack(">H", len(f)) + f + struct.pack(">I", len(key)) + key + u
    return "i." + base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")


def decode_index_cursor(cursor):
    """``(field, key, uid)`` of an L{encode_index_cursor}; ValueError when it is not one."""
    import base64
    import binascii

    if not cursor.startswith("i."):
        raise ValueError("not a filtered listing's cursor")
    text = cursor[2:]
    try:
        payload = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        (n,) = struct.unpack(">H", payload[:2])
        field = payload[2 : 2 + n].decode("utf-8")
        (m,) = struct.unpack(">I", payload[2 + n : 6 + n])
        key = payload[6 + n : 6 + n + m]
        uid = payload[6 + n + m :].decode("utf-8")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError):
        raise ValueError("not a filtered listing's cursor")
    if len(key) != m or not uid:
        raise ValueError("not a filtered listing's cursor")
    return field, key, uid


def find_queries(base, collection, field, start, stop, after, mark="?"):
    """
    The SQL reads of a filtered page, for the engines over SQL: ``[(sql,
    args)]``, each to be ordered by ``(i.key, i.uid)`` and limited by the
    caller.  ``base`` selects from the index table aliased ``i`` with
    ``i.collection`` and ``i.field`` bound to the first two marks; ``mark``
    is the driver's placeholder.

    After a cursor ``(key, uid)``: two seeks of the index's primary key,
    not one range filtered row by row: the rest of the cursor's key (uids
    after its uid), then the keys above.
    """
    queries = []
    if after is not None:
        key, uid = after
        if (start is None or key >= start) and (stop is None or key < stop):
            queries.append((base + " AND i.key = %s AND i.uid > %s" % (mark, mark), [collection, field, key, uid]))
        if start is None or start <= key:
            start = key + b"\x00"
    sql, args = base, [collection, field]
    if start is not None:
        sql += " AND i.key >= " + mark
        args.append(start)
    if stop is not None:
        sql += " AND i.key < " + mark
        args.append(stop)
    queries.append((sql, args))
    return queries
