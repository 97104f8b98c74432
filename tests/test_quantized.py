"""VB-LoRA on bitsandbytes 4-bit and 8-bit base layers (docs/quantized.md), on the CPU backend of bitsandbytes.

A tiny Llama (hidden 64, 2 layers) saved with save_pretrained and loaded through transformers' BitsAndBytesConfig.
Tolerances are measured, not guessed: `base_gap` is how far the quantized model's own output is from a dense model
holding its dequantized weights (the quantized matmul's error: bf16 compute, int8 activations); adapted outputs
must agree with their dense references within a few times that.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import vblora
from vblora.errors import QuantizedBaseError
from vblora.layout import dense_weight, is_quantized

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

try:  # tests/ may or may not be a package
    from tiny_models import portable_4bit, tiny_llama, tokens
except ImportError:
    from tests.tiny_models import portable_4bit, tiny_llama, tokens

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' per-call fp16 cast notice (8-bit)

QUANT = {  # BitsAndBytesConfig kwargs; the nf4 model is loaded as QLoRA does, the rest (and activations) in bf16
    "nf4-dq-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
CONFIG = dict(target_modules="all-linear", rank=2, num_vectors=16, vector_length=32, topk=2)
IDS = tokens(2, 8)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(d)
    return d


def load(base_dir, kind: str | None, portable: bool = True):
    """The tiny Llama from disk: quantized as `kind`, or full precision (None); on bitsandbytes' kernel path that
    every CPU takes unless `portable` is False (`tiny_models.portable_4bit`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = (
            dict(
                quantization_config=transformers.BitsAndBytesConfig(**QUANT[kind]),
                device_map="cpu",
                dtype=torch.bfloat16 if kind.startswith("nf4") else torch.float32,
            )
            if kind
            else {}
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, **q).eval()
    return portable_4bit(model) if portable else model


def adapted(base_dir, kind: str, portable: bool = True) -> torch.nn.Module:
    model = vblora.add_vblora(load(base_dir, kind, portable), vblora.VBLoRAConfig(**CONFIG))
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # logits move ~0.3
    return model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def dense_copy(base_dir, quantized) -> torch.nn.Module:
    """A float32 model with the quantized model's values: dequantized weights of its quantized Linear layers, its
    other parameters upcast (embeddings, norms, head: in bf16 when it was loaded so)."""
    dense, q = load(base_dir, None), vblora.inject.unwrap(quantized)
    with torch.no_grad():
        for name, m in dense.named_modules():
            src = q.get_submodule(name) if name else q
            src = getattr(src, "base", src)  # an adapter layer's base layer
            for key, p in m.named_parameters(recurse=False):
                p.copy_(dense_weight(src) if key == "weight" and is_quantized(src) else getattr(src, key))
    return dense


def base_gap(base_dir, kind: str, portable: bool = True) -> float:
    """The quantized matmul's own error on these inputs: quantized model vs its dequantized dense copy."""
    q = load(base_dir, kind, portable)
    out = logits(q)  # first: on the fused CPU path this repacks the weights, which the dense copy then reads
    return (out - logits(dense_copy(base_dir, q))).abs().max().item()


def tolerance(base_dir, kind: str) -> float:
    return 4 * base_gap(base_dir, kind) + 1e-5


def dense_reference(base_dir, model) -> torch.nn.Module:
    """The adapted `model`'s dense reference: its dequantized W, the same bank, x A^T B^T on top."""
    ref = vblora.add_vblora(dense_copy(base_dir, model), vblora.VBLoRAConfig(**CONFIG)).eval()
    vblora.get_bank(ref).load_state_dict(vblora.get_bank(model).state_dict())
    return ref


def inputs_seen(model) -> dict[str, torch.Tensor]:
    """Adapted layer name -> the input it saw in one forward of `model` on IDS."""
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
        for n, m in vblora.adapted_layers(model).items()
    ]
    logits(model)
    for h in hooks:
        h.remove()
    return seen


def frozen_bytes(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the bank's (packed quantized weights and their quantization state included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("vblora_bank.")}


@pytest.mark.parametrize("kind", list(QUANT))
def test_adapt_train_save_load(tmp_path, base_dir, kind):
    model = vblora.add_vblora(load(base_dir, kind), vblora.VBLoRAConfig(**CONFIG))
    layers = vblora.adapted_layers(model)
    assert len(layers) == 14 and all(layer.quantized for layer in layers.values())  # 7 Linear per block, 2 blocks
    expected = "Linear4bit" if kind != "int8" else "Linear8bitLt"
    assert {type(layer.base).__name__ for layer in layers.values()} == {expected}
    assert vblora.count_parameters(model)["base"] == sum(p.numel() for p in tiny_llama().parameters())

    before = frozen_bytes(model)
    opt = torch.optim.AdamW(vblora.parameter_groups(model, lr_bank=1e-2, lr_logits=1e-1))
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = frozen_bytes(model)
    assert after.keys() == before.keys()
    for k in before:  # the quantized weights are untouched, byte for byte
        assert before[k].dtype == after[k].dtype and torch.equal(before[k].view(-1), after[k].view(-1)), k
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"vblora_bank.bank", "vblora_bank.logits"}

    model.eval()
    path = vblora.save_adapter(model, tmp_path / "adapter")
    again = vblora.load_adapter(load(base_dir, kind), path)  # onto a freshly quantized base
    assert (logits(again) - logits(model)).abs().max() <= 1e-5  # stored rule from the file vs from the logits


@pytest.mark.parametrize("kind", ["nf4-dq-bf16", "fp4-fp32", "int8"])
def test_output_equals_dense_reference_and_merged_export(tmp_path, base_dir, kind):
    model = adapted(base_dir, kind)
    tol = tolerance(base_dir, kind)
    ref = dense_reference(base_dir, model)
    out, want = logits(model), logits(ref)
    assert (out - logits(vblora.unload(copy.deepcopy(ref), merge=False))).abs().max() > 10 * tol  # a real update
    assert (out - want).abs().max() <= tol

    # per layer, on the inputs it saw: layer(x) - dense(x) is exactly the quantized matmul's own error
    # base(x) - dense(x)
    seen = inputs_seen(model)
    with torch.no_grad():
        for name, layer in vblora.adapted_layers(model).items():
            x = seen[name]
            dense = F.linear(x.float(), dense_weight(layer.base))
            lora = F.linear(F.linear(x.float(), layer.lora_A()), layer.lora_B())
            own = (layer.base(x).float() - dense).abs().max()
            rounding = 2 * torch.finfo(x.dtype).eps * (dense.abs().max() + lora.abs().max())  # adapter in x's dtype
            y = layer(x)
            assert y.dtype == x.dtype and (y.float() - dense - lora).abs().max() <= own + rounding + 1e-6, name

    merged = vblora.merge_and_save(model, tmp_path / "merged", dtype=torch.float32)
    cfg = transformers.AutoConfig.from_pretrained(merged)
    assert getattr(cfg, "quantization_config", None) is None and str(cfg.dtype).endswith("float32")
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any(is_quantized(m) for m in plain.modules())
    assert plain.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert (logits(plain) - want).abs().max() <= 1e-5  # exactly the dense reference, merged
    assert (logits(plain) - out).abs().max() <= tol
    assert logits(model).equal(out)  # the adapted model is unchanged


def test_merged_export_in_bf16(tmp_path, base_dir):
    model = adapted(base_dir, "nf4-dq-bf16")
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        vblora.merge_and_save(model, tmp_path / "m", dtype=torch.bfloat16), dtype="auto"
    )
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert (logits(plain) - logits(model)).abs().max() <= 0.1  # bf16 weights and activations


@pytest.mark.parametrize("kind", ["nf4-dq-bf16", "int8"])
def test_merge_refused_disable_works(base_dir, kind):
    model = adapted(base_dir, kind)
    out, plain = logits(model), logits(load(base_dir, kind))
    before = frozen_bytes(model)
    for call in (
        lambda: vblora.merge(model),
        lambda: vblora.unload(model),
        lambda: next(iter(vblora.adapted_layers(model).values())).merge(),
    ):
        with pytest.raises(QuantizedBaseError, match=r"quantized base layer.*merge_and_save\(model, out_dir, dtype="):
            call()
    assert not any(layer.merged for layer in vblora.adapted_layers(model).values())
    assert all(torch.equal(v.view(-1), frozen_bytes(model)[k].view(-1)) for k, v in before.items())
    with vblora.disable_adapter(model):
        assert torch.equal(logits(model), plain)
    assert torch.equal(logits(model), out)
    bare = vblora.unload(model, merge=False)
    assert torch.equal(logits(bare), plain)


def test_peft_loads_lora_export_on_the_same_4bit_base(tmp_path, base_dir):
    peft = pytest.importorskip("peft")
    model = adapted(base_dir, "nf4-dq-bf16")
    theirs = peft.PeftModel.from_pretrained(load(base_dir, "nf4-dq-bf16"), vblora.export_lora(model, tmp_path)).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.tuners.lora")
    # PEFT runs its LoRA in float32, ours in the activation dtype (bf16 here): equal up to bf16 rounding
    assert (logits(theirs) - logits(model)).abs().max() <= tolerance(base_dir, "nf4-dq-bf16")


def test_dequantize_undoes_cpu_repacking(base_dir):
    # bitsandbytes repacks a 4-bit weight in place on CPUs with AVX512-BF16 (eval, no grad): still the same W
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no CPU repacking")
    layer = load(base_dir, "nf4-dq-bf16").model.layers[0].mlp.up_proj
    want = dense_weight(layer)
    layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
    assert torch.allclose(dense_weight(layer), want, rtol=1e-2, atol=1e-3)  # absmax kept in bf16 by the repacking


@pytest.mark.skipif(
    not getattr(bnb.functional, "has_avx512bf16", lambda: False)(),
    reason="this CPU has no AVX512-BF16, so bitsandbytes never takes its fused bf16 path here (the other tests cover "
    "the path this CPU takes)",
)
def test_fused_cpu_path(tmp_path, base_dir):
    """bitsandbytes' fused bf16 CPU path (AVX512-BF16, eval, no grad; `tiny_models.portable_4bit`): the adapter adds
    exactly its update on top of whatever the base layer computes, and a merged export equals the dense reference
    of the weights the layers hold (repacked: absmax in bf16)."""
    kind = "nf4-dq-bf16"
    model = adapted(base_dir, kind, portable=False)
    out = logits(model)
    layers = vblora.adapted_layers(model)
    assert all(getattr(layer.base.weight.quant_state, "packing_format_for_cpu", False) for layer in layers.values())
    tol = 4 * base_gap(base_dir, kind, portable=False) + 1e-5
    ref = dense_reference(base_dir, model)
    want = logits(ref)
    assert (out - logits(vblora.unload(copy.deepcopy(ref), merge=False))).abs().max() > 2 * tol  # a real update
    assert (logits(model) - want).abs().max() <= tol

    seen = inputs_seen(model)
    with torch.no_grad():
        for name, layer in layers.items():
            x = seen[name]
            base = layer.base(x).float()
            lora = F.linear(F.linear(x.float(), layer.lora_A()), layer.lora_B())
            rounding = 2 * torch.finfo(x.dtype).eps * (base.abs().max() + lora.abs().max())
            y = layer(x)
            assert y.dtype == x.dtype and (y.float() - base - lora).abs().max() <= rounding + 1e-6, name

    plain = transformers.AutoModelForCausalLM.from_pretrained(
        vblora.merge_and_save(model, tmp_path / "merged", dtype=torch.float32)
    ).eval()
    assert (logits(plain) - want).abs().max() <= 1e-5  # exactly the dense reference, merged


def test_core_imports_without_bitsandbytes(monkeypatch):
    code = "import sys, vblora, vblora.storage; assert 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vblora\[qlora\]'"):
        vblora.layout.require_bitsandbytes()


def test_adapters_cross_between_quantized_and_full_precision_bases(tmp_path, base_dir):
    # the usual QLoRA round trip: trained on the 4-bit base, served on the full-precision one, and back. Packed
    # weights are not sampled for the base-model check (the quantization error is far above its tolerance), also
    # when packed into bf16 storage (bnb_4bit_quant_storage, what FSDP needs), where they look like float weights
    q = adapted(base_dir, "nf4-dq-bf16")
    assert vblora.storage.take_snapshot(q).weight_sample == {}
    vblora.load_adapter(load(base_dir, None), vblora.save_adapter(q, tmp_path / "q"))
    full = vblora.add_vblora(load(base_dir, None), vblora.VBLoRAConfig(**CONFIG))
    assert vblora.storage.take_snapshot(full).weight_sample
    QUANT["nf4-bf16-storage"] = dict(QUANT["nf4-dq-bf16"], bnb_4bit_quant_storage=torch.bfloat16)
    try:
        packed = load(base_dir, "nf4-bf16-storage")
    finally:
        del QUANT["nf4-bf16-storage"]
    layer = packed.model.layers[1].mlp.gate_proj
    assert layer.weight.dtype == torch.bfloat16 and is_quantized(layer)
    assert torch.equal(dense_weight(layer), dense_weight(load(base_dir, "nf4-dq-bf16").model.layers[1].mlp.gate_proj))
    again = vblora.load_adapter(packed, vblora.save_adapter(full, tmp_path / "full"))
    assert torch.isfinite(logits(again)).all()
