"""`AdapterStore`: many VB-LoRA adapters served on one base model.

    store = AdapterStore(model, "adapters/", cache_bytes=64 << 20)
    a, b = store.acquire("sentiment"), store.acquire("topics")
    with store.rows([a, None, b]):          # one entry per row: its adapter, or None for the base model
        out = model(input_ids=ids)          # also model.generate(...)

Registration reads headers only. An adapter's tensors are read and verified on first `acquire` (the file rechecked
first: a file replaced since registration is described again from its new header), and only then are its modules
wrapped with mixed layers (the union over loaded adapters; they pass the base output through untouched outside
`rows(...)` / `tokens(...)`): a file refused on loading changes nothing in the model. `add` verifies the new file
before it replaces a registration of that name. Paths stay inside the store's directory (symlinks out of it are not
listed; `add` refuses paths outside it) unless `allow_outside_paths=True`. Loaded adapters then stay resident
(indices and mixing weights: about its file size; its bank is held once per content hash, so adapters sharing a
bank, e.g. trained with `--freeze-bank`, cost only their indices and weights). Compositions (every module's A and
B in the compute dtype) live in a least-recently-used cache bounded in bytes and are recomposed on demand.

Threads: `add`, `remove`, `scan`, `acquire`, `stats` may be called from any thread; the forwards inside `rows(...)`
from one thread at a time (plans are per thread). A handle keeps its adapter usable after `remove`. A first
`acquire` in one thread may wrap modules while another thread runs a forward: a new wrapper holds nothing of the
plans made before it (their adapters were wrapped when loaded), so those forwards get the base output from it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from vblora.errors import AdapterFormatError, TargetError, VBLoRAError
from vblora.inject import BANK_ATTR, unwrap
from vblora.serve.cache import ByteLRU, release_freed_heap
from vblora.serve.loaded import LoadedAdapter, compacted, factor_bytes, layout_key, load, nested, verified
from vblora.serve.mixed import ROWS, TOKENS, MixedHead, MixedLayer, Plan, Router
from vblora.serve.sources import PathNotAllowedError, Source, broken, describe, discover, source_stamp

REFUSED = (AdapterFormatError, FileNotFoundError, PathNotAllowedError)  # a bad file, not a bug: remembered per stamp


class UnknownAdapterError(VBLoRAError, KeyError):
    """No adapter of that name is registered (also a KeyError)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class AdapterHandle:
    """A loaded adapter, ready for `store.rows([...])`; stays valid after the name is removed, until dropped."""

    __slots__ = ("adapter", "info")

    def __init__(self, adapter: LoadedAdapter, info: dict) -> None:
        self.adapter, self.info = adapter, info

    @property
    def name(self) -> str:
        return self.adapter.name

    def __repr__(self) -> str:
        return f"AdapterHandle({self.name!r})"


class Entry:
    """A registered name: its source, its loaded form once acquired, and a lock so it is loaded once; `refused`:
    (stamp, error type, message) of the last refused load, raised again without reading while the file is unchanged
    (not the exception itself: its traceback would keep the frames of the read, and the tensors they hold, alive)."""

    __slots__ = ("from_directory", "loaded", "lock", "refused", "source")

    def __init__(self, source: Source, from_directory: bool, loaded: LoadedAdapter | None = None) -> None:
        self.source, self.loaded, self.lock, self.from_directory = source, loaded, threading.Lock(), from_directory
        self.refused: tuple[tuple, type, str] | None = None


class AdapterStore:
    def __init__(
        self,
        model: nn.Module,
        directory: str | os.PathLike | None = None,
        *,
        cache_bytes: int = 64 << 20,
        allow_outside_paths: bool | None = None,
    ) -> None:
        """`directory`: adapters registered by name (see `vblora.serve.sources`). `allow_outside_paths`: whether
        `add` may read paths outside it; None (default): not if there is a directory, any path if there is none
        (from Python, the caller is the operator); a server passes its operator's choice: False with no directory
        refuses every path."""
        self.model = unwrap(model)
        if hasattr(self.model, BANK_ATTR):
            raise TargetError(
                f"{type(self.model).__name__} already carries a VB-LoRA adapter; give the store the "
                f"plain base model (vblora.unload(model, merge=False) removes it)"
            )
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        self.dtype = param.dtype if param is not None else torch.float32
        self.device = param.device if param is not None else torch.device("cpu")
        self.directory = Path(directory) if directory is not None else None
        self.outside = allow_outside_paths if allow_outside_paths is not None else self.directory is None
        self.root = None if self.outside else self.directory  # where `add` may read from (None: anywhere)
        self.router = Router()
        self.cache = ByteLRU(cache_bytes)
        self.lock = threading.RLock()
        self.entries: dict[str, Entry] = {}
        self.bank_files: dict[str, Path] = {}  # sha256 -> bank file found in the directory
        self.banks: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
        self.modules = dict(self.model.named_modules())  # name -> module of the base model as given (unwrapped)
        self.wrappers: dict[str, MixedLayer | MixedHead] = {}  # module name -> the wrapper in its place
        self.last_plan: Plan | None = None
        self.layouts: weakref.WeakValueDictionary[tuple, object] = weakref.WeakValueDictionary()  # one per module table
        if self.directory is not None:
            self.scan()

    # -- registration ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.entries)

    def problems(self) -> dict[str, str]:
        """Registered names whose headers could not be read, or whose last load was refused (file unchanged since),
        with the reason (acquiring them raises it)."""
        with self.lock:
            out = {n: e.source.error for n, e in self.entries.items() if e.source.error is not None}
            out.update(
                {
                    n: e.refused[2]
                    for n, e in self.entries.items()
                    if e.refused is not None and e.loaded is None and n not in out
                }
            )
            return out

    def scan(self) -> tuple[list[str], list[str]]:
        """Re-read the directory: register new adapters, unregister those gone, re-register replaced files.
        Returns (added, removed); a replaced file is in both."""
        if self.directory is None:
            return [], []
        sources, banks = discover(self.directory)
        added, removed = [], []
        with self.lock:
            self.bank_files = banks
            for name, entry in list(self.entries.items()):
                if not entry.from_directory:
                    continue
                new = sources.get(name)
                if new is None or (new.path, new.stamp, new.error) != (
                    entry.source.path,
                    entry.source.stamp,
                    entry.source.error,
                ):
                    self.unregister(name)
                    removed.append(name)
            for name, source in sources.items():
                if name not in self.entries:
                    self.register(source, from_directory=True)
                    added.append(name)
        return sorted(added), sorted(removed)

    def add(self, name: str, path: str | os.PathLike) -> AdapterHandle:
        """Register the adapter at `path` (native file or directory, or PEFT VB-LoRA directory) as `name` and return
        its handle. The file is read and verified first: if it is refused (FileNotFoundError, AdapterFormatError,
        PathNotAllowedError for a path outside the store's directory), a registration of that name stays as it
        was; otherwise the new adapter replaces it."""
        if not isinstance(name, str) or not name:
            raise VBLoRAError(f"adapter name {name!r}: give a non-empty string")
        if not self.outside and self.root is None:
            raise PathNotAllowedError(
                f"cannot add adapter '{name}' by path: this store has no adapter directory and "
                f"loads no other paths (give it a directory, or allow_outside_paths=True)"
            )
        source = describe(name, path, self.root)
        loaded = self.load(source)
        entry = Entry(source, from_directory=False, loaded=loaded)
        with self.lock:
            if name in self.entries:
                self.unregister(name)
            self.entries[name] = entry
        return AdapterHandle(loaded, self.info(loaded))

    def remove(self, name: str) -> None:
        """Unregister `name`; handles already acquired keep working. UnknownAdapterError if not registered."""
        with self.lock:
            if name not in self.entries:
                raise self.unknown(name)
            self.unregister(name)

    def register(self, source: Source, from_directory: bool) -> None:
        self.entries[source.name] = Entry(source, from_directory)  # headers only: nothing is wrapped before loading

    def unregister(self, name: str) -> None:
        entry = self.entries.pop(name)
        if entry.loaded is not None:
            entry.loaded.removed = True
            self.cache.pop(entry.loaded)

    def unknown(self, name: str) -> UnknownAdapterError:
        known = sorted(self.entries)
        shown = ", ".join(known[:10]) + (f", ... ({len(known) - 10} more)" if len(known) > 10 else "")
        return UnknownAdapterError(f"no adapter named {name!r} is registered (registered: {shown or 'none'})")

    # -- wrapping the base model ----------------------------------------------------------------------------------
    def wrap(self, adapted: list[str], heads: list[str], source: Source) -> None:
        """Wrap the modules a verified adapter adapts with mixed layers and its heads with mixed heads (those not
        wrapped yet), all or none. Called under the lock. AdapterFormatError (nothing wrapped) if the adapter's
        modules and heads overlap what other adapters wrapped the other way (a head holding an adapted module)."""
        clash = [
            f"module {a} is inside head {w} of another adapter"
            for a in adapted
            for w, m in self.wrappers.items()
            if isinstance(m, MixedHead) and nested(a, w)
        ]
        clash += [
            f"head {h} overlaps {type(m).__name__} {w} of another adapter"
            for h in heads
            for w, m in self.wrappers.items()
            if nested(h, w) and not (h == w and isinstance(m, MixedHead))
        ]
        if clash:
            raise AdapterFormatError(
                f"adapter '{source.name}' cannot be served beside the adapters loaded: " + "; ".join(clash[:4])
            )
        done = []
        try:
            for wrapper_class, names in ((MixedLayer, adapted), (MixedHead, heads)):
                for name in names:
                    if name not in self.wrappers:
                        wrapper = wrapper_class(self.modules[name], name, self.router)
                        self.model.set_submodule(name, wrapper)
                        self.wrappers[name] = wrapper
                        done.append(name)
        except BaseException:
            for name in reversed(done):  # undo: the base model exactly as before
                self.model.set_submodule(name, self.modules[name])
                del self.wrappers[name]
            raise

    # -- loading --------------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterHandle:
        """A handle on the adapter `name`, loading and verifying it on first use. UnknownAdapterError for an
        unknown name; AdapterFormatError (or FileNotFoundError) naming the adapter for a bad or missing file."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise self.unknown(name)
        with entry.lock:
            if entry.loaded is None:
                source = self.current(entry)
                if entry.refused is not None and entry.refused[0] == source.stamp:
                    raise entry.refused[1](entry.refused[2])  # the same file again: refused without reading it
                try:
                    entry.loaded = self.load(source)
                except REFUSED as e:
                    entry.refused = (source.stamp, type(e), str(e))
                    raise
                entry.refused = None
                with self.lock:  # removed while loading: the handle works, nothing is cached for it
                    entry.loaded.removed = self.entries.get(name) is not entry
        return AdapterHandle(entry.loaded, self.info(entry.loaded))

    def current(self, entry: Entry) -> Source:
        """The entry's source, described again if its file changed since (size, mtime, inode or ctime): the module
        list and facts of a replaced file come from its new header, never the old one."""
        old = entry.source
        if source_stamp(old) == old.stamp:
            return old
        try:
            new = describe(old.name, old.path, old.root)
        except Exception as e:  # the file's problem, raised by the load below
            new = broken(old.name, old.path, e, old.root)
        with self.lock:
            entry.source = new
        return new

    def load(self, source: Source) -> LoadedAdapter:
        """Read and verify `source` against the base model, then wrap what it adapts (nothing if refused)."""
        snap, heads = verified(source, self.model, self.modules, self.bank_files)
        with self.lock:
            self.wrap([m.name for m in snap.modules], list(heads), source)
        loaded = load(source, snap, self.intern_bank, heads, self.intern_layout)
        del snap
        loaded = compacted(loaded)
        release_freed_heap()  # what reading the file left behind
        return loaded

    def intern_bank(self, digest: str, bank: torch.Tensor) -> torch.Tensor:
        with self.lock:
            held = self.banks.get(digest)
            if held is None:
                held = bank.to(self.device)
                self.banks[digest] = held
            return held

    def intern_layout(self, layout):
        key = layout_key(layout)
        with self.lock:
            return self.layouts.setdefault(key, layout)

    def info(self, adapter: LoadedAdapter) -> dict:
        s = adapter.source
        return {
            **s.summary,
            "name": s.name,
            "path": str(s.path),
            "bytes_on_disk": s.file_bytes,
            "bank_sha256": adapter.bank_sha256,
            "resident_bytes": adapter.resident_bytes,
            "num_labels": s.summary.get("num_labels")
            or next((int(st["weight"].shape[0]) for st in adapter.heads.values() if "weight" in st), None),
        }

    # -- composition ----------------------------------------------------------------------------------------------
    def factors(self, adapter: LoadedAdapter) -> dict:
        """The adapter's composed factors, from the cache or composed now (and cached unless removed)."""
        with self.lock:
            found = self.cache.get(adapter)
        if found is not None:
            return found
        factors = adapter.compose(self.dtype, self.device)
        with self.lock:
            if not adapter.removed:
                self.cache.put(adapter, factors, factor_bytes(factors))
        return factors

    def plan(self, entries, axis: str, strategy: str | None = None) -> Plan:
        """The plan of one `rows(...)` / `tokens(...)` block. The same adapters in the same order as the previous
        block (a server's decode steps between joins and leaves) reuse its plan and per-layer grouping."""
        units = []
        for e in entries:
            if isinstance(e, str):
                e = self.acquire(e)
            if e is not None and not isinstance(e, AdapterHandle):
                raise VBLoRAError(
                    f"store.{axis}(...) takes AdapterHandles (store.acquire(name)), names or None; got "
                    f"{type(e).__name__}"
                )
            units.append(e.adapter if e is not None else None)
        distinct = list({id(a): a for a in units if a is not None}.values())
        last = self.last_plan
        if (
            last is not None
            and (last.axis, last.strategy) == (axis, strategy)
            and len(last.units) == len(units)
            and all(a is b for a, b in zip(last.units, units, strict=True))
        ):
            with self.lock:  # recency and hit counts as if composed afresh; evicted ones come back
                for adapter in distinct:
                    if self.cache.get(adapter) is None and not adapter.removed:
                        self.cache.put(adapter, last.factors[adapter], factor_bytes(last.factors[adapter]))
            return last
        self.last_plan = None  # released before composing: at most one plan's compositions held outside the cache
        plan = Plan(units, {a: self.factors(a) for a in distinct}, axis, self.device, strategy)
        self.last_plan = plan  # kept for the next block (its grouping is made once)
        return plan

    def rows(self, handles, *, strategy: str | None = None):
        """Per-row adapters (batch dim 0; None: base model) for every forward inside the block."""
        return self.block(handles, ROWS, strategy)

    def tokens(self, handles, *, strategy: str | None = None):
        """Per-token adapters for packed batches shaped `(1, T, ...)`: T entries."""
        return self.block(handles, TOKENS, strategy)

    @contextlib.contextmanager
    def block(self, handles, axis: str, strategy: str | None):
        previous = self.last_plan
        with self.router.use(self.plan(handles, axis, strategy)) as plan:
            yield plan
        if plan is not previous:  # a new plan (not a decode step's reuse): what its compositions evicted and its
            release_freed_heap()  # first forward's temporaries freed, given back to the system

    def stats(self) -> dict:
        with self.lock:
            loaded = [e.loaded for e in self.entries.values() if e.loaded is not None]
            banks = list(self.banks.values())
            return {
                "registered": len(self.entries),
                "loaded": len(loaded),
                "distinct_banks": len(banks),
                "bank_bytes": sum(b.numel() * b.element_size() for b in banks),
                "loaded_bytes": sum(a.resident_bytes for a in loaded),
                "cache_entries": len(self.cache),
                "cache_bytes": self.cache.bytes,
                "cache_cap_bytes": self.cache.cap,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "evictions": self.cache.evictions,
            }
