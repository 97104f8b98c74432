"""Choosing each row's next token from its logits: greedy (temperature 0) or temperature + nucleus (top_p) sampling
with the request's own random generator, so a seeded request draws the same tokens whatever shares its batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (OpenAI's names and defaults)."""
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: drawn at random once per request

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.greedy:
        return None
    g = torch.Generator(device=device)
    if sampling.seed is None:
        g.seed()
    else:
        g.manual_seed(sampling.seed)
    return g


def sample_row(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token from `logits (V,)` float32."""
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        sorted_probs[before >= sampling.top_p] = 0.0  # the first token always stays (before == 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(logits: torch.Tensor, settings: list[Sampling], generators: list) -> torch.Tensor:
    """`logits (B, V)` -> `(B,)` next tokens: one argmax for the whole batch, then the sampled rows one by one."""
    tokens = logits.argmax(-1)  # on the model's dtype: casting to float32 is exact, so the argmax is the same
    for i, (s, g) in enumerate(zip(settings, generators)):
        if not s.greedy:
            tokens[i] = sample_row(logits[i].float(), s, g)
    return tokens
