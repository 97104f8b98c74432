"""Tied-LoRA (Renduchintala et al., NAACL 2024), the variant VB-LoRA's Table 1 compares against.

For each module *type* (e.g. every layer's `attention.self.query`) one trainable `A (r, in)` and `B (out, r)` are
shared by all layers; each adapted module has its own trainable scaling vectors `u (r)` and `v (out)`:

    y = base(x) + v * (B @ (u * (A @ dropout(x))))

(no alpha / r factor: u and v are trained scales, and every run here used alpha = r, a factor of 1)

Stored parameters: sum over types r*(in+out) + sum over modules (r + out); on RoBERTa-base q/v at r=8 that is
2*2*8*768 + 12*2*(8+768) = 43,200 (Table 1's 0.043M). The shared A/B live once, at `model.tied_lora`, so
`state_dict()` and DDP see each parameter once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

ROOT_ATTR = "tied_lora"


def layer_pattern(name: str) -> str:
    """The name with its layer indices as `*`: modules with one pattern share A and B.
    `roberta.encoder.layer.3.attention.self.query` -> `roberta.encoder.layer.*.attention.self.query`."""
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


class TiedShared(nn.Module):
    """The tied `A`/`B` of every module type; keys are module types with '.' replaced (ParameterDict keys)."""

    def __init__(self):
        super().__init__()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()

    def get(self, mtype: str, rank: int, fan_in: int, fan_out: int, generator: torch.Generator):
        k = mtype.replace(".", "__").replace("*", "N")  # a ParameterDict key
        if k not in self.A:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as LoRA initialises A
            self.A[k] = nn.Parameter(torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator))
            self.B[k] = nn.Parameter(torch.zeros(fan_out, rank))  # B = 0: the update starts at zero, as LoRA
        if tuple(self.A[k].shape) != (rank, fan_in) or self.B[k].shape[0] != fan_out:
            raise ValueError(f"Tied-LoRA: modules of type {mtype} differ in shape; tie them by name instead")
        return k


class TiedLoRALinear(nn.Module):
    """Holds the frozen base Linear; A/B come from the shared root module (not registered here)."""

    _shared: TiedShared  # set with object.__setattr__: not a submodule

    def __init__(self, base: nn.Linear, shared: TiedShared, key: str, rank: int, dropout: float):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_shared", shared)  # plain attribute: keeps A/B out of this module's state_dict
        self.key = key
        self.u = nn.Parameter(torch.ones(rank))  # (r,)
        self.v = nn.Parameter(torch.ones(base.out_features))  # (out,)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self._shared.A[self.key], self._shared.B[self.key]  # (r, in), (out, r)
        z = (self.dropout(x).to(A.dtype) @ A.T) * self.u  # (..., r)
        return self.base(x) + ((z @ B.T) * self.v).to(x.dtype)  # (..., out)


def add_tied_lora(
    model: nn.Module,
    target_names: list[str],
    rank: int = 8,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    seed: int = 0,
) -> nn.Module:
    """Wrap `target_names` (qualified nn.Linear names) in place; freeze everything else but the heads."""
    g = torch.Generator().manual_seed(seed)
    shared = TiedShared()
    model.requires_grad_(False)
    for name in target_names:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"Tied-LoRA supports nn.Linear targets; {name} is {type(mod).__name__}")
        key = shared.get(layer_pattern(name), rank, mod.in_features, mod.out_features, g)
        model.set_submodule(name, TiedLoRALinear(mod, shared, key, rank, dropout))
    model.add_module(ROOT_ATTR, shared)
    shared.to(next(model.parameters()).device)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    return model
