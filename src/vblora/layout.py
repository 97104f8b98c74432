"""The sub-vector layout of a model: which rows of the bank's `(N, ...)` tensors each adapted module owns, how
those rows become its LoRA factors, the kinds of layer that can be adapted, and the stored parameter count.

Per module (Eq. 3.1, as HF PEFT): dW = B A with A `(r, in)` and B `(out, r)`. A module owns
`a_count = r * ceil(in/b)` consecutive rows for A, ordered `(r, ceil(in/b))`, then `b_count = ceil(out/b) * r` rows
for B, ordered `(ceil(out/b), r)`; modules follow one another in model order, so the whole model is one contiguous
block of N rows. When b does not divide a dimension, the last sub-vector of each row of A (column of B) is composed
in full and its excess entries dropped. Layers, the bank, every storage format and the exports read the layout
from here; none re-derives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

# -- layer kinds ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of adaptable base layer: its name in files, and whether its weight is stored as dW transposed."""

    name: str
    transposed: bool  # weight `(in, out)`: GPT-2 Conv1D, and Embedding `(num_embeddings, dim)`


LINEAR, CONV1D, EMBEDDING = Kind("linear", False), Kind("conv1d", True), Kind("embedding", True)
KINDS = {k.name: k for k in (LINEAR, CONV1D, EMBEDDING)}


def kind_of(module: nn.Module) -> Kind | None:
    """The kind of an adaptable module, or None. Subclasses of nn.Linear are linear, deliberately including
    bitsandbytes' quantized `Linear4bit` / `Linear8bitLt` (see `is_quantized`): the adapter reads only their
    `in_features` / `out_features` and calls them, so the math is the same; only merging differs."""
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D, no import
        return CONV1D
    return None


PARAMS_4BIT, INT8_PARAMS = "Params4bit", "Int8Params"  # bitsandbytes' weight classes, matched by name: no import
QLORA_EXTRA = "pip install 'vblora[qlora]'"


def is_quantized_param(p: torch.Tensor) -> bool:
    return type(p).__name__ in (PARAMS_4BIT, INT8_PARAMS)


def is_quantized(module: nn.Module) -> bool:
    """Whether the module's weight is quantized (bitsandbytes 4-bit or 8-bit, or any non-float weight): it cannot
    take dW in place, and its `weight` holds packed codes, not W (read W with `dense_weight`)."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and (is_quantized_param(w) or not w.is_floating_point())


def parameter_count(p: torch.Tensor) -> int:
    """Entries of a parameter as the model sees them: a 4-bit weight packs 2 per byte of its storage dtype."""
    return p.numel() * 2 * p.element_size() if type(p).__name__ == PARAMS_4BIT else p.numel()


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight tensor of an adaptable layer (Linear, Conv1D, Embedding and their quantized forms have one)."""
    return cast(torch.Tensor, module.weight)


def require_bitsandbytes():
    """The bitsandbytes module, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"quantized base layers need bitsandbytes: {QLORA_EXTRA}") from e
    return bitsandbytes


@torch.no_grad()
def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight W as a float tensor in its own layout: dequantized `(out, in)` float32 for a quantized
    layer (a new tensor, this one module only: for merged exports and references, never in a forward), else the
    weight itself."""
    w: Any = weight_of(module)  # Params4bit / Int8Params carry quant_state / SCB beside the tensor
    if not is_quantized(module):
        return w
    if type(w).__name__ == PARAMS_4BIT:
        F = require_bitsandbytes().functional
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            module.state_dict()  # bitsandbytes' CPU bf16 repacking (eval forward) is undone by its state-dict hook
        return F.dequantize_4bit(w.data, w.quant_state).float().reshape(module.out_features, module.in_features)
    # Int8Params: per-row absmax scales SCB (moved to the layer's state by its first forward), W = CB * SCB / 127
    scale = next(
        (s for s in (getattr(w, "SCB", None), getattr(getattr(module, "state", None), "SCB", None)) if s is not None),
        None,
    )
    if w.dtype == torch.int8 and scale is not None:
        return require_bitsandbytes().functional.int8_vectorwise_dequant(w.data, scale).float()
    if w.is_floating_point():  # an 8-bit layer keeping fp16 weights (has_fp16_weights=True)
        return w
    raise TypeError(f"cannot dequantize the {w.dtype} weight of {type(module).__name__}")


def module_dims(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of an adaptable module (as a linear map x -> W x)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    w = weight_of(module)
    return w.shape[0], w.shape[1]  # Conv1D: weight (in, out)


# -- one module's rows ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Rows of one module's sub-vectors in the bank's `(N, ...)` tensors: A's rows, then B's."""

    a_start: int
    a_count: int
    b_start: int
    b_count: int

    @property
    def stop(self) -> int:
        return self.b_start + self.b_count


MODULE_FIELDS = ("name", "kind", "in", "out", "a_start", "a_count", "b_start", "b_count")  # a row of a file's table


@dataclass(frozen=True)
class ModuleEntry:
    """One adapted module: qualified name, layer kind, `(in, out)` dims and its rows."""

    name: str
    kind: str  # a key of KINDS
    in_features: int
    out_features: int
    slot: Slot

    def to_row(self) -> list:
        s = self.slot
        return [self.name, self.kind, self.in_features, self.out_features, s.a_start, s.a_count, s.b_start, s.b_count]

    @classmethod
    def from_row(cls, row: list) -> ModuleEntry:
        name, kind, i, o, a0, an, b0, bn = row
        return cls(str(name), str(kind), int(i), int(o), Slot(int(a0), int(an), int(b0), int(bn)))

    @property
    def transposed(self) -> bool:
        return KINDS[self.kind].transposed

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight: `(out, in)`, or `(in, out)` for the transposed kinds."""
        return (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)


def slot_sizes(in_features: int, out_features: int, rank: int, vector_length: int) -> tuple[int, int]:
    """Number of A and B sub-vectors of an `in -> out` module: r*ceil(in/b) and ceil(out/b)*r."""
    return rank * math.ceil(in_features / vector_length), math.ceil(out_features / vector_length) * rank


# -- the model's layout -----------------------------------------------------------------------------------------------


class Layout:
    """The modules of one adapter in row order, with their LoRA rank; immutable.

    `split(sub)` cuts the `(N, b)` sub-vectors into per-module `(A rows, B rows)` with ONE `split` (its backward is a
    single concatenation, where per-module slices would each scatter into a fresh `(N, b)` zero tensor).
    """

    def __init__(self, entries: list[ModuleEntry], rank: int, vector_length: int) -> None:
        self.entries, self.rank, self.vector_length = tuple(entries), rank, vector_length
        self.index = {e.name: i for i, e in enumerate(self.entries)}
        self.num_subvectors = self.entries[-1].slot.stop if self.entries else 0
        self.sizes = [n for e in self.entries for n in (e.slot.a_count, e.slot.b_count)]

    @classmethod
    def build(cls, modules: list[tuple[str, nn.Module]], rank: int, vector_length: int) -> Layout:
        """The contiguous layout of `(qualified name, base module)` pairs in model order."""
        specs = []
        for name, m in modules:
            kind = kind_of(m)
            if kind is None:
                raise TypeError(f"{name}: {type(m).__name__} is not an adaptable layer")
            specs.append((name, kind.name, *module_dims(m)))
        return cls.from_specs(specs, rank, vector_length)

    @classmethod
    def from_specs(cls, specs: list[tuple[str, str, int, int]], rank: int, vector_length: int) -> Layout:
        entries, row = [], 0
        for name, kind, fan_in, fan_out in specs:
            a, b = slot_sizes(fan_in, fan_out, rank, vector_length)
            entries.append(ModuleEntry(name, kind, fan_in, fan_out, Slot(row, a, row + a, b)))
            row += a + b
        return cls(entries, rank, vector_length)

    def split(self, sub: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(N, b)` -> per module `((a_count, b), (b_count, b))` views, in row order."""
        pieces = sub.split(self.sizes)
        return [(pieces[2 * i], pieces[2 * i + 1]) for i in range(len(self.entries))]

    def A(self, rows: torch.Tensor, entry: ModuleEntry) -> torch.Tensor:
        """`(a_count, b)` rows -> `(r, in)` (a view; trimmed only when b does not divide `in`)."""
        A = rows.reshape(self.rank, -1)
        return A if A.shape[1] == entry.in_features else A[:, : entry.in_features]

    def B(self, rows: torch.Tensor, entry: ModuleEntry) -> torch.Tensor:
        """`(b_count, b)` rows ordered `(ceil(out/b), r)` -> `(out, r)`."""
        r, b = self.rank, rows.shape[1]
        nb = rows.shape[0] // r
        B = rows.view(nb, r, b).transpose(1, 2).reshape(nb * b, r)
        return B if nb * b == entry.out_features else B[: entry.out_features]

    def factors(self, sub: torch.Tensor, entry: ModuleEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """`(r, in)` A and `(out, r)` B of one module from the whole model's `(N, b)` sub-vectors."""
        s = entry.slot
        return self.A(sub[s.a_start : s.a_start + s.a_count], entry), self.B(sub[s.b_start : s.stop], entry)

    def delta(self, A: torch.Tensor, B: torch.Tensor, entry: ModuleEntry) -> torch.Tensor:
        """dW = B A in the base weight's layout (transposed for Conv1D and Embedding)."""
        dw = B @ A  # (out, in)
        return dw.T if entry.transposed else dw

    def owner_of(self, row: int) -> str:
        """`"name (A)"` or `"name (B)"` of the module owning sub-vector `row`, for error messages."""
        for e in self.entries:
            if e.slot.a_start <= row < e.slot.stop:
                return f"{e.name} ({'A' if row < e.slot.b_start else 'B'})"
        return "?"

    def lora_equivalent(self) -> int:
        """Parameters LoRA of the same rank on the same modules stores: sum of r * (in + out)."""
        return sum(self.rank * (e.in_features + e.out_features) for e in self.entries)


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest unsigned integer type that holds indices < num_vectors (uint8 for h <= 256, as the paper)."""
    if num_vectors <= 256:
        return torch.uint8
    if num_vectors <= 65536:
        return torch.uint16
    return torch.int32


def stored_count(num_vectors: int, vector_length: int, num_subvectors: int, k: int) -> float:
    """The paper's float32-equivalent count of the stored triplet: h*b + N*(k*w + (k-1)), with w the width of one
    index in float32 units (1/4 for uint8, 1/2 for uint16, 1 beyond). An int when whole (the usual case: it prints
    as 14234, not 14234.0), else a float, since index widths are fractions."""
    w = torch.tensor([], dtype=index_dtype(num_vectors)).element_size() / 4
    count = num_vectors * vector_length + num_subvectors * (k * w + (k - 1))
    return int(count) if count.is_integer() else count
