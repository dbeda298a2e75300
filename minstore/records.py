"""
The record format of DESIGN section 2: names, canonical JSON, versions.

A stored record is held as the bytes of its JSON object (never as nested
Python containers) so that a node holding many of them keeps the garbage
collector out of the request path.
"""

import hashlib
import json
import os
import re
import threading
import time

from minstore.errors import BadRequest

COLLECTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_UID_BYTES = 255

_dumps_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def canonical_json(value):
    """The canonical JSON bytes of a value: sorted keys, no spaces, UTF-8."""
    return _dumps_canonical(value).encode("utf-8")


def check_collection(name):
    if not isinstance(name, str) or not COLLECTION_RE.match(name):
        raise BadRequest(
            "bad_collection",
            "collection names match [A-Za-z0-9][A-Za-z0-9_.-]{0,63}: %r" % (name,),
        )
    return name


def check_uid(uid):
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


def make_record(collection, uid, value, version, timestamp):
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


def make_tombstone(collection, uid, version, timestamp):
    """What a delete leaves behind, so an old replica cannot revive a record."""
    return {
        "uid": uid,
        "collection": collection,
        "version": version,
        "timestamp": timestamp,
        "deleted": True,
    }


def encode_record(record):
    """The stored and served bytes of a record."""
    return canonical_json(record)


def decode_record(data):
    return json.loads(data)


class HybridLogicalClock:
    """
    Versions that are totally ordered across the cluster.

    A version is ``PPPPPPPPPPPPP-LLLLLL-NODE``: wall-clock milliseconds, a
    logical counter and the node id, fixed width so that comparing the
    strings compares the versions.  ``observe`` folds in versions seen from
    other nodes so that a later local write always sorts after them.

    To stay monotonic across restarts, even when the wall clock steps back,
    the clock persists a reservation a few seconds ahead of the wall clock
    and never issues a version below the last reservation it read at start.
    """

    RESERVE_MS = 10_000
    #: A version further ahead of our wall clock than this is not folded in:
    #: one node with a wild clock must not drag every other node's versions.
    MAX_DRIFT_MS = 60_000

    def __init__(self, node_id, state_path=None, now=time.time):
        self.node_id = node_id
        self._now = now
        self._state_path = state_path
        self._lock = threading.Lock()
        self._physical = 0
        self._logical = 0
        self._reserved = 0
        self._persisting = False
        #: How a new reservation reaches the disk; the node replaces it with
        #: a call through its thread pool so the reactor never waits on it.
        self.persist_later = self._persist_now
        if state_path and os.path.exists(state_path):
            with open(state_path) as f:
                self._physical = int(f.read().strip() or 0)
        self._persist_now(self._next_reservation())

    def _next_reservation(self):
        return max(self._physical, int(self._now() * 1000)) + self.RESERVE_MS

    def _persist_now(self, reserved):
        """Write the reservation durably (called at start, or off the reactor)."""
        if self._state_path is not None:
            tmp = self._state_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(reserved))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
        self._reserved = reserved
        self._persisting = False

    def _maybe_reserve(self):
        # Renew the reservation when half of it is used up, in the background.
        if self._physical + self.RESERVE_MS // 2 > self._reserved and not self._persisting:
            self._persisting = True
            self.persist_later(self._next_reservation())

    def _format(self):
        return "%013d-%06d-%s" % (self._physical, self._logical, self.node_id)

    def now(self):
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
            self._maybe_reserve()
            return self._format()

    def observe(self, version):
        """Fold in a version made elsewhere."""
        try:
            physical, logical = version.split("-", 2)[:2]
            physical, logical = int(physical), int(logical)
        except (ValueError, AttributeError):
            return
        if physical > self._now() * 1000 + self.MAX_DRIFT_MS:
            return
        with self._lock:
            if (physical, logical) > (self._physical, self._logical):
                self._physical, self._logical = physical, logical
                self._maybe_reserve()


def version_timestamp(version):
    """The wall-clock seconds carried by a version."""
    return int(version.split("-", 1)[0]) / 1000.0
