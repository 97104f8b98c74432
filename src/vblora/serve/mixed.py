"""Mixed-adapter forward passes: every row (or token) of a batch applies its own adapter, or none.

The store wraps each adapted module of the base model once with a `MixedLayer` (base layer held as `self.base`) and
each `modules_to_save` head with a `MixedHead`. A `Plan` (which adapter each unit uses, their composed factors) is
made current by `AdapterStore.rows(...)` / `.tokens(...)` through the shared `Router`; outside a plan the wrappers
return exactly the base output.

Per layer: the base output is computed once for the whole batch, then each group of units adds `x A^T B^T` (A
`(r, in)`, B `(out, r)`, the single-adapter layer's update, scale 1) with `index_add_`, so units without an adapter
keep the base output bit for bit. Grouping (made once per plan and layer, then reused by every forward in the plan,
e.g. each step of `generate`), so that the number of kernel launches follows distinct adapters (ranks), not rows:
- one adapter in the group: two `F.linear` over its units (the single-adapter layer's own ops);
- several adapters, few units each (decoding: one row per request): each unit's factors stacked for this layer
  (`torch.stack` of views, a transient of one layer's factors for the batch), then two `torch.bmm` for all of them
  (`gather`);
- several adapters with many units each (packed prefill in `tokens` mode): two `F.linear` per adapter (`loop`).
Adapters of different ranks form separate groups. Embedding layers always use `loop` (ids, not activations).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vblora.errors import VBLoRAError
from vblora.layout import kind_of

ROWS, TOKENS = "rows", "tokens"
SINGLE, GATHER, LOOP = "single", "gather", "loop"
GATHER_MAX_UNITS = 4  # gather while a group has at most this many units per distinct adapter, else loop


class Router:
    """The plan in force for the forwards of the current thread (a stack: plans may nest)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __reduce__(self):
        # A copied or pickled served model gets a router of its own, with no plan: it computes the base model.
        return Router, ()

    def current(self) -> Plan | None:
        stack = getattr(self.local, "stack", None)
        return stack[-1] if stack else None

    @contextlib.contextmanager
    def use(self, plan: Plan):
        stack = self.local.__dict__.setdefault("stack", [])
        stack.append(plan)
        try:
            yield plan
        finally:
            stack.pop()


@dataclass
class Group:
    """Units of one layer sharing a rank. index: `(n,)` unit indices, or None for every unit of the batch."""

    mode: str
    index: torch.Tensor | None
    A: torch.Tensor | list | None = None  # SINGLE: (r, in); GATHER: n views (r, in), one per unit
    B: torch.Tensor | list | None = None  # SINGLE: (out, r); GATHER: n views (out, r)
    parts: list | None = None  # LOOP: [(index (n_a,), A (r, in), B (out, r))] per adapter


def update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, embedding: bool) -> torch.Tensor:
    """`x A^T B^T` for one adapter: x `(n, L, in)` activations (or `(n, L)` ids) -> `(n, L, out)`, never forming dW."""
    if embedding:
        return F.embedding(x, A.T) @ B.T
    return F.linear(F.linear(x.to(A.dtype), A), B)


def apply_group(g: Group, x: torch.Tensor, out: torch.Tensor, embedding: bool) -> None:
    """Add the group's updates into `out (units, L, out)` in place; `x (units, L, in)` (or ids `(units, L)`)."""
    if g.mode == LOOP:
        for index, A, B in g.parts or ():
            out.index_add_(0, index, update(x.index_select(0, index), A, B, embedding).to(out.dtype))
        return
    xs = x if g.index is None else x.index_select(0, g.index)
    if g.mode == SINGLE:
        d = update(xs, cast(torch.Tensor, g.A), cast(torch.Tensor, g.B), embedding)
    else:  # GATHER: (n, L, in) @ (n, in, r) -> (n, L, r) @ (n, r, out) -> (n, L, out)
        # Stacked here, per forward: kept per plan, the stacks would be a second copy of the batch's compositions
        # (measured: 39 MB for 8 SmolLM2 adapters), outside the cache's cap; the copy costs a few ms per step.
        A, B = torch.stack(cast(list, g.A)), torch.stack(cast(list, g.B))  # (n, r, in), (n, out, r)
        d = torch.bmm(torch.bmm(xs.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2))
    if g.index is None:
        out.add_(d.to(out.dtype))
    else:
        out.index_add_(0, g.index, d.to(out.dtype))


class Plan:
    """Which adapter each unit (row, or token of a packed `(1, T)` batch) applies, with the composed factors of
    every distinct adapter, and the per-layer grouping (built on first use, kept for the plan's lifetime).

    units: one loaded adapter or None per unit; factors: {adapter: {module name: (A, B)}}. `generate` with
    `num_return_sequences` / `num_beams` m expands each row into m consecutive rows: a batch of m * len(units) rows
    gives each row its request's adapter.
    """

    def __init__(
        self,
        units: list,
        factors: dict,
        axis: str = ROWS,
        device: torch.device | None = None,
        strategy: str | None = None,
    ) -> None:
        if axis not in (ROWS, TOKENS):
            raise ValueError(f"axis={axis!r}")
        self.units, self.factors, self.axis, self.strategy = list(units), factors, axis, strategy
        self.device = device or torch.device("cpu")
        self.layers: dict[tuple, list[Group]] = {}
        self.head_groups: dict[tuple, list] = {}

    def unit_count(self, x: torch.Tensor) -> int:
        """Units in a layer's input: rows (dim 0), or tokens (dim 1 of a batch of one)."""
        if self.axis == ROWS:
            return x.shape[0]
        if x.dim() < 2 or x.shape[0] != 1:
            raise VBLoRAError(
                f"store.tokens(...) expects packed inputs of batch size 1, shaped (1, T, ...); got "
                f"{tuple(x.shape)} (use store.rows(...) for one adapter per row)"
            )
        return x.shape[1]

    def repeat(self, n: int) -> int:
        u = len(self.units)
        if u == 0 or n % u:
            what = "rows" if self.axis == ROWS else "tokens"
            raise VBLoRAError(
                f"the batch has {n} {what} but store.{self.axis}(...) was given {u} adapter entries; "
                f"give one entry (a handle or None) per {what[:-1]}"
            )
        return n // u

    def unit_lists(self, n: int, pick) -> list[tuple[Any, list[int]]]:
        """[(value, unit indices in the batch)] grouped by `pick(adapter)` (None values skipped), in first-seen
        order; unit u of the plan covers batch units u*m .. u*m+m-1."""
        m = self.repeat(n)
        groups: dict[int, tuple[Any, list[int]]] = {}
        for u, adapter in enumerate(self.units):
            value = pick(adapter) if adapter is not None else None
            if value is not None:
                groups.setdefault(id(adapter), (value, []))[1].extend(range(u * m, u * m + m))
        return list(groups.values())

    def index(self, units: list[int], n: int) -> torch.Tensor | None:
        return None if len(units) == n else torch.tensor(units, dtype=torch.long, device=self.device)

    def layer_groups(self, name: str, n: int, embedding: bool) -> list[Group]:
        if (name, n) not in self.layers:
            self.layers[name, n] = self.build_groups(name, n, embedding)
        return self.layers[name, n]

    def build_groups(self, name: str, n: int, embedding: bool) -> list[Group]:
        per_adapter = self.unit_lists(n, lambda a: self.factors[a].get(name))  # [((A, B), units)]
        by_rank: dict[int, list] = {}
        for (A, B), units in per_adapter:
            by_rank.setdefault(A.shape[0], []).append((A, B, units))
        groups = []
        for items in by_rank.values():
            units = sorted(u for _, _, us in items for u in us)
            if len(items) == 1:
                A, B, _ = items[0]
                groups.append(Group(SINGLE, self.index(units, n), A, B))
                continue
            mode = self.strategy or (GATHER if len(units) <= GATHER_MAX_UNITS * len(items) else LOOP)
            if mode == GATHER and not embedding:
                owner = {u: (A, B) for A, B, us in items for u in us}
                groups.append(
                    Group(GATHER, self.index(units, n), [owner[u][0] for u in units], [owner[u][1] for u in units])
                )
            else:
                parts = [(torch.tensor(us, dtype=torch.long, device=self.device), A, B) for A, B, us in items]
                groups.append(Group(LOOP, None, parts=parts))
        return groups

    def heads(self, name: str, n: int) -> list[tuple[torch.Tensor, dict]]:
        """[(unit indices, head state)] of the adapters carrying head `name`."""
        if (name, n) not in self.head_groups:
            self.head_groups[name, n] = [
                (torch.tensor(us, dtype=torch.long, device=self.device), state)
                for state, us in self.unit_lists(n, lambda a: a.heads.get(name))
            ]
        return self.head_groups[name, n]


class Wrapper(nn.Module):
    """A module of the served base model held as `self.base`, named `name`, reading plans from the shared router.
    Attribute reads fall through to the wrapped module (`layer.weight`, `head.out_proj`, ...)."""

    def __init__(self, base: nn.Module, name: str, router: Router) -> None:
        super().__init__()
        self.base, self.name = base, name
        object.__setattr__(self, "router", router)  # shared by every wrapper; not a submodule

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def extra_repr(self) -> str:
        return f"name={self.name}"


class MixedLayer(Wrapper):
    """An adapted module of the served base model: `base(x)` plus, per unit, its adapter's `x A^T B^T`."""

    def __init__(self, base: nn.Module, name: str, router: Router) -> None:
        kind = kind_of(base)
        if kind is None:
            raise VBLoRAError(f"module {name} ({type(base).__name__}) cannot carry an adapter")
        super().__init__(base, name, router)
        self.embedding = kind.name == "embedding"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        plan = self.router.current()
        if plan is None:
            return out
        n = plan.unit_count(x)
        groups = plan.layer_groups(self.name, n, self.embedding)
        if not groups:
            return out
        out = out.contiguous()
        xu = x.reshape(n, -1) if self.embedding else x.reshape(n, -1, x.shape[-1])  # (units, L[, in])
        ou = out.view(n, -1, out.shape[-1])  # (units, L, out), a view: updates land in `out`
        for g in groups:
            apply_group(g, xu, ou, self.embedding)
        return out


class MixedHead(Wrapper):
    """A `modules_to_save` head (e.g. a classifier): units whose adapter carries a trained copy of it run that copy
    (the base module called with the adapter's state), the others the base module."""

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)  # called as the module it wraps is called, whatever its signature
        plan = self.router.current()
        if plan is None:
            return out
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):  # units cannot be told apart: fail the batch using this head only
            if any(a is not None and self.name in a.heads for a in plan.units):
                raise VBLoRAError(
                    f"head {self.name} was called without a tensor input; its trained copies cannot be "
                    f"applied per {plan.axis[:-1]}"
                )
            return out
        n = plan.unit_count(x)
        args = args[1:]
        parts = plan.heads(self.name, n)
        if not parts:
            return out
        dim = 0 if plan.axis == ROWS else 1
        out = out.clone()
        for index, state in parts:
            own = functional_call(self.base, state, (x.index_select(dim, index), *args), kwargs)
            out.index_copy_(dim, index, own.to(out.dtype))
        return out
