"""Adapter layers. Each holds its base layer (`self.base`) and reads its A and B from the shared bank.

The sub-vector layout (which rows, how they become A `(r, in)` and B `(out, r)`) is `vblora.layout`'s; a layer only
knows its entry in it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vblora.bank import VectorBank
from vblora.errors import QuantizedBaseError
from vblora.layout import ModuleEntry, is_quantized, kind_of, weight_of


class VBLoRALayer(nn.Module):
    """Base of the adapter layers: `base(x) + adapter(x)` with A and B taken from the bank's composition.

    Subclasses implement `adapter(x, A, B)`. `merged` and `disabled` are plain flags; merging never happens as a side
    effect. Merge, unmerge and `delta_weight` use the stored rule (top-`eval_topk` softmax, or the frozen selection)
    in every mode, so a merge and its unmerge always cancel, even while training with a random selection rule.
    """

    base: nn.Module
    _bank: VectorBank  # set with object.__setattr__: not a submodule

    def __init__(self, base: nn.Module, bank: VectorBank, index: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        object.__setattr__(self, "_bank", bank)  # a reference, not a submodule: the bank is registered once
        self.index = index  # position in bank.layout
        entry = self.entry
        self.in_features, self.out_features, self.rank = entry.in_features, entry.out_features, bank.layout.rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    @property
    def bank(self) -> VectorBank:
        return self._bank

    @property
    def entry(self) -> ModuleEntry:
        return self._bank.layout.entries[self.index]

    @property
    def slot(self):
        return self.entry.slot

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (W, or W + dW while merged). Models read it from their own layers: T5's
        feed-forward checks `wo.weight.dtype` before its down-projection, which failed with the adapter in place
        (PEFT's LoRA layers answer the same way). Read-only: assign to `layer.base.weight`."""
        return weight_of(self.base)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None for an embedding, or a layer without one)."""
        return getattr(self.base, "bias", None)

    def _stored_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, layout = self.slot, self._bank.layout
        rows = self._bank.stored_subvectors(s.a_start, s.stop)  # this module's rows only, float32
        return layout.A(rows[: s.a_count], self.entry), layout.B(rows[s.a_count :], self.entry)

    def lora_A(self) -> torch.Tensor:
        """`(r, in)` float32 by the stored rule."""
        return self._stored_factors()[0]

    def lora_B(self) -> torch.Tensor:
        """`(out, r)` float32 by the stored rule."""
        return self._stored_factors()[1]

    def delta_weight(self) -> torch.Tensor:
        """dW = B A (float32, stored rule) in the base weight's layout."""
        A, B = self._stored_factors()
        return self._bank.layout.delta(A, B, self.entry)

    @property
    def quantized(self) -> bool:
        """Whether the base layer is quantized (bitsandbytes 4-bit / 8-bit): forward and disable work as usual, merge
        in place is refused (`refuse_merge`)."""
        return is_quantized(self.base)

    def refuse_merge(self, name: str = "") -> None:
        """Raise QuantizedBaseError if dW cannot be merged into this layer's base weight."""
        if self.quantized:
            raise QuantizedBaseError(
                f"cannot merge the adapter into the quantized base layer {name} ({type(self.base).__name__}): the "
                f"merged weight would have to be re-quantized, whose rounding error is as large as a typical update "
                f"dW = B A or larger, so most of the update would be lost. Run the adapter unmerged (it adds "
                f"x A^T B^T to the quantized layer's output), or write a dequantized merged model with "
                f"vblora.merge_and_save(model, out_dir, dtype=torch.bfloat16), or save / export the adapter "
                f"(vblora.save_adapter, vblora.export_lora); vblora.unload(model, merge=False) removes it"
            )

    @torch.no_grad()
    def merge(self) -> None:
        self.refuse_merge()
        if not self.merged:
            w = weight_of(self.base)
            w += self.delta_weight().to(device=w.device, dtype=w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = weight_of(self.base)
            w -= self.delta_weight().to(device=w.device, dtype=w.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        a_rows, b_rows = self._bank.module_rows(self.index, out.dtype)  # composed once per forward for the model
        layout = self._bank.layout
        return out + self.adapter(x, layout.A(a_rows, self.entry), layout.B(b_rows, self.entry)).to(out.dtype)

    def adapter(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out); never forms dW.
        return F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, merged={self.merged}"


class VBLoRALinear(VBLoRALayer):
    """Adapter over `nn.Linear` (weight `(out, in)`)."""


class VBLoRAConv1D(VBLoRALayer):
    """Adapter over HF GPT-2 `Conv1D`: same math as Linear; its weight is stored transposed `(in, out)`."""


class VBLoRAEmbedding(VBLoRALayer):
    """Adapter over `nn.Embedding`, seen as a linear map from one-hot `(num_embeddings,)` to `(embedding_dim,)`.

    A is `(r, num_embeddings)`, B `(embedding_dim, r)`; the forward looks up columns of A instead of multiplying by
    a one-hot vector. The base weight is `(num_embeddings, embedding_dim)`, i.e. dW transposed.
    """

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


LAYER_CLASSES = {"linear": VBLoRALinear, "conv1d": VBLoRAConv1D, "embedding": VBLoRAEmbedding}


def layer_class(base: nn.Module) -> type[VBLoRALayer] | None:
    """Adapter class for a base module, or None if it cannot be adapted."""
    kind = kind_of(base)
    return LAYER_CLASSES[kind.name] if kind is not None else None
