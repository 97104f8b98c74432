"""The road to vLLM: a `vblora export --to lora` directory has what vLLM's multi-LoRA loader reads
(`vllm serve BASE --enable-lora --lora-modules name=DIR --max-lora-rank N`, docs/serving.md).

vLLM is a GPU package and is not installed here; its rules are restated from its source (vllm-project/vllm):
- `vllm/lora/peft_helper.py` `PEFTHelper.from_dict`: adapter_config.json must hold `r`, `lora_alpha`,
  `target_modules`; `modules_to_save` must be empty and `use_dora` false (`_validate_features`); the scaling is
  `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).
- `vllm/lora/lora_model.py` `LoRAModel.from_local_checkpoint`: tensors from `adapter_model.safetensors`; every
  key's module (after `parse_fine_tuned_lora_name`, `vllm/lora/utils.py`: drop `base_model.model.`, then
  `.lora_A.weight` / `.lora_B.weight` / `.lora_embedding_A|B`) must end in one of the model's expected LoRA modules,
  else "While loading ..., expected target modules in ...".
- `vllm/config/lora.py`: `max_lora_rank` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512, and the worker refuses
  "LoRA rank {r} is greater than max_lora_rank".
- `vllm/model_executor/models/llama.py`: Llama's LoRA modules are qkv_proj (q_proj, k_proj, v_proj), o_proj,
  gate_up_proj (gate_proj, up_proj), down_proj, embed_tokens, lm_head (packed names expanded).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vblora
from vblora.cli import main

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LLAMA_LORA_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
}


def vllm_module_of(key: str) -> tuple[str, str]:
    """(module name, part) as vLLM's parse_fine_tuned_lora_name reads a tensor key; ValueError as it raises."""
    name = key.replace("base_model.model.", "", 1) if key.startswith("base_model.model.") else key
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2]
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), parts[-1]
    raise ValueError(f"{key} is unsupported LoRA weight")


def smallest_max_lora_rank(r: int) -> int:
    """The --max-lora-rank to pass vLLM for rank r."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


@pytest.mark.parametrize("targets, rank", [("all-linear", 4), (["q_proj", "v_proj"], 6)])
def test_exported_lora_directory_is_what_vllm_loads(tmp_path, targets, rank):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=targets, rank=rank, num_vectors=16, vector_length=16))
    vblora.save_adapter(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--to", "lora", "-o", str(tmp_path / "lora")]) == 0

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert {"r", "lora_alpha", "target_modules"} <= set(config)  # PEFTHelper's required fields
    assert not config.get("modules_to_save") and not config.get("use_dora")  # _validate_features
    assert config["r"] == rank and config["lora_alpha"] / config["r"] == 1.0  # exact: scaling 1
    assert not config.get("use_rslora")
    assert smallest_max_lora_rank(config["r"]) <= 512

    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    found = {}
    for key, t in tensors.items():
        name, part = vllm_module_of(key)
        assert name.rsplit(".", 1)[-1] in VLLM_LLAMA_LORA_MODULES, key
        base = modules[name].base  # the adapted layer's nn.Linear
        want = (rank, base.in_features) if part == "lora_A" else (base.out_features, rank)
        assert tuple(t.shape) == want, key
        assert t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        found.setdefault(name, set()).add(part)
    assert all(parts == {"lora_A", "lora_B"} for parts in found.values())
    suffixes = {n.rsplit(".", 1)[-1] for n in found}
    assert suffixes == (
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        if targets == "all-linear"
        else set(targets)
    )
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == suffixes
    assert len(found) == cfg.num_hidden_layers * len(suffixes)


def test_vllm_would_refuse_what_it_cannot_serve():
    """The restated rules reject what vLLM rejects (so the test above could fail)."""
    with pytest.raises(ValueError):
        vllm_module_of("base_model.model.model.layers.0.self_attn.q_proj.vblora_logits_A")
    assert vllm_module_of("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight") == (
        "model.layers.0.mlp.down_proj",
        "lora_B",
    )
    assert smallest_max_lora_rank(4) == 8 and smallest_max_lora_rank(16) == 16 and smallest_max_lora_rank(17) == 32
