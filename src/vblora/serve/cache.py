"""A least-recently-used cache bounded in bytes (the store's cache of composed adapters).

Not thread-safe by itself: the store calls it under its lock. An entry larger than the whole cap is handed back to
the caller but not kept. Dropping an entry only drops the cache's reference: a forward that is using it keeps it
alive until it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to release
        return None


def release_freed_heap() -> None:
    """Give the C heap's free memory back to the operating system (glibc's `malloc_trim`; a no-op elsewhere).

    Why: glibc raises its mmap threshold to the size of each large block freed, so after the first evictions the
    store's compositions (MiBs each) and the temporaries of reading adapter files come from the heap, and the heap
    keeps what they free as resident memory. Measured on 1,000 SmolLM2 adapters with a 64 MiB cache
    (bench/serve_adapters.py): 184 -> 151 MiB resident after loading them all, 249 -> 215 MiB after a forward through
    each. A call takes about a millisecond there; the store makes one after each load and after the block of each
    new plan (not on the decode steps that reuse one).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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

    def pop(self, key: Hashable) -> None:
        """Drop `key` (not an eviction: e.g. its adapter was unregistered)."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]
