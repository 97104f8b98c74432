"""A least-recently-used cache bounded in bytes (the store's cache of composed adapters).

Not thread-safe by itself: the store calls it under its lock. An entry larger than the whole cap is handed back to
the caller but not kept. Dropping an entry only drops the cache's reference: a forward that is using it keeps it
alive until it ends.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class ByteLRU:
    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cap_bytes}")
        self.cap = int(cap_bytes)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable) -> Any | None:
        """The value (now most recently used), counting a hit, or None counting a miss."""
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep `value` (most recently used), then evict least recently used entries until within the cap."""
        self.pop(key)
        self.entries[key] = (value, int(nbytes))
        self.bytes += int(nbytes)
        while self.bytes > self.cap and self.entries:
            _, (_, size) = self.entries.popitem(last=False)
            self.bytes -= size
            self.evictions += 1

    def pop(self, key: Hashable) -> Any | None:
        """Drop `key` (not an eviction: e.g. its adapter was unregistered)."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def drop_where(self, predicate: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self.entries if predicate(k)]:
            self.pop(key)
