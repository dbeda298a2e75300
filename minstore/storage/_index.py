"""The in-memory key index that both built-in engines keep for listings."""

import bisect
import threading


class KeyIndex:
    """
    Which uids of each collection are live, and which are tombstones, with
    a sorted view of the live ones rebuilt only when that set changes.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._live = {}  # collection -> set of live uids
        self._deleted = {}  # collection -> set of uids whose tombstone is held
        self._sorted = {}  # collection -> sorted list, or absent when stale

    def set(self, collection, uid, live):
        with self._lock:
            uids = self._live.setdefault(collection, set())
            deleted = self._deleted.setdefault(collection, set())
            if live:
                deleted.discard(uid)
                if uid not in uids:
                    uids.add(uid)
                    self._sorted.pop(collection, None)
            else:
                deleted.add(uid)
                if uid in uids:
                    uids.discard(uid)
                    self._sorted.pop(collection, None)

    def forget(self, collection, uid):
        """A uid no longer held at all (its tombstone purged)."""
        with self._lock:
            self._deleted.get(collection, set()).discard(uid)
            if uid in self._live.get(collection, ()):
                self._live[collection].discard(uid)
                self._sorted.pop(collection, None)

    def is_live(self, collection, uid):
        with self._lock:
            return uid in self._live.get(collection, ())

    def holds(self, collection, uid):
        with self._lock:
            return uid in self._live.get(collection, ()) or uid in self._deleted.get(collection, ())

    def page(self, collection, after, prefix, limit):
        """Up to ``limit`` live uids after ``after`` starting with ``prefix``."""
        with self._lock:
            keys = self._sorted.get(collection)
            if keys is None:
                keys = sorted(self._live.get(collection, ()))
                self._sorted[collection] = keys
        i = 0 if after is None else bisect.bisect_right(keys, after)
        if prefix:
            i = max(i, bisect.bisect_left(keys, prefix))
        out = []
        while i < len(keys) and len(out) < limit:
            uid = keys[i]
            if prefix and not uid.startswith(prefix):
                break
            out.append(uid)
            i += 1
        return out

    def count(self):
        with self._lock:
            return sum(len(uids) for uids in self._live.values())

    def collections(self):
        with self._lock:
            return sorted(c for c, uids in self._live.items() if uids)
