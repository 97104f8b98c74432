"""The running batch of the server: one KV cache whose rows are requests that join and leave between decode steps.

Rows are left-padded to one length L (the cache's sequence axis), so a decode step is one forward of shape (B, 1):
- `mask (B, L)`: 1 where a cache column holds a real token of the row, 0 on its left padding;
- `positions (B,)`: the position id of the row's next token (its real length, not L), so a row's rotary positions
  are those it gets alone;
- joining: a group of new requests is prefilled on its own (left-padded among themselves), then both caches are
  left-padded to the longer length and concatenated on the batch axis;
- leaving: the remaining rows are selected, then the left columns that are padding in every remaining row dropped.

Padding columns are masked out of every attention, so a row's logits are those it gets alone up to float rounding
(tests/serve/ check greedy outputs are identical). The scheduler gives every forward a plain `DynamicCache()`, whose
layers keep all columns even for sliding-window models (the window is applied by the attention mask, not by
trimming the cache), so every layer can be padded and concatenated; caches of other kinds (recurrent or
linear-attention state) are refused with `UnsupportedCacheError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class UnsupportedCacheError(TypeError):
    """The model's KV cache has layers the running batch cannot pad and concatenate (recurrent state...)."""


def cache_layers(cache) -> list:
    """The per-layer cache objects, each holding `keys` / `values` of shape (B, H_kv, L, D); UnsupportedCacheError
    for any other kind of layer."""
    layers = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise UnsupportedCacheError(
                f"the server's continuous batching needs key/value cache layers it can pad and concatenate; this "
                f"model's cache has {type(layer).__name__}")
    return layers


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with `width` zero columns prepended on `dim` (F.pad lists (left, right) widths from the last dim back)."""
    return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width, 0))


class RunningBatch:
    """The rows being decoded: their cache, masks, next positions and last tokens, plus one payload per row (the
    scheduler's request objects), kept in the same order as the cache's batch axis."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rows: list = []  # payloads, row order = batch order
        self.cache = None  # transformers DynamicCache, or None when empty
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, L)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def join(self, rows: list, cache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> None:
        """Add prefilled rows: `cache` of batch len(rows) and length mask.shape[1]."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(rows), cache, mask, positions, last
            return
        L = max(self.length, mask.shape[1])
        mine, theirs = cache_layers(self.cache), cache_layers(cache)
        pad_mine, pad_theirs = L - self.length, L - mask.shape[1]
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([left_pad(a.keys, pad_mine, 2), left_pad(b.keys, pad_theirs, 2)], dim=0)
            a.values = torch.cat([left_pad(a.values, pad_mine, 2), left_pad(b.values, pad_theirs, 2)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, pad_mine, 1), left_pad(mask, pad_theirs, 1)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows += list(rows)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices (in this order) and drop the columns that became all padding."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__(self.device)
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self.mask[idx]
        first = int((mask.sum(0) > 0).long().argmax())  # first column holding a real token of some kept row
        for layer in cache_layers(self.cache):
            layer.keys = layer.keys[idx, :, first:]
            layer.values = layer.values[idx, :, first:]
        self.mask = mask[:, first:]
        self.positions, self.last = self.positions[idx], self.last[idx]
        self.rows = [self.rows[i] for i in keep]

    def step_inputs(self) -> dict:
        """Model kwargs of one decode step over `self.cache`: input_ids (B, 1), attention_mask (B, L + 1),
        position_ids (B, 1)."""
        ones = torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=self.device)
        return {"input_ids": self.last[:, None], "attention_mask": torch.cat([self.mask, ones], dim=1),
                "position_ids": self.positions[:, None]}

    def advance(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """After a decode step: every row's cache grew by one real column, which the step's `attention_mask`
        `(B, L + 1)` (from `step_inputs`) already covers; `tokens (B,)` feed the next step."""
        self.mask = mask
        self.positions = self.positions + 1
        self.last = tokens


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Model kwargs prefilling left-padded prompts: input_ids / attention_mask / position_ids, all (B, P)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
