"""Length-grouped sampler: a permutation per epoch, seeded by (seed, epoch), less padding than random batches, and
the same global batches whatever the process count (the Trainer-level resume / torchrun tests use it too)."""

from __future__ import annotations

import itertools
import random
import statistics

from vblora.train.sampling import LengthGroupedEpochSampler


def _lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 64) for _ in range(n)]


def _padded_tokens(order, lengths, batch):
    return sum(
        max(lengths[i] for i in order[j : j + batch]) * len(order[j : j + batch]) for j in range(0, len(order), batch)
    )


def test_each_epoch_is_a_seeded_permutation():
    lengths = _lengths()
    s = LengthGroupedEpochSampler(lengths, global_batch=32, seed=7)
    e0 = list(s)
    assert sorted(e0) == list(range(len(lengths)))
    assert list(s) == e0  # same epoch, same order (a resumed run re-creates it)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(len(lengths))) and e1 != e0
    assert list(LengthGroupedEpochSampler(lengths, 32, seed=7)) == e0
    assert list(LengthGroupedEpochSampler(lengths, 32, seed=8)) != e0


def test_grouping_halves_padding_and_keeps_the_partial_batch_last():
    lengths = _lengths(1000)
    order = list(LengthGroupedEpochSampler(lengths, 32, seed=0))
    rnd = list(range(len(lengths)))
    random.Random(0).shuffle(rnd)
    assert _padded_tokens(order, lengths, 32) < 0.7 * _padded_tokens(rnd, lengths, 32)
    spreads = [
        max(lengths[i] for i in order[j : j + 32]) - min(lengths[i] for i in order[j : j + 32])
        for j in range(0, 992, 32)
    ]
    assert statistics.median(spreads) <= 12  # random batches of 32 from 3..64 span ~55
    # 1000 = 31 x 32 + 8: the 8 left over stay at the end, so process shards of each global batch stay aligned
    assert len(order[992:]) == 8


def test_batch_order_is_shuffled_not_a_long_to_short_ramp():
    lengths = _lengths(3200)
    order = list(LengthGroupedEpochSampler(lengths, 32, seed=0))
    maxima = [max(lengths[i] for i in order[j : j + 32]) for j in range(0, len(order), 32)]
    descents = sum(a >= b for a, b in itertools.pairwise(maxima))
    assert descents < 0.75 * (len(maxima) - 1)  # a sorted mega-batch ramp would give ~all descents
