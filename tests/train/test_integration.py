"""`vblora.AdapterTrainer` on tiny models built from configs (issue 20): what docs/training.md promises, at the edges
the docs examples do not reach: a checkpoint between two logging steps, `resume_from_checkpoint=True`, the whole
run's `train_loss`, a checkpoint of another model refused in one line, a quantized base accepted (and refused by
the plain Trainer), and `import vblora` without transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import vblora
from vblora.errors import AdapterFormatError
from vblora.storage.checkpoint import trainable_state

CFG = BertConfig(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=32,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.0,
)


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(5, 100, (8,), generator=g), "labels": i % 2}


class Stop(Exception):
    pass


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Stop


@pytest.fixture(scope="module")
def base_state():
    torch.manual_seed(0)
    return BertForSequenceClassification(CFG).state_dict()


def make(base_state, out, num_vectors=16, **kw):
    model = BertForSequenceClassification(CFG)
    model.load_state_dict(base_state)
    model = vblora.add_vblora(
        model,
        vblora.VBLoRAConfig(
            target_modules="all-linear",
            rank=4,
            num_vectors=num_vectors,
            vector_length=32,
            modules_to_save=["classifier"],
        ),
    )
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        save_steps=3,
        logging_steps=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        **kw,
    )
    return vblora.AdapterTrainer(model=model, args=args, train_dataset=Rows())


def losses(trainer) -> dict:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_resume_between_logging_steps_is_exact(base_state, tmp_path):
    """Checkpoint-3 falls between the logs of steps 2 and 4: the resumed run's step-4 log covers steps 3 and 4 as
    in the uninterrupted run, and the whole run's train_loss is the same (the plain Trainer restarts both sums)."""
    ref = make(base_state, tmp_path / "ref")
    out = ref.train()
    killed = make(base_state, tmp_path / "run")
    killed.add_callback(StopAt(5))
    with pytest.raises(Stop):
        killed.train()
    resumed = make(base_state, tmp_path / "run")
    assert resumed.train(resume_from_checkpoint=True) is not None  # the newest: checkpoint-3
    assert losses(resumed) == losses(ref) and len(losses(ref)) == 8
    final = [h for h in resumed.state.log_history if "train_loss" in h][-1]["train_loss"]
    assert final == out.metrics["train_loss"] == ref.run_loss()
    a, b = trainable_state(ref.model), trainable_state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_model_is_one_clear_error(base_state, tmp_path):
    make(base_state, tmp_path / "run", max_steps=3).train()
    other = make(base_state, tmp_path / "run", num_vectors=24, max_steps=6)
    before = trainable_state(other.model)
    with pytest.raises(
        AdapterFormatError,
        match=r"checkpoint-3/model.safetensors: checkpoint was saved with other "
        r"VB-LoRA settings: .*num_vectors",
    ):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert all(torch.equal(before[k], v) for k, v in trainable_state(other.model).items())  # nothing changed


def test_user_save_model_writes_the_native_adapter_only(base_state, tmp_path):
    t = make(base_state, tmp_path / "run", max_steps=2)
    t.train()
    t.save_model(str(tmp_path / "adapter"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors"]
    fresh = BertForSequenceClassification(CFG)
    fresh.load_state_dict(base_state)
    loaded = vblora.load_adapter(fresh, tmp_path / "adapter").eval()
    x = torch.randint(5, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, t.model.eval()(input_ids=x).logits, atol=1e-5)


def test_quantized_base_accepted_where_the_plain_trainer_refuses(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quant, device_map="cpu")
    model = vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=16, vector_length=32)
    )
    args = TrainingArguments(
        str(tmp_path / "q"),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    rows = [{"input_ids": torch.arange(4, 12), "labels": torch.arange(4, 12)} for _ in range(4)]
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=rows)
    t = vblora.AdapterTrainer(model=model, args=args, train_dataset=rows)
    assert model.is_quantized  # flagged again once the Trainer's check is over
    t.train()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"vblora_bank.bank", "vblora_bank.logits"}


def test_import_vblora_needs_no_transformers():
    code = (
        "import sys, vblora; assert 'transformers' not in sys.modules; assert 'AdapterTrainer' in vblora.__all__; "
        "t = vblora.AdapterTrainer; assert 'transformers' in sys.modules and t.__name__ == 'AdapterTrainer'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
