"""`vblora train --quantize 4bit|8bit` (QLoRA) on the tiny LLaMA, on the CPU backend of bitsandbytes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import TrainerCallback

import vblora
from vblora.layout import is_quantized
from vblora.train.config import build_config
from vblora.train.errors import SetupError
from vblora.train.pipeline import train

try:  # tests/ may or may not be a package
    from tiny_models import portable_4bit
except ImportError:
    from tests.tiny_models import portable_4bit

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _alpaca(n: int) -> list[dict]:
    return [
        {
            "instruction": "what sentiment",
            "input": f"the film was {['good', 'bad'][i % 2]}",
            "output": ["positive", "negative"][i % 2],
        }
        for i in range(n)
    ]


def _overrides(model, tmp_path, **kw) -> dict:
    files = {}
    for split, n in (("train", 16), ("validation", 4), ("test", 4)):
        p = tmp_path / f"{split}.json"
        p.write_text(json.dumps(_alpaca(n)))
        files[f"{split}_file"] = str(p)
    base = {
        "model": model,
        **files,
        "output": str(tmp_path / "run"),
        "device": "cpu",
        "dataset": None,
        "task": "causal-lm",
        "epochs": 1,
        "max_steps": 4,
        "batch_size": 4,
        "eval_batch_size": 8,
        "max_length": 96,
        "vector_length": 32,
        "num_vectors": 16,
        "logging_steps": 1000,
        "max_new_tokens": 2,
        "num_samples": 2,
        "generate_eval": 2,
        "overwrite": True,
        "quantize": "4bit",
        "lr_bank": 1e-2,
        "lr_logits": 5e-2,
    }
    base.update(kw)
    return base


class _Keep(TrainerCallback):
    """Keeps the trained model and the quantized base weights (state_dict bytes) before training."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = portable_4bit(model)  # before the run's own evaluation: the path every CPU takes
        self.before = _quantized_state(model)


def _quantized_state(model) -> dict[str, torch.Tensor]:
    names = {f"{n}.weight" for n, m in model.named_modules() if is_quantized(m)}
    names |= {f"{n}.base.weight" for n, m in model.named_modules() if is_quantized(getattr(m, "base", None))}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _fresh_4bit(path, cfg):
    from transformers import AutoModelForCausalLM

    from vblora.train import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = models.quantization(cfg.quantize, cfg.quant_type, cfg.double_quant, cfg.compute_dtype)
        return portable_4bit(AutoModelForCausalLM.from_pretrained(path, **q).eval())


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_qlora_train_roundtrip(tiny_llama, tmp_path, quantize):
    cfg = build_config(None, _overrides(tiny_llama, tmp_path, quantize=quantize))
    keep, lines = _Keep(), []
    res = train(cfg, callbacks=[keep], log=lines.append)
    assert (tmp_path / "run" / "results.json").exists() and res["steps"] == 4
    assert 0 < res["train_loss"] < float("inf")
    assert res["config"]["quantize"] == quantize and res["config"]["quant_type"] == "nf4"
    assert any("paged AdamW needs CUDA; using torch AdamW" in str(x) for x in lines)
    model = keep.model
    assert model.is_quantized
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert len(keep.before) == 14  # 2 layers x 7 linears, all quantized; lm_head stays full precision
    after = _quantized_state(model)
    assert after.keys() == keep.before.keys()
    for k, v in keep.before.items():  # the packed base weights are untouched byte for byte
        assert torch.equal(after[k], v), k

    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
        fresh = vblora.load_adapter(_fresh_4bit(tiny_llama, cfg), tmp_path / "run" / "adapter")
        loaded = fresh(input_ids=ids).logits.float()
    assert torch.allclose(trained, loaded, atol=1e-4), (trained - loaded).abs().max()


def test_bad_quantize_is_one_setup_error(tiny_llama, tmp_path):
    with pytest.raises(SetupError, match=r"unknown quantize '3bit' \(one of 4bit, 8bit"):
        build_config(None, _overrides(tiny_llama, tmp_path, quantize="3bit"))
    with pytest.raises(SetupError, match="unknown quant_type 'nf3'"):
        build_config(None, _overrides(tiny_llama, tmp_path, quant_type="nf3"))
    with pytest.raises(SetupError, match="unknown compute_dtype"):
        build_config(None, _overrides(tiny_llama, tmp_path, compute_dtype="int8"))
