"""Adapter layers. Each holds its base layer (`self.base`) and reads its A and B from the shared bank.

Layout (Eq. 3.1, HF PEFT): dW = B A with A `(r, in)` and B `(out, r)`. A module owns `a_count = r * ceil(in/b)`
consecutive sub-vector rows for A (ordered `(r, ceil(in/b))`) then `b_count = ceil(out/b) * r` rows for B (ordered
`(ceil(out/b), r)`). When b does not divide a dimension, the last sub-vector is composed in full and its excess
entries are dropped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vblora.bank import VectorBank


@dataclass(frozen=True)
class Slot:
    """Rows of one module's sub-vectors in the bank's `(N, ...)` tensors."""

    a_start: int
    a_count: int
    b_start: int
    b_count: int


def slot_sizes(in_features: int, out_features: int, rank: int, vector_length: int) -> tuple[int, int]:
    """Number of A and B sub-vectors of a `(out, in)` module: r*ceil(in/b) and ceil(out/b)*r."""
    return rank * math.ceil(in_features / vector_length), math.ceil(out_features / vector_length) * rank


class VBLoRALayer(nn.Module):
    """Base of the adapter layers: `base(x) + adapter(x)` with A and B taken from the bank's composition.

    Subclasses set `weight_is_transposed` (base weight stored `(in, out)`, e.g. GPT-2 Conv1D) and implement
    `adapter(x, A, B)`. `merged` and `disabled` are plain flags; merging never happens as a side effect.
    """

    weight_is_transposed = False

    def __init__(self, base: nn.Module, bank: VectorBank, slot: Slot, in_features: int, out_features: int,
                 rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "_bank", bank)  # a reference, not a submodule: the bank is registered once
        self.slot = slot
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    @property
    def bank(self) -> VectorBank:
        return self._bank

    def lora_A(self, sub: torch.Tensor | None = None) -> torch.Tensor:
        """`(r, in)` from the `(N, b)` sub-vectors (composed now if not given)."""
        sub = self._bank.compose_now() if sub is None else sub
        s = self.slot
        return self._A(sub[s.a_start:s.a_start + s.a_count])

    def lora_B(self, sub: torch.Tensor | None = None) -> torch.Tensor:
        """`(out, r)`: rows `(ceil(out/b), r, b)` -> `(ceil(out/b) * b, r)`, excess dropped."""
        sub = self._bank.compose_now() if sub is None else sub
        s = self.slot
        return self._B(sub[s.b_start:s.b_start + s.b_count])

    def _A(self, rows: torch.Tensor) -> torch.Tensor:
        """`(a_count, b)` rows -> `(r, in)` (a view; the trim only when b does not divide `in`)."""
        A = rows.reshape(self.rank, -1)
        return A if A.shape[1] == self.in_features else A[:, :self.in_features]

    def _B(self, rows: torch.Tensor) -> torch.Tensor:
        """`(b_count, b)` rows ordered `(ceil(out/b), r)` -> `(out, r)`."""
        r, b = self.rank, rows.shape[1]
        nb = rows.shape[0] // r
        B = rows.view(nb, r, b).transpose(1, 2).reshape(nb * b, r)
        return B if nb * b == self.out_features else B[:self.out_features]

    def delta_weight(self) -> torch.Tensor:
        """dW = B A (float32) in the base weight's layout."""
        s = self.slot
        with torch.no_grad():
            rows = self._bank.compose_now(s.a_start, s.b_start + s.b_count).float()  # this module's rows only
        dw = self._B(rows[s.a_count:]) @ self._A(rows[:s.a_count])  # (out, in)
        return dw.T if self.weight_is_transposed else dw

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base.weight
            w += self.delta_weight().to(device=w.device, dtype=w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base.weight
            w -= self.delta_weight().to(device=w.device, dtype=w.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        a_rows, b_rows = self._bank.rows(self.slot, out.dtype)  # composed once per forward for the whole model
        return out + self.adapter(x, self._A(a_rows), self._B(b_rows)).to(out.dtype)

    def adapter(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out); never forms dW.
        return F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, merged={self.merged}"


class VBLoRALinear(VBLoRALayer):
    """Adapter over `nn.Linear` (weight `(out, in)`)."""


class VBLoRAConv1D(VBLoRALayer):
    """Adapter over HF GPT-2 `Conv1D`: same math as Linear, weight stored transposed `(in, out)`."""

    weight_is_transposed = True


class VBLoRAEmbedding(VBLoRALayer):
    """Adapter over `nn.Embedding`, seen as a linear map from one-hot `(num_embeddings,)` to `(embedding_dim,)`.

    A is `(r, num_embeddings)`, B `(embedding_dim, r)`; the forward looks up columns of A instead of multiplying by
    a one-hot vector. The base weight is `(num_embeddings, embedding_dim)`, i.e. dW transposed.
    """

    weight_is_transposed = True

    def adapter(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, A.T) @ B.T  # (..., r) @ (r, out)


class TrainedCopy(nn.Module):
    """A module trained in full (`modules_to_save`, e.g. a classifier head) next to its frozen original."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original = module
        self.trained = copy.deepcopy(module)
        self.original.requires_grad_(False)
        self.trained.requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # e.g. `model.classifier.out_proj` or `.weight` reached through the wrapper
            return getattr(super().__getattr__("trained"), name)


def layer_class(base: nn.Module) -> type[VBLoRALayer] | None:
    """Adapter class for a base module, or None if it cannot be adapted."""
    if isinstance(base, nn.Linear):
        return VBLoRALinear
    if isinstance(base, nn.Embedding):
        return VBLoRAEmbedding
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):  # transformers.pytorch_utils.Conv1D, no import
        return VBLoRAConv1D
    return None


def base_dims(base: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of an adaptable base module."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    return base.weight.shape[0], base.weight.shape[1]  # Conv1D: weight (in, out)
