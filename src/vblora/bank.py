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
from vblora.layout import Layout


def compose(logits: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k admixture (Eq. 3.3, Algorithm 1): each sub-vector is the softmax-weighted sum of its k top bank vectors.

    Args:
        logits: `(N, h)` scores of every sub-vector over the bank's vectors.
        bank: `(h, b)` the vector bank.
        k: how many bank vectors each sub-vector mixes (1 <= k <= h).

    Returns:
        `(N, b)` sub-vectors, differentiable in `logits` (through the k selected entries) and in `bank`.

    Raises:
        RuntimeError: k is larger than h (from `torch.topk`).
    """
    top_logits, indices = logits.topk(k, dim=-1)  # (N, k)
    return compose_selected(indices, top_logits.softmax(dim=-1), bank)


def compose_selected(indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """`(N, k)` indices and weights, `(h, b)` bank -> `(N, b)`: `sum_k weights[n, k] * bank[indices[n, k]]`."""
    if indices.shape[-1] == 2 and not (torch.is_grad_enabled() and (weights.requires_grad or bank.requires_grad)):
        # Top-2 (the paper's default) with nothing to differentiate (export, merge, serving, evaluation of a frozen
        # selection): one `(N, b)` row gather per choice instead of the `(N, 2, b)` block, 3x faster on the CPU (5.3
        # -> 1.7 ms for a SmolLM2 adapter, the vLLM plugin's cold start). The same bits as the block's sum: products
        # rounded alike, then one addition, whose result does not depend on order (tests/test_compose.py); with
        # more terms the order would matter, and k = 1 differs in the sign of zeros.
        out = bank.index_select(0, indices[:, 0]) * weights[:, :1]
        out += bank.index_select(0, indices[:, 1]) * weights[:, 1:]
        out += 0.0  # the block's sum starts from +0.0, so -0.0 + -0.0 comes out +0.0 there: the same here
        return out
    return ComposeSelected.apply(indices, weights, bank)


class ComposeSelected(torch.autograd.Function):
    """`compose_selected` keeping only its inputs for the backward pass. Plain autograd would keep the gathered rows
    `bank[indices]`, `(N, k, b)`, alive from the forward to the end of the backward (k times the composition itself,
    during the peak of a training step); here the backward gathers them again. It runs last (the composition opens
    the forward), when the activations are already freed."""

    @staticmethod
    def forward(ctx, indices: torch.Tensor, weights: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, weights, bank)
        return (weights.unsqueeze(-1) * F.embedding(indices, bank)).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (N, b)
        indices, weights, bank = ctx.saved_tensors
        grad_weights = grad_bank = None
        if ctx.needs_input_grad[1]:  # (N, k, b) @ (N, b, 1) -> (N, k)
            grad_weights = torch.bmm(F.embedding(indices, bank), grad.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[2]:  # weights[n, k] * grad[n] added into row indices[n, k]: F.embedding's backward
            rows = weights.unsqueeze(-1) * grad.unsqueeze(1)  # (N, k, b)
            grad_bank = torch.ops.aten.embedding_dense_backward(rows, indices, bank.shape[0], -1, False)
        return None, grad_weights, grad_bank


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


Pieces = list  # per module `(A rows (a_count, b), B rows (b_count, b))`, from `Layout.split`


class _Step:
    """The composition of one root forward pass. `fp32` holds the `(N, b)` float32 sub-vectors (with or without a
    graph), `pieces` their per-module split per activation dtype: both bounded by the dtypes in use, never by calls.

    open: the root forward is running. reentrant: a training-mode forward ran without grad inside it (the first pass
    of a reentrant checkpoint). consumed: gradient reached the composition (its graph is spent)."""

    def __init__(self, versions: tuple) -> None:
        self.versions, self.open, self.reentrant, self.consumed = versions, True, False, False
        self.fp32: dict[bool, torch.Tensor] = {}  # grad mode -> (N, b)
        self.pieces: dict[tuple, Pieces] = {}  # (dtype, grad mode) -> pieces

    def mark_consumed(self, grad: torch.Tensor) -> None:
        self.consumed = True


class VectorBank(nn.Module):
    """The one bank of a model: `bank (h, b)` plus either training logits `(N, h)` or a frozen selection.

    Training form: parameters `bank` and `logits`. Frozen form (loading an adapter): parameter `bank` and buffers
    `indices (N, k)` (int64) and `weights (N, k)`, with no `(N, h)` logits at all. `layout` (a
    `vblora.layout.Layout`) says which rows each adapted module owns. `add_vblora` builds and registers it; users
    reach it with `get_bank(model)`.

    Composition state: the root module's forward hooks open and close a `_Step`; all adapted layers of that forward
    read their rows from one composition. No-grad evaluation reuses one cached composition, keyed on the parameters'
    identity and version counters and on the config, so an optimizer step or a config change is seen without anybody
    resetting anything.

    Args:
        config: the adapter's settings (bank shape, k, initialisation, selection rule).
        layout: the row ranges of every adapted module (N rows in all).
        with_logits: True for the training form (logits initialised from `config.seed`), False for the frozen form
            (zero indices and uniform weights, to be filled by a loader).
    """

    config: VBLoRAConfig
    layout: Layout
    bank: nn.Parameter  # (h, b)
    logits: nn.Parameter | None  # (N, h), training form only
    indices: torch.Tensor  # (N, k) int64, frozen form only
    weights: torch.Tensor  # (N, k), frozen form only

    def __init__(self, config: VBLoRAConfig, layout: Layout, *, with_logits: bool = True) -> None:
        super().__init__()
        self.config, self.layout = config, layout
        n = layout.num_subvectors
        g = torch.Generator().manual_seed(config.seed)
        h, b = config.num_vectors, config.vector_length
        bound = config.init_bank_bound
        self.bank = nn.Parameter(torch.rand(h, b, generator=g) * (2 * bound) - bound)
        if with_logits:
            self.logits = nn.Parameter(torch.randn(n, h, generator=g) * config.init_logits_std)
        else:
            self.register_parameter("logits", None)
            k = config.stored_topk
            self.register_buffer("indices", torch.zeros(n, k, dtype=torch.long))
            self.register_buffer("weights", torch.full((n, k), 1.0 / k))
        self._step: _Step | None = None
        self._inference: tuple | None = None  # (key, pieces) of the last no-grad evaluation composition

    @property
    def frozen(self) -> bool:
        """True in the frozen (inference) form: a stored selection, no `(N, h)` logits."""
        return self.logits is None

    @property
    def num_subvectors(self) -> int:
        """N: the sub-vectors of all adapted modules together (rows of the logits)."""
        return self.layout.num_subvectors

    # -- composition rules ---------------------------------------------------------------------------------------
    def compose_rows(self, start: int = 0, stop: int | None = None, *, stored: bool = False) -> torch.Tensor:
        """Sub-vectors `[start, stop)` (default all `N`) in float32, by the rule of the current mode, or by the
        stored rule (frozen selection, else top-`eval_topk` softmax; full softmax for select-all) if `stored` or in
        eval mode. Every rule works row by row, so a range of rows equals those rows of the full composition."""
        rows = slice(start, stop)
        logits = self.logits
        with _no_autocast(self.bank.device.type):  # fp32 master composition, even under autocast
            if logits is None:  # frozen
                return compose_selected(self.indices[rows], self.weights[rows], self.bank)
            if self.training and not stored:
                return compose_training(logits[rows], self.bank, self.config)
            return compose_eval(logits[rows], self.bank, self.config)

    @torch.no_grad()
    def stored_subvectors(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Sub-vectors by the stored rule, whatever the mode: what merge, unmerge and every export use.

        Args:
            start: first row.
            stop: row after the last (default: N).

        Returns:
            `(stop - start, b)` float32.
        """
        return self.compose_rows(start, stop, stored=True)

    def subvectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All sub-vectors by the current mode's rule, composed now (for analysis; layers use `module_rows`).

        Args:
            dtype: the result's dtype (default: the bank's).

        Returns:
            `(N, b)` sub-vectors.
        """
        return self.compose_rows().to(dtype or self.bank.dtype)

    # -- composition state -----------------------------------------------------------------------------------------
    def module_rows(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(a_count, b)` and `(b_count, b)` rows of module `i` for the running forward pass, in `dtype`."""
        if torch.compiler.is_compiling():  # traced: the root pre-hook's composition, no version checks
            step = self._step
            if step is None or not step.fp32:
                return self.layout.split(self.compose_rows().to(dtype))[i]
            return self.layout.split(next(iter(step.fp32.values())).to(dtype))[i]
        grad = torch.is_grad_enabled()
        step = self._step
        if not self.training and not (grad and self._trainable()):
            if step is None or not step.open:
                return self._inference_pieces(dtype)[i]
            key = (dtype, "inference")  # the cache is validated once per forward, not once per module
            if key not in step.pieces:
                step.pieces[key] = self._inference_pieces(dtype)
            return step.pieces[key][i]
        if step is not None and step.open:
            step.reentrant |= not grad and self.training
            return self._step_pieces(step, dtype, grad)[i]
        if step is not None and grad and step.reentrant:
            # A reentrant checkpoint recomputing its region inside backward: that region's own inner backward would
            # free a shared graph, so compose only this module's rows, afresh.
            s = self.layout.entries[i].slot
            rows = self.compose_rows(s.a_start, s.stop).to(dtype)
            return rows[: s.a_count], rows[s.a_count :]
        if step is not None and grad and not step.consumed and step.versions == self._versions():
            # A non-reentrant checkpoint recomputing inside backward must replay the original forward's ops exactly:
            # the same composition (made in the pre-hook, before any checkpointed region), cast and split.
            return self._step_pieces(step, dtype, grad)[i]
        return self.layout.split(self.compose_rows().to(dtype))[i]  # outside a root forward: compose, keep nothing

    def _step_pieces(self, step: _Step, dtype: torch.dtype, grad: bool) -> Pieces:
        key = (dtype, grad)
        if key not in step.pieces:
            if True in step.fp32:  # one draw per forward, also for a no-grad region inside it
                fp32 = step.fp32[True] if grad else step.fp32[True].detach()
            else:
                cached = step.fp32.get(grad)
                if cached is None:
                    with torch.set_grad_enabled(grad):
                        cached = step.fp32[grad] = self.compose_rows()
                fp32 = cached
            step.pieces[key] = self.layout.split(fp32.to(dtype))
        return step.pieces[key]

    def _inference_pieces(self, dtype: torch.dtype) -> Pieces:
        key = (self._versions(), self.config, dtype, self.bank.device)
        if self._inference is None or self._inference[0] != key:
            with torch.no_grad():
                self._inference = (key, self.layout.split(self.compose_rows().to(dtype)))
        return self._inference[1]

    def _trainable(self) -> bool:
        return self.bank.requires_grad or (self.logits is not None and self.logits.requires_grad)

    def _versions(self) -> tuple:
        # In-place updates (optimizer steps, copy_, load_state_dict) bump a tensor's version counter, and `.to()` /
        # `.data =` give it new storage: either way a cached composition is never used after a change. (`_version`
        # is the only cheap signal of an in-place update that torch offers.)
        sources = [self.bank] + ([self.indices, self.weights] if self.logits is None else [self.logits])
        return tuple((t.data_ptr(), t._version) for t in sources)

    def attach(self, root: nn.Module) -> None:
        """Let `root`'s forward open and close the composition steps (called once, by `add_vblora`)."""
        self._hooks = (root.register_forward_pre_hook(self.begin_step), root.register_forward_hook(self.end_step))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def begin_step(self, *_args) -> None:
        """Root forward pre-hook: open a new step (the previous one and its graph are released). With grad, compose
        here, before any checkpointed region, so a non-reentrant checkpoint's recomputation replays the same ops."""
        if torch.compiler.is_compiling():  # traced: one composition per forward, read by every layer
            self._step = _Step(())
            self._step.fp32[torch.is_grad_enabled()] = self.compose_rows()
            return
        self._step = step = _Step(self._versions())
        if torch.is_grad_enabled() and (self.training or self._trainable()):
            step.fp32[True] = sub = self.compose_rows()
            if sub.requires_grad:
                sub.register_hook(step.mark_consumed)

    def end_step(self, *_args) -> None:
        """Root forward hook: the forward is over (recomputations inside backward may still read the step)."""
        if self._step is not None:
            self._step.open = False

    def forward(self, x=None):
        """Identity. The bank computes nothing per input; passing input through keeps `nn.Sequential` roots
        (which call every child in order) working after the bank is registered on them."""
        return x

    # -- selection ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def topk_selection(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored selection: which bank vectors each sub-vector mixes, and with what weights.

        Args:
            k: how many vectors per sub-vector (default: `config.stored_topk`); ignored in the frozen form.

        Returns:
            `(indices (N, k) int64, weights (N, k) float32)`, each row of weights summing to 1.
        """
        if self.logits is None:  # frozen
            return self.indices.clone(), self.weights.float().clone()
        k = k or self.config.stored_topk
        top, idx = self.logits.float().topk(k, dim=-1)
        return idx, top.softmax(dim=-1)

    # -- checks ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def check_finite(self) -> None:
        """Check the bank and the logits (or frozen weights) hold finite values only.

        Raises:
            NonFiniteError: naming the tensor and the first module with a NaN or infinite value.
        """
        bad_rows = (~torch.isfinite(self.bank)).any(dim=1).nonzero()
        if len(bad_rows):
            raise NonFiniteError(
                f"VB-LoRA bank row {int(bad_rows[0])} holds NaN/inf values; the bank is shared by "
                f"every adapted module, so training diverged: lower the bank learning rate or "
                f"reload a checkpoint"
            )
        rows = self.weights if self.logits is None else self.logits
        bad_rows = (~torch.isfinite(rows)).any(dim=1).nonzero()
        if len(bad_rows):
            row = int(bad_rows[0])
            what = "mixing weights" if self.frozen else "logits"
            raise NonFiniteError(
                f"VB-LoRA {what} of sub-vector {row} of module {self.layout.owner_of(row)} hold "
                f"NaN/inf values; lower the logits learning rate or reload a checkpoint"
            )

    def extra_repr(self) -> str:
        h, b = self.bank.shape
        form = "frozen selection" if self.frozen else "logits"
        return f"num_vectors={h}, vector_length={b}, subvectors={self.num_subvectors}, k={self.config.topk}, {form}"
