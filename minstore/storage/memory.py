"""
The ``memory`` engine: records, the change feed and checkpoints in Python
containers, lost when the node stops (tests and cache fronts).  Each
secondary index is a sorted list of ``(key, uid)`` per collection and field,
kept by the write under the same lock as the records.
"""

import bisect
import threading

from zope.interface import implementer

from minstore.interfaces import ABSENT, NEWER, Change, IStorage
from minstore.storage._index import KeyIndex
from minstore.storage.indexes import Declaration, fields_by_collection, record_keys


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
        self._purged = None  # the highest version of a tombstone purged
        self._entries = {}  # (collection, field) -> sorted list of (key, uid)
        self._states = {}  # "COLLECTION:FIELD" -> [collection, field, state, seq, until_seq]
        self._fields = fields_by_collection([])

    def open(self):
        pass

    def close(self):
        pass

    def get(self, collection, uid):
        row = self._rows.get((collection, uid))
        return None if row is None else row.data

    def get_many(self, keys):
        return [self.get(collection, uid) for collection, uid in keys]

    def write(self, batch, checkpoints=None):
        results = []
        with self._lock:
            for collection, uid, data, deleted, version, forward, condition in batch:
                key = (collection, uid)
                held = self._rows.get(key)
                if condition == ABSENT and held is not None and not held.deleted:
                    results.append(None)
                    continue
                if condition == NEWER and (
                    held.version >= version
                    if held is not None
                    else self._purged is not None and version <= self._purged
                ):
                    results.append(None)
                    continue
                self._last_seq += 1
                seq = self._last_seq
                if held is not None:
                    del self._by_seq[held.seq]
                fields = self._fields(collection)
                if fields:
                    self._reindex(collection, uid, fields, held.data if held is not None and not held.deleted else None, None if deleted else data)
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

    def _reindex(self, collection, uid, fields, old, new):
        old_keys = record_keys(old, fields) if old is not None else {}
        new_keys = record_keys(new, fields) if new is not None else {}
        for field in fields:
            before, after = old_keys.get(field), new_keys.get(field)
            entries = self._entries.setdefault((collection, field), [])
            if before is not None and before != after:
                i = bisect.bisect_left(entries, (before, uid))
                if i < len(entries) and entries[i] == (before, uid):
                    del entries[i]
            if after is not None:
                self._insert(entries, (after, uid))

    @staticmethod
    def _insert(entries, entry):
        i = bisect.bisect_left(entries, entry)
        if i == len(entries) or entries[i] != entry:
            entries.insert(i, entry)

    # -- secondary indexes ---------------------------------------------------

    def set_indexes(self, declarations):
        declarations = [Declaration(*d) for d in declarations]
        with self._lock:
            wanted = dict((str(d), d) for d in declarations)
            for spec, (collection, field, _, _, _) in list(self._states.items()):
                if spec in wanted:
                    continue
                del self._states[spec]
                if Declaration("*", field) in declarations:
                    continue
                if collection == "*":
                    kept = set(d.collection for d in declarations if d.field == field)
                    for c, f in list(self._entries):
                        if f == field and c not in kept:
                            del self._entries[(c, f)]
                elif Declaration(collection, field) not in declarations:
                    self._entries.pop((collection, field), None)
            for spec, d in wanted.items():
                if spec in self._states:
                    continue
                everywhere = self._states.get(str(Declaration("*", d.field)))
                ready = self._last_seq == 0 or (everywhere is not None and everywhere[2] == "ready")
                self._states[spec] = [d.collection, d.field, "ready" if ready else "building", 0, self._last_seq]
            self._fields = fields_by_collection([Declaration(c, f) for c, f, _, _, _ in self._states.values()])

    def build_indexes(self, limit):
        with self._lock:
            building = [s for s in self._states.values() if s[2] == "building"]
            if not building:
                return False
            state = building[0]
            collection, field, _, seq, until_seq = state
            top = min(until_seq, seq + limit)
            i = bisect.bisect_right(self._seqs, seq)
            while i < len(self._seqs) and self._seqs[i] <= top:
                key = self._by_seq.get(self._seqs[i])
                i += 1
                if key is None or (collection != "*" and key[0] != collection):
                    continue
                row = self._rows[key]
                if row.deleted:
                    continue
                k = record_keys(row.data, (field,)).get(field)
                if k is not None:
                    self._insert(self._entries.setdefault((key[0], field), []), (k, key[1]))
            state[2:4] = ["ready" if top >= until_seq else "building", top]
            return state[2] == "building" or len(building) > 1

    def index_states(self):
        with self._lock:
            return dict(
                (spec, {"state": state, "seq": seq, "until_seq": until_seq})
                for spec, (_, _, state, seq, until_seq) in self._states.items()
            )

    def find(self, collection, field, start, stop, after, limit):
        with self._lock:
            entries = self._entries.get((collection, field), [])
            i = 0 if start is None else bisect.bisect_left(entries, (start,))
            if after is not None:
                i = max(i, bisect.bisect_right(entries, tuple(after)))
            out = []
            while i < len(entries) and len(out) < limit:
                key, uid = entries[i]
                if stop is not None and key >= stop:
                    break
                out.append((key, self._rows[(collection, uid)].data))
                i += 1
            return out

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

    def purge_tombstones(self, before_version, upto_seq, upto_forwarded_seq, limit):
        removed = []
        with self._lock:
            top = max(upto_seq, upto_forwarded_seq)
            for seq in self._seqs:
                if seq > top or len(removed) >= limit:
                    break
                key = self._by_seq.get(seq)
                if key is None:
                    continue
                row = self._rows[key]
                if not row.deleted or row.version >= before_version:
                    continue
                if seq > upto_seq and not (row.forward and seq <= upto_forwarded_seq):
                    continue
                del self._rows[key]
                del self._by_seq[seq]
                self._index.forget(row.collection, row.uid)
                removed.append((row.collection, row.uid, row.version))
                if self._purged is None or row.version > self._purged:
                    self._purged = row.version
            if removed:
                self._seqs = [s for s in self._seqs if s in self._by_seq]
                self._sorted_keys = None
        return removed

    def purged_version(self):
        return self._purged

    def scan_versions(self, after, upto, limit):
        # Keys are only removed by a purge (which drops the list), so a key
        # list as long as the rows is current.
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
