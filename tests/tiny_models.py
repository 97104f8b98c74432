"""Tiny Hugging Face models from configs (dims divisible by 32 unless asked otherwise). Random weights."""

from __future__ import annotations

import torch


def tiny_roberta(hidden: int = 64, intermediate: int = 128, layers: int = 2, classifier: bool = False):
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    model = RobertaForSequenceClassification(cfg) if classifier else RobertaModel(cfg, add_pooling_layer=False)
    return model.eval()


def tiny_gpt2(hidden: int = 64, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=100,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(hidden: int = 64, intermediate: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tokens(batch: int = 2, length: int = 8, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def output_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def portable_4bit(model):
    """`model` with its bitsandbytes 4-bit layers on the kernel path every CPU takes (dequantize, then matmul in the
    compute dtype). On CPUs with AVX512-BF16, bitsandbytes (0.50) otherwise computes eval forwards without gradients
    with a fused bf16 kernel (activations cast to bf16 even for a float32 compute dtype) on a weight it repacks in
    place at the first such forward, and `state_dict()` unpacks it again, which moves later outputs by a bf16 ulp.
    Tests that compare outputs exactly use this path on every machine; test_quantized.py::test_fused_cpu_path covers
    the fused one where the CPU has it."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit's switch, set from the CPU
            m.support_avx512bf16_for_cpu = False
    return model
