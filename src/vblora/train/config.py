"""One run's settings: `RunConfig`, which holds the method's `VBLoRAConfig`, and the recipes that fill it.

Every setting has one default and one help text (its field's `metadata`). `vblora train` flags and recipe keys are
derived from the fields of both dataclasses (`setting_fields()`), so `--help` shows what a run without a recipe does.
Those defaults ARE the offline default task (MiniLM-L6 on the VADER movie snippets; recipes/minilm-vader.yaml says
the same). Keys are flat: VBLoRAConfig's field names (rank, num_vectors, ...) are unique and land in
`RunConfig.vblora`; its `seed` is the run's `seed`. The baselines read the shared adapter knobs (target_modules,
rank, dropout, modules_to_save) from there too.

Flags and recipe values are read by `transformers.HfArgumentParser`: training needs transformers anyway, it keeps
the `--dash-names` and argparse subcommands the CLI already has, and reads each value by its field's annotation;
jsonargparse or tyro would add a dependency and rename flags (`--max_train_samples` only, `--vblora.rank`). It reads
one flat dataclass (`settings_class`, the nested VBLoRAConfig's fields beside RunConfig's) and a recipe is read
through the same flags (`typed_settings.typed`), so a YAML key and its flag cannot disagree. What it does not do is
written here: `--no-x` for bools whose default is False, the word `none`, and target_modules' one-string form.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vblora.config import VBLoRAConfig
from vblora.train.errors import SetupError
from vblora.train.typed_settings import flag_dataclass, typed

METHODS = ("vblora", "lora", "vera", "tied-lora", "full")
TASKS = ("classification", "regression", "causal-lm", "gsm8k")
DEVICES = ("auto", "cpu", "cuda")


def opt(default, help: str):
    """A dataclass field with its default and help text (list defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# MiniLM's hidden size 384 is not a multiple of the paper's b=256; h=90 is the paper's RoBERTa-base bank.
DEFAULT_VBLORA = VBLoRAConfig(target_modules="all-linear", rank=4, num_vectors=90, vector_length=128, topk=2)


@dataclass
class RunConfig:
    # --- what to train ---
    recipe: str | None = opt(
        None, "shipped recipe name or a .yaml path; its settings replace these defaults (--list-recipes)"
    )
    model: str = opt("minilm", "local model directory, or the offline aliases minilm / smollm2 (no hub access)")
    gguf_file: str | None = opt(None, "GGUF weights file inside --model (dequantised to fp32 on load)")
    task: str = opt(
        "classification", "classification | regression (also inferred from float labels) | causal-lm | gsm8k"
    )
    method: str = opt("vblora", "vblora | lora | vera | tied-lora | full")
    # --- data: the built-in VADER split, or the user's files ---
    dataset: str | None = opt(
        "vader-movie",
        "built-in data: vader-movie | vader-movie-instruct | none (the files below; giving --train-file implies none)",
    )
    train_file: str | None = opt(None, "training data (CSV, TSV incl. GLUE layouts, JSONL; Alpaca JSON for LM)")
    validation_file: str | None = opt(None, "validation data (the best epoch is chosen on it)")
    test_file: str | None = opt(None, "test data (reported at the best validation epoch)")
    data_format: str | None = opt(None, "csv | tsv | jsonl | json (none: from the file suffix)")
    glue_task: str | None = opt(None, "GLUE TSV layout: sst2 cola mrpc qnli rte stsb qqp mnli")
    text_column: str = opt("text", "column of the text")
    text_pair_column: str | None = opt(None, "column of the second text, for pair tasks")
    label_column: str = opt("label", "column of the label")
    max_train_samples: int | None = opt(None, "use only the first N training examples")
    max_eval_samples: int | None = opt(None, "use only the first N validation examples")
    max_test_samples: int | None = opt(None, "use only the first N test examples")
    max_length: int = opt(64, "maximum tokens per example (batches are padded dynamically)")
    group_by_length: bool = opt(True, "batches of similar length (about half the padding; train/sampling.py)")
    # --- adapter: VB-LoRA's knobs are the VBLoRAConfig fields, one flag each ---
    vblora: VBLoRAConfig = opt(DEFAULT_VBLORA, "the VB-LoRA settings (flags and keys: its field names)")
    bank: str | None = opt(
        None,
        "start VB-LoRA from a trained bank: bank.safetensors (vblora.save_bank), bank.pt, an adapter, or a run dir",
    )
    freeze_bank: bool = opt(
        False,
        "with --bank: train only the logits (and head); the adapter stores the bank's "
        "hash, the bank sits beside it once",
    )
    record_selection_every: int | None = opt(
        None, "record each sub-vector's top-k selection every N steps (for vblora plot)"
    )
    lora_alpha: float = opt(8.0, "LoRA alpha")
    vera_rank: int = opt(256, "VeRA rank")
    tied_rank: int = opt(8, "Tied-LoRA rank")
    # --- optimisation (paper Table 7: AdamW, linear schedule, warm-up ratio 0.06) ---
    epochs: float = opt(2.0, "training epochs")
    max_steps: int | None = opt(None, "stop after N optimizer steps (none: the epochs decide)")
    batch_size: int = opt(32, "batch size per process")
    eval_batch_size: int = opt(128, "evaluation (and generation) batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    lr_bank: float = opt(5e-3, "VB-LoRA vector bank learning rate (paper: 1e-3; 5e-3 chosen on VADER validation)")
    lr_logits: float = opt(1e-2, "VB-LoRA logits learning rate")
    lr_head: float = opt(4e-3, "learning rate of the trained head (modules_to_save), every method")
    lr: float | None = opt(None, "adapter learning rate of LoRA/VeRA/Tied-LoRA/full (none: per method, DEFAULT_LR)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.06, "linear warm-up as a fraction of the steps")
    warmup_steps: int = opt(0, "linear warm-up steps; replaces --warmup-ratio when > 0 (E2E, Table 8: 500)")
    lr_scheduler: str = opt("linear", "transformers learning-rate schedule")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    label_smoothing: float = opt(0.0, "label smoothing of the training loss (E2E, Table 8: 0.1)")
    seed: int = opt(0, "seed of initialisation (the bank and logits too) and data order")
    # --- evaluation ---
    extra_eval_topk: list[int] = opt(
        [], "also score the best state with these top-k softmax rules (Table 5's Gumbel rows); results under eval_topk"
    )
    num_samples: int = opt(8, "greedy generations written to samples.jsonl (LM tasks)")
    max_new_tokens: int = opt(32, "generated tokens per answer (LM tasks)")
    generate_eval: int | None = opt(
        None, "score greedy answers on the first N test examples (LM tasks; none: all for GSM8K / sentiment answers)"
    )
    # --- machinery ---
    output: str = opt("runs/minilm-vader", "run directory: results.json, adapter/, checkpoints/")
    device: str = opt("auto", "auto | cpu | cuda")
    bf16: bool = opt(False, "bfloat16 autocast")
    fp16: bool = opt(False, "float16 autocast (CUDA only)")
    fsdp: bool = opt(
        False,
        "shard the frozen base over the processes with torch FSDP2 (launch with torchrun "
        "--nproc-per-node N); the bank, logits and trained head stay whole (train/sharding.py)",
    )
    # --- QLoRA: a quantized base (bitsandbytes, `pip install 'vblora[qlora]'`; docs/quantized.md) ---
    quantize: str | None = opt(
        None,
        "load the base quantized: 4bit | 8bit (none: full precision); the adapter and "
        "the trained head stay in full precision; adds gradient checkpointing and "
        "paged AdamW (CUDA)",
    )
    quant_type: str = opt("nf4", "with --quantize 4bit: nf4 | fp4")
    double_quant: bool = opt(True, "with --quantize 4bit: double quantization (quantize the scales too)")
    compute_dtype: str = opt(
        "bfloat16",
        "with --quantize: compute dtype of the quantized layers and dtype of the "
        "base's other weights: bfloat16 | float16 | float32",
    )
    save_steps: int | None = opt(None, "also checkpoint every N optimizer steps")
    resume: bool = opt(
        False,
        "continue from the newest complete checkpoint in --output (refused if it was saved with "
        "other settings or lacks optimizer / scheduler / RNG state)",
    )
    resume_partial: bool = opt(
        False,
        "with --resume: continue even from such a checkpoint (warns; the run will not match an uninterrupted one)",
    )
    overwrite: bool = opt(
        False,
        "discard earlier checkpoints in --output (its adapter/ and results.json stay until this run replaces them)",
    )
    logging_steps: int = opt(50, "log the training loss every N steps (0: never)")
    extra: dict = opt({}, "free-form settings of experiments (recipe key only, e.g. extra.e2e)")

    def method_lr(self) -> float:
        """The adapter learning rate of a baseline (VB-LoRA's are `lr_bank` and `lr_logits`)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def to_dict(self) -> dict:
        """Flat, JSON-ready: the same keys a recipe uses (so a results.json config is a recipe of its run)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "vblora"}
        d.update({k: v for k, v in self.vblora.to_dict().items() if k != "seed"})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# Adapter learning rates of the baselines when `lr` is not set (common values from their papers: LoRA 5e-4
# (RoBERTa-base GLUE), VeRA 4e-3-1e-2 for its scaling vectors, full fine-tuning 5e-5 for a small encoder).
DEFAULT_LR = {"lora": 5e-4, "vera": 4e-3, "tied-lora": 1e-3, "full": 5e-5}


# ---- settings: names, types, text -> value (by transformers.HfArgumentParser) ----------------------------------
def setting_fields() -> dict[str, dataclasses.Field]:
    """Every recipe key / flag: RunConfig's fields, with `vblora` expanded into VBLoRAConfig's (its seed is ours)."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        inner = [g for g in dataclasses.fields(VBLoRAConfig) if g.name != "seed"] if f.name == "vblora" else [f]
        out.update({g.name: g for g in inner})
    return out


# HfArgumentParser reads `list[X]` and `X | None`; these three VBLoRAConfig annotations (Sequence, str | Sequence)
# are given to it as lists (target_modules: one item that is 'all-linear' or a regex is the string form, below).
LIST_FIELDS = {"target_modules": list[str], "layers": list[int], "modules_to_save": list[str]}
NOT_FLAGS = ("extra",)  # a mapping: recipe key only
_REGEX = re.compile(r"[*()\[\]|\\^$]")


@functools.cache
def settings_class(skip: frozenset = frozenset(), cli: bool = False, shown: str | None = None) -> type:
    """A flat dataclass of every flag (RunConfig's and VBLoRAConfig's settings, less `skip`) with RunConfig's
    defaults: what HfArgumentParser reads values into. `cli`: for command-line flags instead, whose defaults are
    "not given" and whose help texts name the defaults of the recipe `shown` (None: RunConfig's)."""
    hints = {**typing.get_type_hints(VBLoRAConfig), **typing.get_type_hints(RunConfig)}
    fields = {k: f for k, f in setting_fields().items() if k not in NOT_FLAGS and k not in skip}
    return flag_dataclass(
        "Settings",
        fields,
        {k: LIST_FIELDS.get(k, hints[k]) for k in fields},
        RunConfig().to_dict(),
        recipe_defaults(shown) if cli else None,
    )


def _normalized(name: str, value):
    """The two forms a value takes beyond its type: the word none for an optional or list setting (None, or []), and
    target_modules' string form (one regex or 'all-linear', as VBLoRAConfig and PEFT read a string)."""
    word = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(word, str) and word.lower() in ("none", "null") and (name in _OPTIONAL or name in _LISTS):
        return None if name in _OPTIONAL else []
    if (
        name == "target_modules"
        and isinstance(value, list)
        and len(value) == 1
        and (value[0] == "all-linear" or _REGEX.search(value[0]))
    ):
        return value[0]
    if name in LIST_FIELDS and isinstance(value, str) and name != "target_modules":
        return [value]  # modules_to_save: classifier
    return value


# ---- recipes -----------------------------------------------------------------------------------------------------
def recipe_names() -> list[str]:
    files = resources.files("vblora.recipes")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str, keep_description: bool = False) -> dict:
    """A recipe by name (shipped) or path (user's YAML): its key -> value mapping (description/notes dropped)."""
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
    return {k: v for k, v in data.items() if keep_description or k not in ("description", "notes")}


def recipe_defaults(name: str | None) -> dict:
    """The flat settings a run starts from with this recipe (defaults <- recipe; per-task tables left out)."""
    values = RunConfig().to_dict()
    if name:
        values.update({k: v for k, v in load_recipe(name).items() if k != "per_task"}, recipe=name)
    return values


def build_config(recipe: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults <- recipe <- overrides (None values in overrides mean 'not given')."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = given.pop("recipe", None) or recipe
    values = load_recipe(name) if name else {}
    per_task = values.pop("per_task", None) or {}
    values.update(given)
    if per_task:  # e.g. GLUE recipes: epochs / head learning rate per task (paper Table 7)
        task = values.get("glue_task")
        if task not in per_task:
            raise SetupError(f"recipe {name} needs --glue-task, one of {', '.join(per_task)}")
        values.update({k: v for k, v in per_task[task].items() if k not in given})
    known = setting_fields()
    for k, v in ((values.get("extra") or {}).get("e2e") or {}).items():  # older E2E recipes kept these there
        if k in known:
            values.setdefault(k, v)
    unknown = sorted(set(values) - set(known))
    if unknown:
        near = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=3)})
        raise SetupError(
            f"unknown setting(s) {unknown}"
            + (f" in recipe {name}" if name else "")
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + f" Known: {', '.join(known)}"
        )
    if values.get("train_file") and "dataset" not in given:
        values["dataset"] = None  # the user's files replace the built-in data
    values = {k: _normalized(k, v) for k, v in values.items()}
    extra = values.pop("extra", None)
    flat = dataclasses.asdict(typed(settings_class(), values))
    flat.pop("recipe")
    vb = {k: _normalized(k, flat.pop(k)) for k in list(flat) if k not in _RUN_FIELDS}
    cfg = RunConfig(**flat, recipe=name, **({} if extra is None else {"extra": extra}))
    cfg.vblora = DEFAULT_VBLORA.replace(**vb, seed=cfg.seed)
    for key, allowed in (
        ("method", METHODS),
        ("task", TASKS),
        ("device", DEVICES),
        ("quant_type", QUANT_TYPES),
        ("compute_dtype", COMPUTE_DTYPES),
    ):
        if getattr(cfg, key) not in allowed:
            raise SetupError(f"unknown {key} '{getattr(cfg, key)}' (one of {', '.join(allowed)})")
    _check_combinations(cfg)
    if cfg.dataset is None and not cfg.train_file:
        raise SetupError("no data: give --train-file (and --validation-file/--test-file) or a dataset")
    return cfg


QUANTIZE = ("4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def _check_combinations(cfg: RunConfig) -> None:
    """--quantize and --fsdp: their values and the settings they cannot be combined with."""
    if cfg.quantize is not None and cfg.quantize not in QUANTIZE:
        raise SetupError(f"unknown quantize '{cfg.quantize}' (one of {', '.join(QUANTIZE)}, or none)")
    if cfg.quantize and cfg.method == "full":
        raise SetupError(
            "--quantize with --method full: a quantized base cannot be fine-tuned in full; use an "
            "adapter method (vblora, lora, ...)"
        )
    if cfg.quantize and cfg.gguf_file:
        raise SetupError(
            "--quantize with --gguf-file: load a transformers checkpoint (config.json + weights) to "
            "quantize it with bitsandbytes"
        )
    if cfg.fsdp and cfg.method == "full":
        raise SetupError(
            "--fsdp with --method full: --fsdp keeps what trains whole and shards the frozen base, and "
            "full fine-tuning freezes nothing; use an adapter method (vblora, lora, ...)"
        )
    if cfg.fsdp and cfg.quantize == "8bit":
        raise SetupError(
            "--fsdp with --quantize 8bit: FSDP shards floating-point tensors only and an 8-bit base "
            "keeps int8 weights; use --quantize 4bit (stored in the compute dtype under --fsdp)"
        )


_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)} - {"vblora"}
_LISTS = {"extra_eval_topk", *LIST_FIELDS}
_OPTIONAL = {
    name
    for name, tp in {**typing.get_type_hints(VBLoRAConfig), **typing.get_type_hints(RunConfig)}.items()
    if type(None) in typing.get_args(tp)
}
