"""Tiny models for the storage / interop tests: RoBERTa-, GPT-2-, LLaMA- and T5-shaped (encoder-decoder), built from
configs (no hub).

Hidden 64, vector_length 32 divides every dimension, so PEFT can represent the adapters too.
"""

from __future__ import annotations

import copy

import torch
import transformers

import vblora

FAMILIES = ("roberta", "gpt2", "llama", "t5")


def tiny_base(family: str, head: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "roberta":
        cfg = transformers.RobertaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            max_position_embeddings=40,
        )
        cls = transformers.RobertaForSequenceClassification if head else transformers.RobertaModel
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model
    elif family == "t5":
        cfg = transformers.T5Config(
            vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
        cls = transformers.T5ForConditionalGeneration if head else transformers.T5Model
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            max_position_embeddings=64,
        )
        cls = transformers.LlamaForCausalLM if head else transformers.LlamaModel
    return cls(cfg).eval()


def tiny_config(**changes) -> vblora.VBLoRAConfig:
    base = dict(target_modules="all-linear", rank=2, num_vectors=20, vector_length=32, topk=2)
    base.update(changes)
    return vblora.VBLoRAConfig(**base)


def adapted(family: str, head: bool = False, **changes) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(adapted model with random, non-trivial bank and logits in eval mode, a pristine copy of its base)."""
    base = tiny_base(family, head)
    pristine = copy.deepcopy(base)
    model = vblora.add_vblora(base, tiny_config(**changes))
    bank = vblora.get_bank(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bank.bank.copy_(torch.randn(bank.bank.shape, generator=g) * 0.1)
        bank.logits.copy_(torch.randn(bank.logits.shape, generator=g))
        for c in vblora.inject.trained_copies(model).values():
            for p in c.trained.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), pristine


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    # One thread: these models are tiny, and on a busy 2-core machine OpenMP spinning makes a forward ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = inputs() if ids is None else ids
        seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)  # T5: the decoder reads ids too
        out = model(input_ids=ids, **({"decoder_input_ids": ids} if seq2seq else {}))
    finally:
        torch.set_num_threads(threads)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
