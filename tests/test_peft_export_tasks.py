"""`export_peft` for every PEFT task type it writes, with and without a trained head: the directory loads in HF PEFT
by `PeftModel.from_pretrained` and by the task's `AutoPeftModelFor*` (which builds the base itself from
`base_model_name_or_path`, a tiny model saved here), and PEFT's outputs equal ours.

PEFT's task classes for SEQ_CLS / TOKEN_CLS / QUESTION_ANS wrap the head (`classifier`, `score`, `qa_outputs`) and
read its weights from the file, so an export of a model whose head was not trained must carry the head's weights
(it raised `KeyError: 'base_model.model.classifier.dense.weight'` in PEFT 0.21.2 before), and an export of an
adapter file, which lacks them, must not claim the task type. `export_lora` writes through the same code and had the
same failure.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vblora
from vblora.inject import trained_copies

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TOL = 1e-5


def roberta_config(num_labels: int = 3):
    return transformers.RobertaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=40,
        num_labels=num_labels,
    )


def bart_config():
    return transformers.BartConfig(
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=40,
        dropout=0.0,
        attention_dropout=0.0,
    )


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )


# task type -> (transformers class, its config, PEFT's auto class, the head PEFT wraps or None)
TASKS = {
    "SEQ_CLS": (
        "RobertaForSequenceClassification",
        roberta_config,
        "AutoPeftModelForSequenceClassification",
        "classifier",
    ),
    "TOKEN_CLS": ("RobertaForTokenClassification", roberta_config, "AutoPeftModelForTokenClassification", "classifier"),
    "QUESTION_ANS": (
        "RobertaForQuestionAnswering",
        lambda: roberta_config(2),
        "AutoPeftModelForQuestionAnswering",
        "qa_outputs",
    ),
    "CAUSAL_LM": ("LlamaForCausalLM", llama_config, "AutoPeftModelForCausalLM", None),
    "SEQ_2_SEQ_LM": ("BartForConditionalGeneration", bart_config, "AutoPeftModelForSeq2SeqLM", None),
    "FEATURE_EXTRACTION": ("RobertaModel", roberta_config, "AutoPeftModelForFeatureExtraction", None),
}
CASES = [(task, trained) for task, spec in TASKS.items() for trained in ((False, True) if spec[3] else (False,))]


def saved_base(task: str, directory):
    """A tiny base of the task's class saved to `directory` and loaded back from it (so its `_name_or_path`, which
    the export records as `base_model_name_or_path`, is that directory)."""
    cls_name, config, _, _ = TASKS[task]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    cls(config()).save_pretrained(directory)
    return cls.from_pretrained(directory).eval()


def adapt(base, head: str | None):
    """`base` adapted on all linears of its blocks, bank and logits (and the trained head, if any) made random."""
    cfg = vblora.VBLoRAConfig(
        target_modules="all-linear",
        rank=2,
        num_vectors=20,
        vector_length=32,
        topk=2,
        modules_to_save=(head,) if head else (),
    )
    model = vblora.add_vblora(base, cfg)
    bank, g = vblora.get_bank(model), torch.Generator().manual_seed(1)
    with torch.no_grad():
        bank.bank.copy_(torch.randn(bank.bank.shape, generator=g) * 0.1)
        bank.logits.copy_(torch.randn(bank.logits.shape, generator=g))
        for c in trained_copies(model).values():
            for p in c.trained.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def outputs(model) -> torch.Tensor:
    """All the model's output tensors for fixed inputs, concatenated flat."""
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    keys = [
        k for k in ("logits", "start_logits", "end_logits", "last_hidden_state") if getattr(out, k, None) is not None
    ]
    return torch.cat([getattr(out, k).reshape(-1) for k in keys])


def written_task(out) -> str | None:
    return json.loads((out / "adapter_config.json").read_text())["task_type"]


def auto_class(task: str):
    return getattr(peft, TASKS[task][2])


@pytest.mark.parametrize("task,trained_head", CASES)
@pytest.mark.parametrize("topk_only", [False, True])
def test_export_of_a_model_loads_in_peft_under_its_task_type(tmp_path, task, trained_head, topk_only):
    base = saved_base(task, tmp_path / "base")
    head = TASKS[task][3] if trained_head else None
    model = adapt(copy.deepcopy(base), head)
    ref = outputs(model)
    out = vblora.export_peft(model, tmp_path / "peft", save_only_topk_weights=topk_only)
    assert written_task(out) == task
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert type(theirs).__name__ == peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task].__name__
    assert (outputs(theirs) - ref).abs().max() <= TOL
    auto = auto_class(task).from_pretrained(out).eval()  # builds the base from base_model_name_or_path
    assert (outputs(auto) - ref).abs().max() <= TOL


@pytest.mark.parametrize("task,trained_head", CASES)
def test_export_of_an_adapter_file_loads_in_peft(tmp_path, task, trained_head):
    """From a file the untrained head's weights are unknown: a task with a head is written without its task type
    (PEFT's plain PeftModel, built by AutoPeftModel), unless the head was trained and travels in the file."""
    base = saved_base(task, tmp_path / "base")
    head = TASKS[task][3] if trained_head else None
    model = adapt(copy.deepcopy(base), head)
    ref = outputs(model)
    out = vblora.export_peft(vblora.save_adapter(model, tmp_path / "adapter"), tmp_path / "peft")
    expected = task if TASKS[task][3] is None or trained_head else None
    assert written_task(out) == expected
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (outputs(theirs) - ref).abs().max() <= TOL
    auto = (auto_class(task) if expected else peft.AutoPeftModel).from_pretrained(out).eval()
    assert (outputs(auto) - ref).abs().max() <= TOL


def test_an_adapted_module_inside_the_head_is_written_without_the_task_type(tmp_path):
    """PEFT's SEQ_CLS class would leave `classifier.dense` unadapted: the file says no task type, and PEFT's plain
    PeftModel reproduces the model."""
    base = saved_base("SEQ_CLS", tmp_path / "base")
    cfg = vblora.VBLoRAConfig(target_modules=["query", "value", "dense"], rank=2, num_vectors=20, vector_length=32)
    model = vblora.add_vblora(copy.deepcopy(base), cfg).eval()
    assert "classifier.dense" in vblora.adapted_layers(model)
    out = vblora.export_peft(model, tmp_path / "peft")
    assert written_task(out) is None
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (outputs(theirs) - outputs(model)).abs().max() <= TOL


def test_import_reads_an_untrained_head_written_for_peft(tmp_path):
    """Our own import of such a directory gives back the same outputs (the head's weights arrive as a saved module)."""
    base = saved_base("SEQ_CLS", tmp_path / "base")
    model = adapt(copy.deepcopy(base), None)
    out = vblora.export_peft(model, tmp_path / "peft")
    back = vblora.import_peft(copy.deepcopy(base), out)
    assert (outputs(back) - outputs(model)).abs().max() <= TOL


@pytest.mark.parametrize("task,trained_head", [("SEQ_CLS", False), ("SEQ_CLS", True), ("CAUSAL_LM", False)])
def test_plain_lora_export_loads_in_peft(tmp_path, task, trained_head):
    """`export_lora` shares the directory writer: from a model, a classifier whose head was not trained keeps its task
    type and carries the head's base weights, as `export_peft` does (it raised the same KeyError in PEFT before)."""
    base = saved_base(task, tmp_path / "base")
    model = adapt(copy.deepcopy(base), TASKS[task][3] if trained_head else None)
    out = vblora.export_lora(model, tmp_path / "lora")
    expected = task
    assert written_task(out) == expected
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert isinstance(theirs.peft_config["default"], peft.LoraConfig)
    assert (outputs(theirs) - outputs(model)).abs().max() <= TOL
    auto = (auto_class(task) if expected else peft.AutoPeftModel).from_pretrained(out).eval()
    assert (outputs(auto) - outputs(model)).abs().max() <= TOL
