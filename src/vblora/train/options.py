"""One run's settings: a flat dataclass, filled from a recipe (YAML shipped in `vblora/recipes/`) then CLI flags.

Fields default to the paper's values where it has one; `vblora train` with no arguments loads the `minilm-vader` recipe
on top (which, for example, raises the bank learning rate to 5e-3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vblora.train.errors import SetupError

METHODS = ("vblora", "lora", "vera", "tied-lora", "full")
TASKS = ("classification", "regression", "causal-lm", "gsm8k")


@dataclass
class RunConfig:
    # --- what to train ---
    recipe: str = "minilm-vader"
    model: str = "minilm"          # local path, or the offline aliases "minilm" / "smollm2"
    gguf_file: str | None = None   # GGUF weights inside `model` (dequantised to fp32 on load)
    task: str = "classification"   # classification|regression (auto from labels)|causal-lm|gsm8k
    method: str = "vblora"
    # --- data: the built-in VADER split, or the user's files ---
    dataset: str | None = "vader-movie"  # vader-movie | vader-movie-instruct | None (use the files below)
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    data_format: str | None = None  # csv|tsv|jsonl|json; default from the file suffix
    glue_task: str | None = None    # sst2|cola|mrpc|qnli|rte|stsb|qqp|mnli: GLUE TSV column layout
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None   # caps the validation split
    max_test_samples: int | None = None   # caps the test split
    max_length: int = 64           # tokens; batches are padded dynamically to their longest sequence
    group_by_length: bool = True   # batches of similar length (less padding; vblora/train/sampling.py)
    # --- adapter ---
    target_modules: list[str] | str = "all-linear"  # names, "all-linear" (linear layers of the blocks), or regex
    rank: int = 4
    num_vectors: int = 90          # VB-LoRA bank size h
    vector_length: int = 128       # VB-LoRA b (MiniLM's 384 is not a multiple of the paper's 256)
    topk: int = 2
    selection: str = "topk"        # VB-LoRA selection rule (paper Table 5): topk|all|noisy_topk|gumbel|st_gumbel
    noise_std: float = 1.0         # noisy_topk noise
    temperature: float = 1.0 / 3.0  # gumbel / st_gumbel tau
    eval_topk: int | None = None   # k at evaluation and in the stored adapter (default topk)
    bank: str | None = None        # start from this trained bank: a bank.safetensors (vblora.save_bank) or an adapter
    freeze_bank: bool = False      # with --bank: train only logits and head; the adapter references the bank by hash
    record_selection_every: int | None = None  # record top-k selections every N steps (vblora plot RUN_DIR)
    lora_alpha: float = 8.0
    dropout: float = 0.0
    vera_rank: int = 256
    tied_rank: int = 8
    modules_to_save: list[str] | None = None  # default: the task head (classifier/score) if any
    # --- optimisation (paper Table 7: AdamW, linear schedule, warm-up ratio 0.06) ---
    epochs: float = 2.0
    batch_size: int = 32           # per process
    eval_batch_size: int = 128
    grad_accum: int = 1
    lr_bank: float = 1e-3          # VB-LoRA vector bank (the paper's; the minilm-vader recipe uses 5e-3)
    lr_logits: float = 1e-2        # VB-LoRA selection logits
    lr_head: float = 4e-3          # classifier head (modules_to_save) for every adapter method
    lr: float | None = None        # LoRA/VeRA/Tied-LoRA/full adapter learning rate; default per method below
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    # --- machinery ---
    output: str = "runs/vblora-train"
    device: str = "auto"           # auto|cpu|cuda
    bf16: bool = False
    fp16: bool = False             # CUDA only
    save_steps: int | None = None  # checkpoint every N steps as well as at each epoch end
    resume: bool = False
    overwrite: bool = False
    logging_steps: int = 50
    num_samples: int = 8           # greedy generations written to samples.jsonl (LM tasks)
    max_new_tokens: int = 32
    generate_eval: int | None = None  # LM tasks: score greedy answers on this many test examples
    extra: dict = field(default_factory=dict)

    def method_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Adapter learning rates of the baselines when the recipe does not set `lr` (common values from their papers:
# LoRA 5e-4 (RoBERTa-base GLUE), VeRA 4e-3-1e-2 for its scaling vectors, full fine-tuning 5e-5 for a small encoder).
DEFAULT_LR = {"vblora": 1e-3, "lora": 5e-4, "vera": 4e-3, "tied-lora": 1e-3, "full": 5e-5}


def recipe_names() -> list[str]:
    files = resources.files("vblora.recipes")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (shipped) or path (user's YAML); returns its key -> value mapping."""
    import yaml

    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        text = p.read_text()
    else:
        f = resources.files("vblora.recipes") / f"{name_or_path}.yaml"
        if not f.is_file():
            raise SetupError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(recipe_names())}; or a .yaml path)")
        text = f.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SetupError(f"recipe {name_or_path}: expected a mapping of settings")
    data.pop("description", None)
    data.pop("notes", None)
    return data


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value):
    """YAML reads '1e-3' as a string and CLI/--set values arrive as text: convert to the field's type."""
    typ = _FIELD_TYPES.get(name, "")
    if isinstance(value, str) and value.lower() in ("none", "null") and "None" in typ:
        return None
    try:
        if typ.startswith("float") and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if typ.startswith("int") and isinstance(value, str):
            return int(value)
        if typ.startswith("bool") and isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise SetupError(f"setting '{name}': cannot read '{value}' as {typ.split(' ')[0]}") from None
    return value


def build_config(recipe: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults <- recipe <- overrides (None values in overrides mean 'not given')."""
    values: dict = {}
    name = recipe or "minilm-vader"
    recipe_values = load_recipe(name)
    per_task = recipe_values.pop("per_task", None) or {}
    values.update(recipe_values)
    values["recipe"] = name
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    if per_task:  # e.g. GLUE recipes: epochs / head learning rate per task (paper Table 7)
        task = values.get("glue_task")
        if task not in per_task:
            raise SetupError(f"recipe {name} needs --glue-task, one of {', '.join(per_task)}")
        for k, v in per_task[task].items():
            if (overrides or {}).get(k) is None:
                values[k] = v
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SetupError(f"unknown setting(s) {unknown} in recipe {name}")
    if values.get("train_file") and (overrides or {}).get("dataset") is None:
        values["dataset"] = None  # the user's files replace the built-in data
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    if cfg.method not in METHODS:
        raise SetupError(f"unknown method '{cfg.method}' (one of {', '.join(METHODS)})")
    if cfg.task not in TASKS:
        raise SetupError(f"unknown task '{cfg.task}' (one of {', '.join(TASKS)})")
    if cfg.dataset is None and not cfg.train_file:
        raise SetupError("no data: give --train-file (and --validation-file/--test-file) or a dataset")
    return cfg
