"""`VBLoRAConfig`: every knob of the method, with the paper's defaults and the reason for each."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vblora.errors import ConfigError

SELECTIONS = ("topk", "all", "noisy_topk", "gumbel", "st_gumbel")


def knob(default: Any, help: str) -> Any:
    """A dataclass field with its one description (`metadata["help"]`, which CLI flags show)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class VBLoRAConfig:
    """Configuration of a VB-LoRA adapter (Li, Han, Ji, NeurIPS 2024).

    Every field is documented once, in its `help` metadata (what `vblora train --help` shows). Notes:
    a vector_length that does not divide a module's dimension is allowed (the last sub-vector of each row/column
    is composed in full and its excess entries dropped; HF PEFT raises), so b=256 works on MiniLM's hidden 384.
    We read the paper's "N(0, 0.01)" for the logits as std 0.01. "all-linear" leaves embeddings, the pooler and
    the output / classifier head alone, as in the paper.

    The constructor's arguments are the fields, each described by its `help` metadata (the API reference's table
    of fields is generated from it). List-valued fields are stored as tuples, so a config is hashable.

    Raises:
        ConfigError: a field is out of range or inconsistent with another (e.g. topk > num_vectors), naming the
            field and the fix.
    """

    target_modules: str | Sequence[str] = knob(
        "all-linear",
        "modules to adapt: names or dotted suffixes (query value), one regex matched against the full "
        "name, or all-linear (every Linear / GPT-2 Conv1D inside the repeated blocks)",
    )
    rank: int = knob(4, "LoRA rank r of every adapted module (paper: 4 for GLUE/E2E/math, 4-6 for Llama-2)")
    num_vectors: int = knob(256, "bank size h (paper: 90 RoBERTa-base, 256 GPT-2 medium, 2048 for 7B-13B models)")
    vector_length: int = knob(256, "sub-vector length b (paper: 256); need not divide the module dimensions")
    topk: int = knob(2, "k: bank vectors mixed into each sub-vector during training (paper: 2)")
    dropout: float = knob(0.0, "dropout on the adapter's input, as in LoRA")
    init_bank_bound: float = knob(0.02, "bank ~ U(-bound, bound) at initialisation (paper Table 7: 0.02)")
    init_logits_std: float = knob(0.01, "logits ~ N(0, std^2) at initialisation (paper: 0.01; HF PEFT: 0.1)")
    selection: str = knob(
        "topk", "training-time selection rule (paper Table 5): topk | all | noisy_topk | gumbel | st_gumbel"
    )
    noise_std: float = knob(1.0, "std of the Gaussian noise noisy_topk adds to the logits")
    temperature: float = knob(1.0 / 3.0, "tau of gumbel / st_gumbel (paper: 1/3)")
    eval_topk: int | None = knob(None, "k at evaluation and in the stored adapter (default: topk; h for selection=all)")
    layers: Sequence[int] | None = knob(
        None, "adapt only modules of these layer indices (the first integer in the qualified name); default: all"
    )
    modules_to_save: Sequence[str] = knob(
        (), "modules trained in full and stored with the adapter (e.g. a classifier head)"
    )
    seed: int = knob(0, "seed of the bank and logits initialisation (independent of the global RNG)")

    def __post_init__(self) -> None:
        # Freeze list-valued fields so the config is hashable and cannot be mutated behind our back.
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(i) for i in self.layers)
            object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"VBLoRAConfig: {msg}")

        for name in ("rank", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be an integer >= 1, got {value!r}")
        if self.topk > self.num_vectors:
            bad(
                f"topk={self.topk} > num_vectors={self.num_vectors}: cannot select more vectors than the bank holds; "
                f"lower topk or raise num_vectors"
            )
        if self.eval_topk is not None and not (1 <= self.eval_topk <= self.num_vectors):
            bad(f"eval_topk={self.eval_topk} must be in [1, num_vectors={self.num_vectors}]")
        if self.selection not in SELECTIONS:
            bad(f"selection={self.selection!r}; choose one of {SELECTIONS}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout={self.dropout} must be in [0, 1)")
        if self.temperature <= 0 or self.noise_std < 0:
            bad(f"temperature must be > 0 and noise_std >= 0 (got {self.temperature}, {self.noise_std})")
        if self.init_bank_bound < 0 or self.init_logits_std < 0:
            bad("init_bank_bound and init_logits_std must be >= 0")
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            bad("target_modules is empty; give module names, a regex, or 'all-linear'")

    @property
    def stored_topk(self) -> int:
        """k of the stored adapter and of evaluation: h for select-all, else eval_topk (default topk)."""
        if self.selection == "all":
            return self.num_vectors
        return self.eval_topk if self.eval_topk is not None else self.topk

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, tuples as lists (JSON-ready; `from_dict` reads it back)."""
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VBLoRAConfig:
        """A config from `to_dict()`'s output (or a recipe's keys).

        Args:
            d: field name -> value.

        Returns:
            The config.

        Raises:
            ConfigError: an unknown field name, or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"VBLoRAConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> VBLoRAConfig:
        """A copy with `changes` applied (validated like a new config; raises ConfigError on a bad value)."""
        return dataclasses.replace(self, **changes)
