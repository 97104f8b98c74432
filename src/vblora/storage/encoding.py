"""Compact encodings of the stored triplet: bit-packed indices, an 8-bit bank and 8-bit mixing weights.

Shapes: h = num_vectors, b = vector_length, N = sub-vectors, k = stored top-k. All functions are pure and run on
CPU tensors; they are the only place where the file's integer encodings are defined.
"""

from __future__ import annotations

import math

import torch

from vblora.layout import index_dtype


def index_bits(num_vectors: int) -> int:
    """Bits per packed index: ceil(log2 h), at least 1 (h=90 -> 7, h=256 -> 8, h=2048 -> 11)."""
    return max(1, math.ceil(math.log2(num_vectors)))


def narrow_indices(indices: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """`(N, k)` int64 -> the smallest unsigned dtype holding values < h (uint8 for h <= 256, uint16 <= 65536)."""
    return indices.to(index_dtype(num_vectors)).contiguous()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Any-shape non-negative ints < 2**bits -> `(ceil(numel * bits / 8),)` uint8, little-endian bit stream."""
    flat = values.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (numel * bits,), least significant bit first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `(bytes,)` uint8 -> `(count,)` int64. Raises ValueError if too few bytes."""
    need = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed indices must be ({need},) uint8, got {tuple(packed.shape)} {packed.dtype}")
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[: count * bits]
    return (stream.view(count, bits) << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


def quantize_bank(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(h, b)` float -> `(h, b)` int8 in [-127, 127] and a per-vector float32 scale `(h,)` (symmetric absmax)."""
    bank = bank.detach().float()
    scale = bank.abs().amax(dim=1) / 127.0  # (h,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero vector keeps scale 1
    q = torch.round(bank / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_bank(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`(h, b)` int8 and `(h,)` scale -> `(h, b)` float32."""
    return q.float() * scale.float().unsqueeze(1)


def quantize_weights(weights: torch.Tensor) -> torch.Tensor:
    """`(N, k-1)` mixing weights in [0, 1] -> `(N, k-1)` uint8 steps of 1/255.

    The running sums are rounded, not the weights, so every dequantised weight is >= 0 and their sum never
    exceeds 1: the implied last weight 1 - sum stays a valid probability.
    """
    cum = torch.round(weights.detach().float().clamp(0, 1).cumsum(dim=1).clamp(max=1) * 255)  # (N, k-1)
    steps = torch.diff(cum, dim=1, prepend=torch.zeros_like(cum[:, :1]))
    return steps.clamp_(0, 255).to(torch.uint8)


def dequantize_weights(q: torch.Tensor) -> torch.Tensor:
    """`(N, k-1)` uint8 -> float32 weights."""
    return q.float() / 255.0


def complete_weights(partial: torch.Tensor) -> torch.Tensor:
    """`(N, k-1)` stored weights -> `(N, k)`: the last weight is 1 - sum (weights of a softmax sum to 1)."""
    partial = partial.float()
    return torch.cat([partial, 1.0 - partial.sum(dim=1, keepdim=True)], dim=1)
