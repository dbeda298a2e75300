"""A least-recently-used map bounded in bytes, for records held as bytes."""

from collections import OrderedDict


class ByteLRU:
    """
    Maps keys to ``(data, extra)`` where ``data`` is bytes whose length
    counts against ``max_bytes``; the least recently used entries go first
    when a new one would not fit.  ``extra`` is anything small the owner
    keeps beside the bytes (a version, an expiry time).
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries = OrderedDict()

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries

    def get(self, key):
        """The ``(data, extra)`` of a key, marked as just used, or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key, data, extra=None):
        self.pop(key)
        size = len(data)
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.bytes -= len(old)
            self.evictions += 1
        self._entries[key] = (data, extra)
        self.bytes += size

    def pop(self, key):
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[0])
        return entry

    def clear(self):
        self._entries.clear()
        self.bytes = 0
