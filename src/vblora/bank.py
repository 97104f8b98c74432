"""The vector bank, `compose()` and the selection rules of the paper's ablation (Table 5).

Shapes: h = num_vectors, b = vector_length, N = number of sub-vectors of the whole model, k = top-k.
The bank is one module, registered once at the model's root; every adapter layer reads its rows of the
`(N, b)` sub-vectors composed once per forward pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from vblora.config import VBLoRAConfig
from vblora.errors import NonFiniteError


def compose(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k admixture (Eq. 3.3, Algorithm 1): `(N, h)` logits, `(h, b)` bank -> `(N, b)` sub-vectors."""
    top_logits, indices = logits.topk(k, dim=-1)  # (N, k)
    return compose_selected(indices, top_logits.softmax(dim=-1), bank)


def compose_selected(indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """`(N, k)` indices and weights, `(h, b)` bank -> `(N, b)`. F.embedding's backward is a fast scatter-add."""
    return (weights.unsqueeze(-1) * F.embedding(indices, bank)).sum(dim=1)


def compose_all(logits: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Select-all: softmax over the whole bank (k = h)."""
    return logits.softmax(dim=-1) @ bank


def compose_noisy_topk(logits: torch.Tensor, bank: torch.Tensor, k: int, noise_std: float) -> torch.Tensor:
    """Noisy top-k (Shazeer et al. 2016) with fixed Gaussian noise: select and weight on noisy logits."""
    return compose(logits + noise_std * torch.randn_like(logits), bank, k)


def compose_gumbel(logits: torch.Tensor, bank: torch.Tensor, temperature: float, hard: bool) -> torch.Tensor:
    """Gumbel-softmax over the whole bank; `hard=True` is the straight-through estimator."""
    return F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=-1) @ bank


def compose_training(logits: torch.Tensor, bank: torch.Tensor, config: VBLoRAConfig) -> torch.Tensor:
    """The training-time rule chosen by `config.selection`."""
    rule = config.selection
    if rule == "topk":
        return compose(logits, bank, config.topk)
    if rule == "all":
        return compose_all(logits, bank)
    if rule == "noisy_topk":
        return compose_noisy_topk(logits, bank, config.topk, config.noise_std)
    return compose_gumbel(logits, bank, config.temperature, hard=rule == "st_gumbel")


def compose_eval(logits: torch.Tensor, bank: torch.Tensor, config: VBLoRAConfig) -> torch.Tensor:
    """The evaluation rule: deterministic top-`stored_topk` softmax (full softmax for select-all)."""
    if config.selection == "all":
        return compose_all(logits, bank)
    return compose(logits, bank, config.stored_topk)


def _no_autocast(device_type: str):
    """Autocast switched off for the composition (where the device type supports autocast at all)."""
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest unsigned integer type that holds indices < num_vectors (uint8 for h <= 256, as the paper)."""
    if num_vectors <= 256:
        return torch.uint8
    if num_vectors <= 65536:
        return torch.uint16
    return torch.int32


class VectorBank(nn.Module):
    """The one bank of a model: `bank (h, b)` plus either training logits `(N, h)` or a frozen selection.

    Training form: parameters `bank` and `logits`. Frozen form (after `freeze_selection()` or loading an adapter):
    parameter `bank` and buffers `indices (N, k)` (int64) and `weights (N, k)`, with no `(N, h)` logits at all.
    `layout` lists `(module name, Slot)` in row order, for error messages and storage.
    """

    def __init__(self, config: VBLoRAConfig, num_subvectors: int, *, with_logits: bool = True) -> None:
        super().__init__()
        self.config = config
        self.num_subvectors = num_subvectors
        self.layout: list = []
        g = torch.Generator().manual_seed(config.seed)
        h, b = config.num_vectors, config.vector_length
        bound = config.init_bank_bound
        self.bank = nn.Parameter(torch.rand(h, b, generator=g) * (2 * bound) - bound)
        if with_logits:
            self.logits = nn.Parameter(torch.randn(num_subvectors, h, generator=g) * config.init_logits_std)
        else:
            self.register_parameter("logits", None)
            k = config.stored_topk
            self.register_buffer("indices", torch.zeros(num_subvectors, k, dtype=torch.long))
            self.register_buffer("weights", torch.full((num_subvectors, k), 1.0 / k))
        self._step_cache: dict | None = None  # per-forward composition, keyed by (dtype, device, grad mode)
        self._eval_cache: tuple | None = None  # (key, tensor): reused across no-grad forwards until params change

    @property
    def frozen(self) -> bool:
        return self.logits is None

    # -- composition -------------------------------------------------------------------------------------------
    def compose_now(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Compose sub-vectors `[start, stop)` (default all `N`) in float32 with the rule for the current mode.

        Every rule works row by row, so composing a range of rows gives exactly those rows of the full composition.
        """
        rows = slice(start, stop)
        with _no_autocast(self.bank.device.type):  # fp32 master composition, even under autocast
            if self.frozen:
                return compose_selected(self.indices[rows], self.weights[rows], self.bank)
            if self.training:
                return compose_training(self.logits[rows], self.bank, self.config)
            return compose_eval(self.logits[rows], self.bank, self.config)

    def subvectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`(N, b)` sub-vectors for this forward pass, in `dtype` (the activation dtype).

        Composed once per root forward (the model's pre-hook opens a step), once per parameter change in
        no-grad inference, and afresh when called outside a root forward.
        """
        return self._composed(dtype or self.bank.dtype)[0]

    def rows(self, slot, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(a_count, b)` and `(b_count, b)` sub-vector rows of one module's A and B for this forward pass.

        Taken from one `split` of the step's composition: its backward is a single concatenation, where per-module
        slices would each scatter into a fresh `(N, b)` zero tensor in the backward pass. Inside a reentrant
        checkpoint's recomputation (whose inner backward would free a shared graph) only this module's rows are
        composed, afresh.
        """
        if self._recomputing_reentrant():
            a = self.compose_now(slot.a_start, slot.b_start + slot.b_count).to(dtype)
            return a[:slot.a_count], a[slot.a_count:]
        sub, pieces = self._composed(dtype)
        i = None if pieces is None else self._piece_index().get(slot.a_start)
        if i is None or pieces[i].shape[0] != slot.a_count:
            return sub[slot.a_start:slot.a_start + slot.a_count], sub[slot.b_start:slot.b_start + slot.b_count]
        return pieces[i], pieces[i + 1]

    def _recomputing_reentrant(self) -> bool:
        # A no-grad forward in training mode within this step means reentrant checkpointing; a forward run while a
        # backward pass is executing is its recomputation. (Non-reentrant recomputation must instead replay the
        # original forward's ops exactly, i.e. reuse the step's composition, which was made before any region.)
        return (self._step_cache is not None and self._step_cache.get("reentrant", False)
                and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1)

    def _composed(self, dtype: torch.dtype) -> tuple[torch.Tensor, tuple | None]:
        """`(sub (N, b), pieces or None)` in `dtype`: from the step / eval cache, or composed now."""
        if torch.compiler.is_compiling():
            # Traced: the root pre-hook's composition of this trace (no version checks), else compose inline.
            step = self._step_cache if self._step_cache is not None else {}
            if ("traced", dtype) not in step:
                sub = step["traced"].to(dtype) if "traced" in step else self.compose_now().to(dtype)
                step[("traced", dtype)] = self._with_pieces(sub)
            return step[("traced", dtype)]
        grad = torch.is_grad_enabled()
        if not grad and not self.training:
            return self._inference_subvectors(dtype)
        if self._step_cache is None:
            return self.compose_now().to(dtype), None
        if not grad:
            self._step_cache["reentrant"] = True
        key = (dtype, grad, self.bank.device, self._versions())
        out = self._step_cache.get(key)
        if out is None:
            fp32 = self._step_cache.get("fp32")
            if fp32 is None or fp32[0] != (grad, self._versions()):
                fp32 = (grad, self._versions()), self.compose_now()
            out = self._step_cache[key] = self._with_pieces(fp32[1].to(dtype))
        return out

    def _piece_index(self) -> dict:
        """`{slot.a_start: index of its A piece}` for a layout of consecutive (A, B) blocks covering all N rows."""
        cached = getattr(self, "_pieces_for", None)
        if cached is None or cached[0] != len(self.layout):
            sizes, index, row = [], {}, 0
            for _, slot in self.layout:
                if slot.a_start != row or slot.b_start != row + slot.a_count:
                    sizes = None
                    break
                index[slot.a_start] = len(sizes)
                sizes += [slot.a_count, slot.b_count]
                row += slot.a_count + slot.b_count
            if not sizes or row != self.num_subvectors:
                sizes, index = None, {}
            self._pieces_for = cached = (len(self.layout), sizes, index)
        return cached[2]

    def _with_pieces(self, sub: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        self._piece_index()
        sizes = self._pieces_for[1]
        return sub, (sub.split(sizes) if sizes else None)

    def _versions(self) -> tuple:
        # In-place optimizer updates bump `_version`, so a cached composition is never used after a change.
        sources = [self.bank] + ([self.indices, self.weights] if self.frozen else [self.logits])
        return tuple((id(t), t._version) for t in sources)

    def _inference_subvectors(self, dtype: torch.dtype) -> tuple[torch.Tensor, tuple | None]:
        key = (dtype, self.bank.device, self.training, self._versions())
        if self._eval_cache is None or self._eval_cache[0] != key or self.training:
            self._eval_cache = (key, self._with_pieces(self.compose_now().to(dtype)))
        return self._eval_cache[1]

    def begin_step(self, *_args) -> None:
        """Root forward pre-hook: start a new composition step (the previous step's graph is released).

        A training forward with grad composes here, before any checkpointed region, so a non-reentrant
        checkpoint's recomputation replays exactly the ops of the original forward (casts and views only).
        """
        self._step_cache = {}
        if torch.compiler.is_compiling():
            self._step_cache["traced"] = self.compose_now()  # one composition per traced forward
        elif self.training and torch.is_grad_enabled():
            self._step_cache["fp32"] = (True, self._versions()), self.compose_now()

    def forward(self, x=None):
        """Identity. The bank computes nothing per input; passing input through keeps `nn.Sequential` roots
        (which call every child in order) working after the bank is registered on them."""
        return x

    # -- selection ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def topk_selection(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(indices (N, k) int64, weights (N, k) float32)` of the evaluation rule, from logits or the frozen form."""
        if self.frozen:
            return self.indices.clone(), self.weights.float().clone()
        k = k or self.config.stored_topk
        top, idx = self.logits.float().topk(k, dim=-1)
        return idx, top.softmax(dim=-1)

    @torch.no_grad()
    def freeze_selection(self) -> None:
        """Replace the `(N, h)` logits by the stored top-k selection (inference form; frees the logits)."""
        if self.frozen:
            return
        idx, w = self.topk_selection()
        del self.logits
        self.register_parameter("logits", None)
        self.register_buffer("indices", idx)
        self.register_buffer("weights", w.to(self.bank.dtype))
        self._eval_cache = None

    # -- checks ------------------------------------------------------------------------------------------------
    def owner_of(self, row: int) -> str:
        for name, slot in self.layout:
            if slot.a_start <= row < slot.a_start + slot.a_count:
                return f"{name} (A)"
            if slot.b_start <= row < slot.b_start + slot.b_count:
                return f"{name} (B)"
        return "?"

    @torch.no_grad()
    def check_finite(self) -> None:
        """Raise `NonFiniteError` naming the tensor and the first bad module if bank or logits hold NaN/inf."""
        bad_rows = (~torch.isfinite(self.bank)).any(dim=1).nonzero()
        if len(bad_rows):
            raise NonFiniteError(f"VB-LoRA bank row {int(bad_rows[0])} holds NaN/inf values; the bank is shared by "
                                 f"every adapted module, so training diverged: lower the bank learning rate or "
                                 f"reload a checkpoint")
        rows = self.weights if self.frozen else self.logits
        bad_rows = (~torch.isfinite(rows)).any(dim=1).nonzero()
        if len(bad_rows):
            row = int(bad_rows[0])
            what = "mixing weights" if self.frozen else "logits"
            raise NonFiniteError(f"VB-LoRA {what} of sub-vector {row} of module {self.owner_of(row)} hold NaN/inf "
                                 f"values; lower the logits learning rate or reload a checkpoint")

    def extra_repr(self) -> str:
        h, b = self.bank.shape
        form = "frozen selection" if self.frozen else "logits"
        return f"num_vectors={h}, vector_length={b}, subvectors={self.num_subvectors}, k={self.config.topk}, {form}"
