"""Recording the vector selection during training (the data behind the paper's Figures 3-9).

At a set interval the recorder takes each sub-vector's top-k bank indices and mixing weights (the evaluation rule,
`bank.topk_selection()`) and stores them compactly: indices as uint8 (h <= 256) or uint16, weights as float16. Each
sub-vector is described once by its layer index, module (name and type), matrix (A or B) and position in that matrix,
so the figures can group sub-vectors by depth, module type and A/B. The bank itself is kept at the first and the
latest record (float32), for the bank embedding figure.

Files in the run directory:
  selection.npz   steps (T,) int64; indices (T, N, k) uint8|uint16; weights (T, N, k) float16;
                  layer (N,) int16 (-1: no layer index); module (N,) int16 (row of `modules` in the JSON);
                  matrix (N,) uint8 (0 = A, 1 = B); position (N,) int32; bank_first, bank_last (h, b) float32
  selection.json  format, sizes (h, b, k, N), interval, selection rule, steps, modules [{name, type, layer, slot}]

Use it from any loop with `SelectionRecorder(run_dir, every=50)` and `recorder.maybe_record(model, step)`, or with
`transformers.Trainer(callbacks=[SelectionCallback(every=50)])`. `load_selection(run_dir)` reads it back.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vblora.inject import get_bank, layer_index
from vblora.layout import index_dtype
from vblora.storage.files import atomic_write
from vblora.train.errors import DataError

FORMAT = "vblora-selection/1"
NPZ, JSON = "selection.npz", "selection.json"
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def name_in_layer(name: str) -> str:
    """The part of a qualified name after its layer index: `encoder.layer.3.attention.self.query` ->
    `attention.self.query` (the whole name if it has no layer index)."""
    m = _LAYER.search(name)
    return name[m.end() :] if m and m.end() < len(name) else name


def subvector_table(bank) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per-module rows and per-sub-vector arrays (layer, module, matrix, position) from `bank.layout`."""
    n = bank.num_subvectors
    layer = np.full(n, -1, np.int16)
    module = np.full(n, -1, np.int16)
    matrix = np.zeros(n, np.uint8)
    position = np.zeros(n, np.int32)
    modules = []
    for i, entry in enumerate(bank.layout.entries):
        name, slot = entry.name, entry.slot
        lay = layer_index(name)
        lay = -1 if lay is None else lay  # -1: no layer index
        modules.append({"name": name, "type": name_in_layer(name), "layer": lay, **dataclasses.asdict(slot)})
        for start, count, which in ((slot.a_start, slot.a_count, 0), (slot.b_start, slot.b_count, 1)):
            rows = slice(start, start + count)
            layer[rows], module[rows], matrix[rows] = lay, i, which
            position[rows] = np.arange(count)
    return modules, {"layer": layer, "module": module, "matrix": matrix, "position": position}


def record_selection(model, step: int, k: int | None = None) -> dict:
    """One snapshot of the model's selection: {step, indices (N, k) uint8|uint16, weights (N, k) float16}.

    Works inside any training loop (no Trainer needed). `k` defaults to the stored top-k of the config, capped at
    the training top-k for select-all (whose stored k is the whole bank).
    """
    bank = get_bank(model)
    cfg = bank.config
    if k is None:
        k = cfg.topk if cfg.selection == "all" else cfg.stored_topk
    idx, w = bank.topk_selection(k)  # a frozen selection is what it is: k is ignored there
    np_dtype = {torch.uint8: np.uint8, torch.uint16: np.uint16}.get(index_dtype(cfg.num_vectors), np.int32)
    return {
        "step": int(step),
        "indices": idx.cpu().numpy().astype(np_dtype),
        "weights": w.float().cpu().numpy().astype(np.float16),
    }


class SelectionRecorder:
    """Collects snapshots every `every` steps and writes `selection.npz` / `selection.json` into `run_dir`.

    Files are rewritten at each record (atomically), so a killed run still leaves the records so far.
    """

    def __init__(self, run_dir: str | Path, every: int = 50, k: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"record interval must be >= 1 step, got {every}")
        self.run_dir = Path(run_dir)
        self.every, self.k = int(every), k
        self.snapshots: list[dict] = []
        # set at the first record
        self._meta: dict[str, Any] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._bank_first: np.ndarray | None = None
        self._bank_last: np.ndarray | None = None

    def maybe_record(self, model, step: int) -> bool:
        """Record if `step` is a multiple of the interval (and not recorded yet). Returns whether it recorded."""
        return step % self.every == 0 and self.record(model, step)

    def record(self, model, step: int) -> bool:
        """Record `step` unless it is the latest record already. Returns whether it recorded."""
        if self.snapshots and self.snapshots[-1]["step"] == step:
            return False
        bank = get_bank(model)
        if not self._meta:
            modules, self._arrays = subvector_table(bank)
            cfg = bank.config
            self._meta = {
                "format": FORMAT,
                "num_vectors": int(bank.bank.shape[0]),
                "vector_length": int(bank.bank.shape[1]),
                "num_subvectors": bank.num_subvectors,
                "selection": cfg.selection,
                "train_topk": cfg.topk,
                "every": self.every,
                "modules": modules,
            }
            self._bank_first = bank.bank.detach().float().cpu().numpy().copy()
        self.snapshots.append(record_selection(model, step, self.k))
        self._bank_last = bank.bank.detach().float().cpu().numpy().copy()
        self.save()
        return True

    def save(self) -> Path:
        steps = np.array([s["step"] for s in self.snapshots], np.int64)
        arrays: dict[str, Any] = dict(
            self._arrays,
            steps=steps,
            bank_first=self._bank_first,
            bank_last=self._bank_last,
            indices=np.stack([s["indices"] for s in self.snapshots]),
            weights=np.stack([s["weights"] for s in self.snapshots]),
        )
        npz = io.BytesIO()
        np.savez_compressed(npz, **arrays)
        atomic_write(self.run_dir / NPZ, npz.getvalue())
        meta = dict(
            self._meta,
            topk=int(arrays["indices"].shape[-1]),
            records=len(steps),
            steps=steps.tolist(),
            index_dtype=str(arrays["indices"].dtype),
        )
        atomic_write(self.run_dir / JSON, json.dumps(meta, indent=1).encode())
        return self.run_dir / NPZ


if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
else:
    try:
        from transformers import TrainerCallback as _CallbackBase
    except ImportError:  # transformers is optional; the plain recorder works without it
        _CallbackBase = object


class SelectionCallback(_CallbackBase):
    """`transformers.TrainerCallback` that records the selection every `every` optimizer steps.

    Records the initial selection (step 0) at train begin and the final one at train end. Writes into `run_dir`,
    or the Trainer's `output_dir` when not given.
    """

    def __init__(self, every: int = 50, run_dir: str | Path | None = None, k: int | None = None) -> None:
        self.every, self.run_dir, self.k = every, run_dir, k
        self.recorder: SelectionRecorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.recorder = SelectionRecorder(self.run_dir or args.output_dir, self.every, self.k)
        if model is not None:
            self.recorder.record(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.recorder is not None and model is not None:
            self.recorder.maybe_record(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.recorder is not None and model is not None:
            self.recorder.record(model, state.global_step)


@dataclass
class Selection:
    """A recorded run, as arrays. T records, N sub-vectors, k selected, h bank vectors of length b."""

    steps: np.ndarray  # (T,)
    indices: np.ndarray  # (T, N, k) int64
    weights: np.ndarray  # (T, N, k) float32
    layer: np.ndarray  # (N,)
    module: np.ndarray  # (N,)
    matrix: np.ndarray  # (N,) 0 = A, 1 = B
    position: np.ndarray  # (N,)
    bank_first: np.ndarray  # (h, b)
    bank_last: np.ndarray  # (h, b)
    meta: dict

    @property
    def num_vectors(self) -> int:
        return int(self.meta["num_vectors"])

    @property
    def module_types(self) -> np.ndarray:
        """(N,) module type string of each sub-vector."""
        types = np.array([m["type"] for m in self.meta["modules"]], dtype=object)
        return types[self.module]

    def churn(self) -> np.ndarray:
        """(T-1,) fraction of sub-vectors whose selected index *set* changed since the previous record."""
        s = np.sort(self.indices, axis=-1)
        return (s[1:] != s[:-1]).any(axis=-1).mean(axis=1)  # (T-1, N) changed -> (T-1,); (0,) for one record

    def usage(self, t: int = -1) -> np.ndarray:
        """(h,) how many times each bank vector is selected (over all N sub-vectors and k slots) at record t."""
        return np.bincount(self.indices[t].reshape(-1), minlength=self.num_vectors)

    def weight_sums(self, mask: np.ndarray | None = None, t: int = -1) -> np.ndarray:
        """(h,) sum of top-k weights given to each bank vector by the sub-vectors in `mask` at record t."""
        idx, w = self.indices[t], self.weights[t]
        if mask is not None:
            idx, w = idx[mask], w[mask]
        return np.bincount(idx.reshape(-1), weights=w.reshape(-1), minlength=self.num_vectors)

    def composed(self, t: int = -1) -> np.ndarray:
        """(N, b) sub-vectors composed from record t's selection and the latest bank."""
        return (self.weights[t][..., None] * self.bank_last[self.indices[t]]).sum(axis=1)


def load_selection(run_dir: str | Path) -> Selection:
    run_dir = Path(run_dir)
    npz, meta_path = run_dir / NPZ, run_dir / JSON
    if not npz.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"{run_dir}: no {NPZ}/{JSON}; train with selection recording on "
            f"(vblora train --record-selection-every N, or SelectionCallback in your own Trainer)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    for k, dtype in (("indices", np.int64), ("weights", np.float32), ("layer", np.int64), ("module", np.int64)):
        arrays[k] = arrays[k].astype(dtype)
    return Selection(**arrays, meta=meta)
