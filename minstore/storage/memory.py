"""The ``memory`` engine: records in a dict, lost when the node stops."""

import threading

from zope.interface import implementer

from minstore.interfaces import IStorage
from minstore.storage._index import KeyIndex


@implementer(IStorage)
class MemoryStorage:
    name = "memory"

    def __init__(self, data_dir=None):
        self._lock = threading.Lock()
        self._records = {}
        self._index = KeyIndex()

    def open(self):
        pass

    def close(self):
        pass

    def get(self, collection, uid):
        return self._records.get((collection, uid))

    def write(self, batch):
        with self._lock:
            for collection, uid, data, deleted in batch:
                self._records[(collection, uid)] = data
                self._index.set(collection, uid, not deleted)

    def list(self, collection, after, prefix, limit):
        with self._lock:
            uids = self._index.page(collection, after, prefix, limit)
            return [self._records[(collection, uid)] for uid in uids]

    def is_live(self, collection, uid):
        return self._index.is_live(collection, uid)

    def holds(self, collection, uid):
        return self._index.holds(collection, uid)

    def count(self):
        return self._index.count()

    def collections(self):
        return self._index.collections()
