"""
The record format of DESIGN section 2: names, canonical JSON, versions.

A stored record is held as the bytes of its JSON object (never as nested
Python containers) so that a node holding many of them keeps the garbage
collector out of the request path.
"""

import hashlib
import json
import re
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from minstore.errors import BadRequest

COLLECTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_UID_BYTES = 255

_dumps_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of a value: sorted keys, no spaces, UTF-8."""
    return _dumps_canonical(value).encode("utf-8")


def check_collection(name: Any) -> str:
    if not isinstance(name, str) or not COLLECTION_RE.match(name):
        raise BadRequest(
            "bad_collection",
            "collection names match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}: %r" % (name,),
        )
    return name


def check_uid(uid: Any) -> str:
    if not isinstance(uid, str) or not uid:
        raise BadRequest("bad_uid", "a uid is a non-empty string")
    try:
        encoded = uid.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("bad_uid", "a uid must be valid UTF-8")
    if len(encoded) > MAX_UID_BYTES:
        raise BadRequest(
            "bad_uid", "a uid is at most %d bytes of UTF-8" % (MAX_UID_BYTES,)
        )
    return uid


def make_record(collection: str, uid: str, value: Any, version: str, timestamp: float) -> Dict[str, Any]:
    """A new record dict with the fields every record carries."""
    body = canonical_json(value)
    return {
        "uid": uid,
        "collection": collection,
        "value": value,
        "version": version,
        "timestamp": timestamp,
        "check_sum": hashlib.sha256(body).hexdigest(),
        "size": len(body),
    }


def make_tombstone(collection: str, uid: str, version: str, timestamp: float) -> Dict[str, Any]:
    """What a delete leaves behind, so an old replica cannot revive a record."""
    return {
        "uid": uid,
        "collection": collection,
        "version": version,
        "timestamp": timestamp,
        "deleted": True,
    }


def encode_record(record: Dict[str, Any]) -> bytes:
    """The stored and served bytes of a record."""
    return canonical_json(record)


def decode_record(data: bytes) -> Dict[str, Any]:
    record: Dict[str, Any] = json.loads(data)
    return record


class HybridLogicalClock:
    """
    Versions that are totally ordered across the cluster.

    A version is ``PPPPPPPPPPPPP-LLLLLL-NODE``: wall-clock milliseconds, a
    logical counter and the node id, fixed width so that comparing the
    strings compares the versions.  ``observe`` folds in versions seen from
    other nodes so that a later local write always sorts after them.

    Across restarts the node calls ``resume`` with the highest version its
    storage holds: versions continue from the later of the wall clock and
    that version, never further ahead (no reservation on disk).
    """

    #: A version further ahead of our wall clock than this is not folded in:
    #: one node with a wild clock must not drag every other node's versions.
    MAX_DRIFT_MS = 60_000

    def __init__(self, node_id: str, now: Callable[[], float] = time.time) -> None:
        self.node_id = node_id
        self._now = now
        self._lock = threading.Lock()
        self._physical = 0
        self._logical = 0

    def _format(self) -> str:
        return "%013d-%06d-%s" % (self._physical, self._logical, self.node_id)

    def now(self) -> str:
        """A new version, greater than every version issued or observed."""
        with self._lock:
            wall = int(self._now() * 1000)
            if wall > self._physical:
                self._physical, self._logical = wall, 0
            else:
                self._logical += 1
                if self._logical > 999_999:
                    # The counter is 6 digits wide: carry into the milliseconds
                    # so that comparing the strings still compares the versions.
                    self._physical, self._logical = self._physical + 1, 0
            return self._format()

    @staticmethod
    def _parse(version: Optional[str]) -> Optional[Tuple[int, int]]:
        if not isinstance(version, str):
            return None
        try:
            physical, logical = version.split("-", 2)[:2]
            return int(physical), int(logical)
        except (ValueError, AttributeError):
            return None

    def resume(self, version: Optional[str]) -> None:
        """At start: the next version sorts after ``version``, the highest held."""
        parsed = self._parse(version)
        if parsed is not None:
            with self._lock:
                if parsed > (self._physical, self._logical):
                    self._physical, self._logical = parsed

    def observe(self, version: Optional[str]) -> None:
        """Fold in a version made elsewhere."""
        parsed = self._parse(version)
        if parsed is None or parsed[0] > self._now() * 1000 + self.MAX_DRIFT_MS:
            return
        with self._lock:
            if parsed > (self._physical, self._logical):
                self._physical, self._logical = parsed


def version_timestamp(version: str) -> float:
    """The wall-clock seconds carried by a version."""
    return int(version.split("-", 1)[0]) / 1000.0
