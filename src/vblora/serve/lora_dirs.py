"""VB-LoRA adapters as plain LoRA directories for an engine that reads PEFT LoRA (vLLM): find an adapter by name in
an adapter directory, verify it against the served base, compose it exactly (the bytes `vblora.export_lora` writes,
made by `LoRAFileLayout`), and keep the result in a content-addressed cache bounded in bytes. The vLLM resolver
plugin (`vblora.serve.vllm_plugin`) is a thin async shell over `LoRADirCache.resolve`; this module needs no vLLM,
so it is tested where vLLM is absent.

What is checked before a directory is handed out (nothing unverified leaves this module):
- the name: one plain entry of the adapter directory, found as the store finds it (`sources.find`: no separators,
  no leading dot, nothing that leads out of the directory through a symlink);
- the files: every header / tensor / digest check of the native reader and PEFT's directory checks, as
  `vblora.load_adapter` and `vblora serve` run them (`vblora.serve.loaded.read_snapshot`), shared banks included;
- the base: `vblora.storage.snapshot.check_base`, the check `load_adapter` runs (architecture, every adapted
  module present with the adapter's kind and shape, no matching module left out, module order, and the base
  weights sampled at the positions the file recorded). The base model is built from its config on the meta
  device (names and shapes, no weights); only the few weights the check samples (up to 8 modules) are read, lazily,
  from the checkpoint's safetensors files;
- what vLLM's LoRA cannot hold: trained heads (`modules_to_save`) are refused by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.serve.loaded import read_snapshot
from vblora.serve.sources import Source, bank_candidates, bank_file_sha256, bank_index, find
from vblora.storage.files import json_sha256, replace_dir, tensors_sha256
from vblora.storage.lora import LoRAFileLayout, layout_key
from vblora.storage.peft_vblora import CONFIG_FILE, WEIGHTS_FILE
from vblora.storage.snapshot import AdapterSnapshot, check_base

LORA_FORMAT = 1  # bump when export_lora's output for the same snapshot changes: old cache entries are then unused
DEFAULT_CACHE_BYTES = 4 << 30
# Torch intra-op threads while one adapter is read, checked and composed: its operations are small (a few MB), and
# the engine's own threads hold the cores; with 2 threads on a busy 2-core machine, composing one SmolLM2 adapter
# took 30-50 ms against 12 ms with 1 (OpenMP barriers waiting for a descheduled thread). VBLORA_COMPOSE_THREADS
# raises it (large adapters on a many-core host).
DEFAULT_COMPOSE_THREADS = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vblora" / "vllm-lora"


def find_source(directory: Path, name: str) -> tuple[Source, dict[str, Path]] | None:
    """The adapter called `name` in `directory` and the bank files a shared-bank adapter may need, found as
    `vblora serve` and the `AdapterStore` find it (`sources.find`: `<name>.safetensors`, `<name>/adapter.safetensors`
    or a PEFT VB-LoRA directory `<name>/`, confined to the directory, symlinks out of it not listed); None if there
    is none, including for names that are not one plain directory entry ('../x')."""
    try:
        source = find(directory, name)
    except FileNotFoundError:
        return None
    if source.bank_sha256 is None:
        return source, {}
    # a bank file beside the adapter whose digest matches (one header read), else the directory's index, as the
    # AdapterStore finds it: a nearby bank of another digest must not shadow the right one
    near = next((p for p in bank_candidates(source, {}) if bank_file_sha256(p) == source.bank_sha256), None)
    return source, ({source.bank_sha256: near} if near is not None else bank_index(directory))


class MetaBase:
    """The served base model for verification only: built from its config on the meta device (no weights), with
    the weights `check_base` samples read on demand from the checkpoint's safetensors. `model_dir`: a local model
    directory or a model id in the local Hugging Face cache (what the engine serves)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = model_dir
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config)
        self.module_order = [name for name, _ in self.model.named_modules()]
        self.modules = dict(self.model.named_modules())
        self.fits: set[str] = set()  # base_check_key of adapters `check_base` passed on this (unchanging) base

    def model_file(self, filename: str) -> str | None:
        """`filename` of the served model: in its local directory, or in the local Hugging Face cache for a model
        id (huggingface_hub's public lookup; nothing is downloaded); None if it has none."""
        d = Path(self.model_dir)
        if d.is_dir():
            return str(d / filename) if (d / filename).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.model_dir, filename)
        return found if isinstance(found, str) else None

    def weight_files(self) -> dict[str, str]:
        """Tensor name -> safetensors file holding it (sharded checkpoints through their index)."""
        index = self.model_file("model.safetensors.index.json")
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            return {key: str(Path(index).parent / file) for key, file in weight_map.items()}
        single = self.model_file("model.safetensors")
        if single is None:
            raise VBLoRAError(f"{self.model_dir}: no model.safetensors (or index) to read base weights from")
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)

    def materialize(self, names) -> None:
        """Read the real weight of each named module that is still on the meta device."""
        todo = [
            n
            for n in names
            if n in self.modules
            and getattr(self.modules[n], "weight", None) is not None
            and self.modules[n].weight.is_meta
        ]
        if not todo:
            return
        from safetensors import safe_open

        files = self.weight_files()
        for name in todo:
            key = f"{name}.weight"
            if key not in files:
                raise VBLoRAError(f"cannot verify the base weights: {key} is not in {self.model_dir}'s checkpoint")
            with safe_open(files[key], "pt") as f:
                self.modules[name].weight = nn.Parameter(f.get_tensor(key), requires_grad=False)

    def check(self, snap: AdapterSnapshot, where: str) -> None:
        """AdapterFormatError naming what differs if the adapter was not made for this base (`check_base`). The base
        does not change while the engine runs, so a pass is remembered by everything `check_base` reads of the
        adapter (`base_check_key`): adapters made on this base with the same targets are checked once."""
        key = base_check_key(snap)
        if key not in self.fits:
            self.materialize(snap.weight_sample)
            check_base(self.model, snap, where)
            self.fits.add(key)
        if snap.extras:
            raise AdapterFormatError(
                f"{where}: trained heads (modules_to_save: {', '.join(sorted(snap.extras))}) "
                f"cannot be served as a plain LoRA; serve this adapter with vblora's "
                f"AdapterStore, or train it without modules_to_save"
            )


def base_check_key(snap: AdapterSnapshot) -> str:
    """What `check_base` reads of an adapter, hashed: architecture, config (its targets), module table (names,
    kinds, shapes, order) and the sampled base weights."""
    return hashlib.sha256(
        json.dumps(
            {
                "architecture": snap.architecture,
                "config": snap.config.to_dict(),
                "modules": [m.to_row() for m in snap.modules],
                "sample": snap.weight_sample,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """This thread's torch intra-op threads set to `n` inside the block, restored after (`torch.set_num_threads`
    acts on the calling thread, and on the default of threads started meanwhile)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def content_key(snap: AdapterSnapshot) -> str:
    """What the composed LoRA directory depends on, hashed: the triplet's tensors, the module table, the config and
    the base's name (written into adapter_config.json). A changed adapter gets a new key."""
    tensors = tensors_sha256({"bank": snap.bank, "indices": snap.indices, "weights": snap.weights})
    return json_sha256(
        {
            "lora_format": LORA_FORMAT,
            "tensors": tensors,
            "config": snap.config.to_dict(),
            "modules": [m.to_row() for m in snap.modules],
            "base": snap.name_or_path,
            "architecture": snap.architecture,
            "task_type": snap.task_type,
        }
    )


def same_files(d: Path, files: dict[str, bytes | bytearray]) -> bool:
    """Whether directory `d` holds exactly `files` (name -> bytes)."""
    try:
        return sorted(p.name for p in d.iterdir()) == sorted(files) and all(
            (d / name).stat().st_size == len(data) and (d / name).read_bytes() == data for name, data in files.items()
        )
    except OSError:  # absent, or removed meanwhile
        return False


def write_entry(d: Path, files: dict[str, bytes | bytearray]) -> None:
    """Write cache entry `d` as a whole (a crash leaves it whole or absent), without fsync: entries are checked
    before use (`same_files`), and one lost to a power cut is written again."""

    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    replace_dir(d, write, replaceable=lambda _: True, durable=False)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


@dataclass
class Resolved:
    name: str
    path: Path  # the composed PEFT LoRA directory
    rank: int
    cached: bool  # an entry with these bytes was already there (not written)
    seconds: float = 0.0  # time spent finding, reading, checking, composing and writing (after taking the lock)
    # seconds per step (find, base, read, check, compose, write) and `cpu`: this thread's CPU seconds in all
    steps: dict[str, float] = field(default_factory=dict)


class Stopwatch:
    """Seconds per named step (`lap`) since the previous lap."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.cpu_start = time.thread_time()
        self.laps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start

    def cpu(self) -> float:
        """CPU seconds of this thread since the start (less than `total` when it waited: disk, GIL, other work)."""
        return time.thread_time() - self.cpu_start


class LoRADirCache:
    """Adapters of `adapters` composed into LoRA directories under `cache` (one per content key, written as a whole,
    least recently used removed past `max_bytes`). Entries handed out by this process are kept
    (the engine reloads an adapter from its directory when its own memory cache evicts it); if they alone exceed the
    bound, the bound is exceeded and `over_bound` says by how much. Thread-safe; one per cache directory (its eviction
    knows only what this process handed out)."""

    def __init__(
        self,
        adapters: str | os.PathLike,
        cache: str | os.PathLike | None = None,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        threads: int = DEFAULT_COMPOSE_THREADS,
    ) -> None:
        self.adapters = Path(adapters)
        if not self.adapters.is_dir():
            raise VBLoRAError(
                f"adapter directory {self.adapters} does not exist (set VBLORA_ADAPTERS to the "
                f"directory holding the adapters)"
            )
        self.cache = Path(cache) if cache else default_cache_dir()
        self.cache.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.threads = int(threads)
        self.bases: dict[str, MetaBase] = {}
        self.file_layouts: dict[str, LoRAFileLayout] = {}  # by layout_key: one per module layout served
        self.handed_out: set[Path] = set()
        self.over_bound = 0
        self.lock = threading.Lock()

    def base(self, model_dir: str) -> MetaBase:
        if model_dir not in self.bases:
            self.bases[model_dir] = MetaBase(model_dir)
        return self.bases[model_dir]

    def lora_files(self, snap: AdapterSnapshot) -> dict[str, bytes | bytearray]:
        """The files `export_lora` writes for `snap`, composed through its layout's `LoRAFileLayout` (made on the
        first adapter of each layout)."""
        key = layout_key(snap)
        if key not in self.file_layouts:
            self.file_layouts[key] = LoRAFileLayout(snap)
        return self.file_layouts[key].files(snap, snap.subvectors())

    def resolve(self, name: str, base_model: str) -> Resolved | None:
        """The verified LoRA directory of adapter `name` for `base_model`; None if no adapter has that name.
        AdapterFormatError / FileNotFoundError / VBLoRAError: the adapter exists but cannot be served (why)."""
        with self.lock, torch_threads(self.threads):
            clock = Stopwatch()
            found = find_source(self.adapters, name)
            if found is None:
                return None
            source, banks = found
            clock.lap("find")
            base = self.base(base_model)  # built on the first resolve only
            clock.lap("base")
            snap = read_snapshot(source, banks, base.module_order)
            clock.lap("read")
            base.check(snap, f"adapter '{name}'")
            out = self.cache / content_key(snap)
            clock.lap("check")
            cached = out in self.handed_out and all((out / f).is_file() for f in (WEIGHTS_FILE, CONFIG_FILE))
            if not cached:
                files = self.lora_files(snap)
                clock.lap("compose")
                # an entry this process did not write (an earlier run's) is used only when its
                # bytes are the ones just composed: entries are written without fsync, so a power cut may have
                # left one damaged
                cached = same_files(out, files)
                if not cached:
                    write_entry(out, files)
                clock.lap("write")
            os.utime(out)  # recently used
            self.handed_out.add(out)
            self.evict()
            return Resolved(name, out, snap.config.rank, cached, clock.total(), clock.laps | {"cpu": clock.cpu()})

    def evict(self) -> None:
        """Remove least recently used entries not handed out by this process until the cache fits `max_bytes`."""
        entries = [
            (d.stat().st_mtime, d, dir_bytes(d))
            for d in self.cache.iterdir()
            if d.is_dir() and not d.name.startswith(".") and (d / CONFIG_FILE).is_file()
        ]
        total = sum(size for _, _, size in entries)
        for _, d, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if d in self.handed_out:
                continue
            shutil.rmtree(d, ignore_errors=True)  # already gone: tolerated (a cache dir should serve one server)
            total -= size
        self.over_bound = max(0, total - self.max_bytes)


def cache_from_env(environ=os.environ) -> LoRADirCache:
    """The cache the environment configures: VBLORA_ADAPTERS (required), VBLORA_LORA_CACHE (default
    ~/.cache/vblora/vllm-lora), VBLORA_LORA_CACHE_BYTES (default 4 GiB; suffixes K, M, G allowed),
    VBLORA_COMPOSE_THREADS (torch threads for reading and composing one adapter, default 1)."""
    adapters = environ.get("VBLORA_ADAPTERS")
    if not adapters:
        raise VBLoRAError("VBLORA_ADAPTERS is not set: point it at the directory holding the VB-LoRA adapters")
    return LoRADirCache(
        adapters,
        environ.get("VBLORA_LORA_CACHE") or None,
        parse_bytes(environ.get("VBLORA_LORA_CACHE_BYTES", str(DEFAULT_CACHE_BYTES))),
        parse_threads(environ.get("VBLORA_COMPOSE_THREADS", str(DEFAULT_COMPOSE_THREADS))),
    )


def parse_threads(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value <= 0:
        raise VBLoRAError(f"VBLORA_COMPOSE_THREADS={text!r} is not a positive thread count (e.g. 1, 4)")
    return value


def parse_bytes(text: str, setting: str = "VBLORA_LORA_CACHE_BYTES") -> int:
    """A byte count written as digits or with a suffix K, M, G, T (binary: 4G = 4 GiB); VBLoRAError naming
    `setting` if it is not a positive one."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        value = -1
    if value <= 0:
        raise VBLoRAError(f"{setting}={text!r} is not a positive byte count (e.g. 4G, 512M)")
    return value
