"""A served adapter in memory: its stored triplet (indices, mixing weights, a reference to an interned bank) and
its heads, read and verified from a `Source`, and composed on demand into per-module factors A `(r, in)`, B
`(out, r)` in the compute dtype (what the store's byte-bounded cache holds).

Loading verifies like `vblora.load_adapter`: the damage-proof reader and every header / tensor / digest check of
the native format (`vblora.storage.native.read_adapter`), PEFT's directory checks (`read_peft`), then the base model
check: architecture, each adapted module's kind and shape, the base weight sample where the file carries one, the
heads' shapes. Composition is the stored rule, exactly as a single-adapter model composes it.

`verified(source, model, modules)` is the one path from a source to a checked snapshot (the store's loads, and any
other server's, e.g. a vLLM resolver: `verified(find(directory, name), model, dict(model.named_modules()))`). Heads
are checked to be heads before anyone wraps them: not the model itself, not a container without a forward, not
holding or inside an adapted module (a crafted `modules_to_save` naming `model` or `""` is refused here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vblora.bank import compose_selected
from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError
from vblora.layout import Layout, index_dtype
from vblora.serve.sources import NATIVE, Source, bank_candidates
from vblora.storage.encoding import complete_weights
from vblora.storage.native import bank_sha256, read_adapter
from vblora.storage.peft_vblora import read_peft
from vblora.storage.snapshot import AdapterSnapshot, described, shape_problems, weight_problems

MAX_MESSAGE = 4  # problems named in one message

Factors = dict  # module name -> (A (r, in), B (out, r)) in the compute dtype


@dataclass(eq=False)  # identity semantics: a loaded adapter is a key of the composed cache
class LoadedAdapter:
    """indices `(N, k)` in the narrowest integer type, weights `(N, k)` float32 or only their first k-1 columns
    (`partial`, when the last is exactly 1 - sum, as native files store it), bank `(h, b)` shared by every adapter
    with the same content hash, heads {model module name: state dict in the model's dtype}."""

    source: Source
    config: VBLoRAConfig
    layout: Layout
    bank: torch.Tensor
    bank_sha256: str
    indices: torch.Tensor
    weights: torch.Tensor
    partial: bool
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    removed: bool = False  # unregistered: handles still work, its compositions are no longer cached

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def resident_bytes(self) -> int:
        """Bytes this adapter holds alone (the bank is counted once per hash by the store)."""
        tensors = [self.indices, self.weights, *(t for s in self.heads.values() for t in s.values())]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def compose(self, dtype: torch.dtype, device: torch.device) -> Factors:
        """Every module's `(A (r, in), B (out, r))` by the stored rule (top-k softmax weights over the bank), as the
        single-adapter layers compose them (`compose_selected` in float32, cast to `dtype`; row by row, so module by
        module gives the same values). All factors are contiguous views of ONE buffer, composed into it module by
        module: one large allocation per composition and only small temporaries, so caching and evicting thousands
        of compositions does not fragment the heap."""
        weights = (complete_weights(self.weights).clamp_(min=0) if self.partial else self.weights).to(self.bank.device)
        indices = self.indices.to(device=self.bank.device, dtype=torch.long)
        r = self.layout.rank
        sizes = [n for e in self.layout.entries for n in (r * e.in_features, e.out_features * r)]  # A, B per module
        pieces = iter(torch.empty(sum(sizes), dtype=dtype, device=device).split(sizes))
        factors = {}
        for e in self.layout.entries:
            s = e.slot
            rows = compose_selected(indices[s.a_start : s.stop], weights[s.a_start : s.stop], self.bank)  # (rows, b)
            rows = rows.to(device=device, dtype=dtype)
            A, B = next(pieces).view(r, e.in_features), next(pieces).view(e.out_features, r)
            A.copy_(self.layout.A(rows[: s.a_count], e))
            B.copy_(self.layout.B(rows[s.a_count :], e))
            factors[e.name] = (A, B)
        return factors


def factor_bytes(factors: Factors) -> int:
    """Bytes of a composition (its factors' total; they share one buffer of exactly that size)."""
    return sum(t.numel() * t.element_size() for pair in factors.values() for t in pair)


def read_snapshot(source: Source, banks: dict, module_order: list[str]) -> AdapterSnapshot:
    """Read and verify the adapter's tensors (AdapterFormatError / FileNotFoundError on any defect)."""
    if source.error is not None:
        raise AdapterFormatError(source.error)
    if source.format != NATIVE:
        return read_peft(source.path, module_order)
    if source.bank_sha256 is None:
        return read_adapter(source.path)[0]
    candidates = bank_candidates(source, banks)
    if not candidates:
        raise AdapterFormatError(
            f"{source.path}: adapter '{source.name}' references a shared bank (sha256 "
            f"{source.bank_sha256}) that is not in the adapter directory: put the bank file "
            f"written by vblora.save_bank (bank.safetensors) beside it or in the store's "
            f"directory"
        )
    return read_adapter(source.path, bank_path=candidates[0])[0]


def check_fits(snap: AdapterSnapshot, model: nn.Module, bases: dict[str, nn.Module | None], source: Source) -> None:
    """AdapterFormatError naming what differs if the adapter was not made for this base model. `bases`: the base
    layer at each of the adapter's module names (unwrapped), None where the model has no such module."""
    where = f"adapter '{source.name}' ({source.path})"
    arch = type(model).__name__
    problems = []
    if snap.architecture and snap.architecture != arch:
        problems.append(f"it was saved from {snap.architecture}, the served base model is {arch}")
    have = {name: described(base) for name, base in bases.items()}
    problems += [
        f"module {name} is missing from the base model or cannot be adapted" for name, d in have.items() if d is None
    ]
    problems += shape_problems(snap, {name: d for name, d in have.items() if d is not None})
    if not problems and snap.weight_sample:
        problems += weight_problems({n: b for n, b in bases.items() if b is not None}, snap)
    if problems:
        raise AdapterFormatError(f"{where} does not fit the served base model: " + "; ".join(problems[:MAX_MESSAGE]))


def verified(
    source: Source, model: nn.Module, modules: dict[str, nn.Module], banks: dict | None = None
) -> tuple[AdapterSnapshot, dict[str, dict]]:
    """`(snapshot, head states)` of `source`, read and verified: the file's own checks, the fit to `model` (kind and
    shape of each adapted module, the base weight sample), its heads being real heads of `model` whose states fit.
    `modules`: `model`'s modules by name as the base model has them (no serving wrappers); `banks`: {sha256: bank
    file} of a directory (`discover`), for adapters referencing a shared bank. Head states are keyed by the model's
    module names. AdapterFormatError / FileNotFoundError naming the adapter on any defect; nothing is changed."""
    try:
        snap = read_snapshot(source, dict(banks or {}), list(modules))
        check_fits(snap, model, {m.name: modules.get(m.name) for m in snap.modules}, source)
        return snap, head_states(snap, head_targets(snap, modules, source), source)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"adapter '{source.name}': {e}") from None
    except AdapterFormatError as e:
        text = str(e)
        raise AdapterFormatError(text if source.name in text else f"adapter '{source.name}': {text}") from None


def head_name(head: str, names) -> str | None:
    """The model's module for a `modules_to_save` name: exact, else the outermost with that dotted suffix (PEFT
    saves the names its task type may use, e.g. "classifier"); never the model itself (name "")."""
    if not head:
        return None
    if head in names:
        return head
    found = [n for n in names if n.endswith("." + head)]
    return min(found, key=len) if found else None


def nested(a: str, b: str) -> bool:
    """Whether module `a` is `b` or inside it, or `b` inside `a` (dotted names)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def head_targets(
    snap: AdapterSnapshot, modules: dict[str, nn.Module], source: Source
) -> dict[str, tuple[str, nn.Module]]:
    """The adapter's head name -> (the model's module name, that module) for each `modules_to_save` entry.
    AdapterFormatError unless each is a real head: a named module of the model (not the model itself) with a forward
    of its own (not a ModuleList / ModuleDict), neither holding nor inside one of the adapter's adapted modules or
    another of its heads."""
    out: dict[str, tuple[str, nn.Module]] = {}
    problems: list[str] = []
    adapted = [m.name for m in snap.modules]
    for head in snap.extras:
        name = head_name(head, modules)
        if name is None:
            problems.append(
                f"modules_to_save entry {head or '(empty name)'} matches no module of the base model"
                + (" (the model itself cannot be one)" if not head else "")
            )
            continue
        module = modules[name]
        if type(module).forward is nn.Module.forward:
            problems.append(f"modules_to_save entry {head}: {type(module).__name__} {name} is a container, not a head")
        elif any(nested(name, a) for a in adapted):
            problems.append(
                f"modules_to_save entry {head}: module {name} holds or is an adapted module, so it is no head"
            )
        elif any(nested(name, other) for other, _ in out.values()):
            problems.append(f"modules_to_save entry {head}: module {name} overlaps another head")
        else:
            out[head] = (name, module)
    if problems:
        raise AdapterFormatError(f"adapter '{source.name}': " + "; ".join(problems[:MAX_MESSAGE]))
    return out


def head_states(snap: AdapterSnapshot, heads: dict[str, tuple[str, nn.Module]], source: Source) -> dict[str, dict]:
    """The adapter's `modules_to_save` states keyed by the model's module names, cast to each head's dtype and
    device. `heads`: the adapter's head name -> (the model's module name, that module, unwrapped).
    AdapterFormatError if a state does not fit its head (e.g. another num_labels)."""
    out = {}
    for name, state in snap.extras.items():
        if name not in heads:
            raise AdapterFormatError(
                f"adapter '{source.name}': modules_to_save entry {name} matches no module of the base model"
            )
        model_name, head = heads[name]
        own = head.state_dict()
        got, want = ({k: tuple(v.shape) for k, v in d.items()} for d in (state, own))
        if got != want:  # other parameter names or shapes
            raise AdapterFormatError(
                f"adapter '{source.name}': its {name} head {got} does not fit the base model's {want} (another "
                f"num_labels? build the base model with the adapter's num_labels)"
            )
        out[model_name] = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in state.items()}
    return out


def layout_key(layout: Layout) -> tuple:
    """What makes two layouts equal (their module rows, rank and vector length): the store keeps one per key."""
    return tuple(tuple(e.to_row()) for e in layout.entries), layout.rank, layout.vector_length


def load(
    source: Source, snap: AdapterSnapshot, intern_bank, heads: dict[str, dict], intern_layout=lambda layout: layout
) -> LoadedAdapter:
    """The resident form of a verified snapshot. `intern_bank(sha256, bank) -> bank` returns the one tensor the
    store holds for that content; `intern_layout(layout) -> layout` the one equal layout it holds (a layout of a
    few hundred modules is ~100 KB of Python objects: as much as an adapter's tensors)."""
    bank = snap.bank.float()
    digest = bank_sha256(bank)
    cfg = snap.config
    indices = snap.indices.to(index_dtype(cfg.num_vectors))
    partial = snap.weights[:, :-1].contiguous().float()  # (N, k - 1)
    exact = torch.equal(complete_weights(partial).clamp_(min=0), snap.weights.float())
    weights = partial if exact else snap.weights.float().contiguous()
    return LoadedAdapter(
        source, cfg, intern_layout(snap.layout), intern_bank(digest, bank), digest, indices, weights, exact, heads
    )


def compacted(adapter: LoadedAdapter) -> LoadedAdapter:
    """The same adapter with its resident tensors copied afresh, once reading is over, so that the allocator may
    place them in the memory reading's temporaries (file bytes, int64 indices, digests) just freed rather than
    between those temporaries. (Not measured on its own; the layout interning is what cut resident memory.)"""
    adapter.indices, adapter.weights = adapter.indices.clone(), adapter.weights.clone()
    return adapter
