"""`VBLoRAConfig`: every knob of the method, with the paper's defaults and the reason for each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from vblora.errors import ConfigError

SELECTIONS = ("topk", "all", "noisy_topk", "gumbel", "st_gumbel")


@dataclass(frozen=True)
class VBLoRAConfig:
    """Configuration of a VB-LoRA adapter (Li, Han, Ji, NeurIPS 2024).

    target_modules: which modules to adapt. A list of names or dotted name suffixes (``["query", "value"]``
        matches ``...attention.self.query``), a regex string matched against the full qualified name, or
        ``"all-linear"``: every Linear / GPT-2 Conv1D inside the repeated transformer blocks (names with a layer
        index), so embeddings, the pooler and the output / classifier head are left alone, as in the paper.
    rank: LoRA rank r of every adapted module (paper: 4 for GLUE/E2E/math, 4-6 for Llama-2).
    num_vectors: bank size h. The paper uses 90 (RoBERTa-base), 256 (GPT-2 medium), 2048 (7B-13B models).
    vector_length: sub-vector length b (paper: 256). A b that does not divide a module's dimension is allowed:
        the last sub-vector of each row/column is composed in full and its excess entries are dropped (HF PEFT
        raises instead), so b=256 works on MiniLM's hidden size 384.
    topk: k, the number of bank vectors mixed into each sub-vector during training (paper: 2).
    dropout: dropout on the adapter's input, as in LoRA.
    init_bank_bound: bank ~ U(-bound, bound) (paper Table 7: U(-0.02, 0.02)).
    init_logits_std: logits ~ N(0, std^2). We read the paper's "N(0, 0.01)" as std 0.01; HF PEFT's default is 0.1.
    selection: training-time selection rule (paper Table 5): "topk" (default), "all" (softmax over the whole
        bank), "noisy_topk" (Gaussian noise of std `noise_std` added to the logits before top-k, training only),
        "gumbel" (Gumbel-softmax with `temperature` over the whole bank), "st_gumbel" (straight-through: hard
        one-hot forward, soft gradient).
    noise_std: noise scale for "noisy_topk".
    temperature: tau for "gumbel" / "st_gumbel" (paper: 1/3).
    eval_topk: k used at evaluation and in stored adapters; defaults to `topk` (so the Gumbel variants can be
        evaluated with top-1 or top-2 softmax, as Table 5 does). With selection="all" it is forced to h.
    layers: optional layer indices to adapt (the first integer in a module's qualified name); None adapts all.
    modules_to_save: names/suffixes of modules trained in full (e.g. a classifier head), stored with the adapter.
    seed: seed of the bank and logits initialisation (independent of the global RNG).
    """

    target_modules: str | Sequence[str] = "all-linear"
    rank: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    dropout: float = 0.0
    init_bank_bound: float = 0.02
    init_logits_std: float = 0.01
    selection: str = "topk"
    noise_std: float = 1.0
    temperature: float = 1.0 / 3.0
    eval_topk: int | None = None
    layers: Sequence[int] | None = None
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    seed: int = 0

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
            bad(f"topk={self.topk} > num_vectors={self.num_vectors}: cannot select more vectors than the bank holds; "
                f"lower topk or raise num_vectors")
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
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VBLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"VBLoRAConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "VBLoRAConfig":
        return dataclasses.replace(self, **changes)
