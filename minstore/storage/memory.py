"""
The ``memory`` engine: records, the change feed and checkpoints in Python
containers, lost when the node stops (tests and cache fronts).
"""

import bisect
import threading

from zope.interface import implementer

from minstore.interfaces import ABSENT, NEWER, Change, IStorage
from minstore.storage._index import KeyIndex


@implementer(IStorage)
class MemoryStorage:
    name = "memory"

    def __init__(self, data_dir=None):
        self._lock = threading.Lock()
        self._rows = {}  # (collection, uid) -> Change
        self._by_seq = {}  # seq -> (collection, uid), for the rows held now
        self._seqs = []  # every seq given, ascending (some no longer held)
        self._index = KeyIndex()
        self._checkpoints = {}
        self._last_seq = 0
        self._max_version = None

    def open(self):
        pass

    def close(self):
        pass

    def get(self, collection, uid):
        row = self._rows.get((collection, uid))
        return None if row is None else row.data

    def write(self, batch, checkpoints=None):
        results = []
        with self._lock:
            for collection, uid, data, deleted, version, forward, condition in batch:
                key = (collection, uid)
                held = self._rows.get(key)
                if condition == ABSENT and held is not None and not held.deleted:
                    results.append(None)
                    continue
                if condition == NEWER and held is not None and held.version >= version:
                    results.append(None)
                    continue
                self._last_seq += 1
                seq = self._last_seq
                if held is not None:
                    del self._by_seq[held.seq]
                self._rows[key] = Change(seq, collection, uid, version, bool(deleted), bool(forward), data)
                self._by_seq[seq] = key
                self._seqs.append(seq)
                self._index.set(collection, uid, not deleted)
                if self._max_version is None or version > self._max_version:
                    self._max_version = version
                results.append(seq)
            if len(self._seqs) > 2 * len(self._by_seq) + 1024:
                self._seqs = [s for s in self._seqs if s in self._by_seq]
            if checkpoints is not None:
                self._checkpoints = dict(checkpoints)
        return results

    def list(self, collection, after, prefix, limit):
        with self._lock:
            uids = self._index.page(collection, after, prefix, limit)
            return [self._rows[(collection, uid)].data for uid in uids]

    def changes(self, after, limit, forwarded_only=False, collection=None):
        out = []
        with self._lock:
            top = self._last_seq
            i = bisect.bisect_right(self._seqs, after)
            while i < len(self._seqs) and len(out) < limit:
                key = self._by_seq.get(self._seqs[i])
                i += 1
                if key is None:
                    continue
                row = self._rows[key]
                if forwarded_only and not row.forward:
                    continue
                if collection is not None and row.collection != collection:
                    continue
                out.append(row)
        scanned = out[-1].seq if len(out) >= limit else max(top, after)
        return out, scanned

    def count_changes(self, after, forwarded_only=False):
        with self._lock:
            return sum(
                1
                for seq, key in self._by_seq.items()
                if seq > after and (not forwarded_only or self._rows[key].forward)
            )

    def scan_versions(self, after, upto, limit):
        # Keys are never removed, so a key list as long as the rows is current.
        with self._lock:
            keys = getattr(self, "_sorted_keys", None)
            if keys is None or len(keys) != len(self._rows):
                keys = self._sorted_keys = sorted(self._rows)
            i = 0 if after is None else bisect.bisect_right(keys, tuple(after))
            out = []
            while i < len(keys) and len(out) < limit:
                key = keys[i]
                if upto is not None and key > tuple(upto):
                    break
                out.append((key[0], key[1], self._rows[key].version))
                i += 1
            return out

    def checkpoints(self):
        with self._lock:
            return dict(self._checkpoints)

    def save_checkpoints(self, checkpoints):
        with self._lock:
            self._checkpoints = dict(checkpoints)

    def last_seq(self):
        return self._last_seq

    def max_version(self):
        return self._max_version

    def count(self):
        return self._index.count()

    def collections(self):
        return self._index.collections()
