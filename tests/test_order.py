"""The epoch's order and its partition, as pure functions (data/shuffle.py, data/partition.py, data/world.py):
the same global batches for any ranks, workers and accumulation; every position once; resumable on another
topology; and the mixing measured against the per-worker shuffle buffer it replaced."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cxrdist.data.partition import micro_positions, reader_micro_batches, reader_plan, steps_per_epoch
from cxrdist.data.shuffle import epoch_order, mixed_order, mixing
from cxrdist.data.world import World
from cxrdist.errors import UserError

SIZES = [37, 40, 40, 12, 40, 40, 33, 40]  # a split's shards, the last ones short as packing leaves them


def batches(world_size: int, workers: int, micro: int, gb: int, seed=3, epoch=1, window=64) -> list[set[int]]:
    """Every global batch of the epoch as a set of concatenated positions, gathered from every rank's every
    reader as the loaders would make them."""
    eo = epoch_order(SIZES, seed, epoch, window)
    steps = steps_per_epoch(eo.samples, gb)
    got: dict[int, set[int]] = {}
    for rank in range(world_size):
        w = World(rank, world_size, workers, seed, epoch, micro, gb)
        made = []
        for reader in range(w.readers):
            for m in reader_micro_batches(w, 0, steps, reader):
                step = m // w.accumulate
                got.setdefault(step, set()).update(eo.order[micro_positions(w, m)].tolist())
                made.append(m)
        assert sorted(made) == list(range(steps * w.accumulate))  # the readers make each micro-batch once
    return [got[s] for s in range(steps)]


def test_the_order_is_a_permutation_shuffled_within_windows_and_fixed_by_seed_and_epoch():
    eo = epoch_order(SIZES, seed=0, epoch=0, window=50)
    assert sorted(eo.order.tolist()) == list(range(sum(SIZES)))
    assert all(p // 50 == c // 50 for p, c in enumerate(eo.order.tolist()))  # within its window
    assert np.array_equal(eo.order, epoch_order(SIZES, 0, 0, 50).order)
    assert not np.array_equal(eo.order, epoch_order(SIZES, 0, 1, 50).order)  # another epoch, another order
    assert sorted(eo.shards.tolist()) == list(range(len(SIZES)))
    shard, idx = eo.locate(np.arange(sum(SIZES)))
    assert all(0 <= i < SIZES[s] for s, i in zip(shard.tolist(), idx.tolist()))
    assert len({(s, i) for s, i in zip(shard.tolist(), idx.tolist())}) == sum(SIZES)


def test_global_batches_are_the_same_for_any_ranks_workers_and_accumulation():
    want = batches(1, 0, 24, 24)
    for world_size, workers, micro in ((2, 1, 12), (2, 2, 12), (4, 2, 6), (2, 2, 6), (1, 3, 8), (4, 0, 3)):
        assert batches(world_size, workers, micro, 24) == want, (world_size, workers, micro)
    flat = [p for b in want for p in b]
    assert len(flat) == len(set(flat)) == len(want) * 24  # each sample at most once an epoch


def test_a_resume_on_another_topology_trains_every_sample_of_the_epoch_once():
    eo = epoch_order(SIZES, 5, 2, 64)
    steps = steps_per_epoch(eo.samples, 16)

    def part(world_size: int, micro: int, first: int, last: int) -> list[int]:
        out = []
        for rank in range(world_size):
            w = World(rank, world_size, 2, 5, 2, micro, 16)
            for reader in range(w.readers):
                for m in reader_micro_batches(w, first, last, reader):
                    out += eo.order[micro_positions(w, m)].tolist()
        return out

    for before, after in (((2, 8), (1, 8)), ((1, 8), (2, 4)), ((2, 4), (4, 2))):
        seen = part(*before, 0, 4) + part(*after, 4, steps)
        assert sorted(seen) == sorted(eo.order[: steps * 16].tolist()), (before, after)


def test_the_world_keeps_the_global_batch_or_says_why_it_cannot():
    w = World.of(rank=0, world_size=2, workers=1, seed=0, micro_batch=16, accumulate=2)
    assert (w.global_batch, w.accumulate, w.rank_batch) == (64, 2, 32)
    assert World.of(rank=0, world_size=4, workers=0, seed=0, micro_batch=16, global_batch=64).accumulate == 1
    one = World.of(rank=0, world_size=1, workers=0, seed=0, micro_batch=16).resized(64)
    assert one.accumulate == 4  # 2 ranks x 16 x 2 -> 1 rank x 16 x 4
    with pytest.raises(UserError, match="cannot make that with whole accumulation steps"):
        World.of(rank=0, world_size=3, workers=0, seed=0, micro_batch=16).resized(64)
    with pytest.raises(UserError, match="--global-batch-size 64 and --accumulate 3 disagree"):
        World.of(rank=0, world_size=2, workers=0, seed=0, micro_batch=16, global_batch=64, accumulate=3)
    with pytest.raises(UserError, match="not 3 rank"):
        World.of(rank=0, world_size=3, workers=0, seed=0, micro_batch=16, global_batch=64)


def test_a_readers_plan_names_its_positions_once_and_in_micro_batch_order():
    eo = epoch_order(SIZES, 0, 0, 64)
    w = World(1, 2, 2, 0, 0, 6, 24)
    order = mixed_order([SIZES], [eo.samples], 0, 0, 64)
    assert np.array_equal(order.index, eo.order) and not order.source.any()  # one source: epoch_order itself
    plan = reader_plan(w, order, 1, steps_per_epoch(eo.samples, 24), reader=1)
    micro = sorted({m for m, _ in plan.values()})
    assert micro == list(range(w.accumulate + 1, steps_per_epoch(eo.samples, 24) * w.accumulate, 2))
    assert all(sorted(s for mm, s in plan.values() if mm == m) == list(range(6)) for m in micro)


def previous_order(sizes, seed, epoch, world_size, workers, micro, buffer=1000) -> np.ndarray:
    """The order before this one, for the comparison: shards dealt to the ranks' workers, a seeded shuffle
    buffer per worker, each micro-batch from one worker (so it depended on ranks and workers)."""
    order = list(range(len(sizes)))
    random.Random(f"cxrdist-shards:{seed}:{epoch}").shuffle(order)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    streams = []
    for g in range(world_size * workers):
        rng, buf, out = random.Random(f"cxrdist-samples:{seed}:{epoch}:{g}"), [], []
        for c in (c for s in order[g :: world_size * workers] for c in range(starts[s], starts[s + 1])):
            buf.append(c)
            if len(buf) >= buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                out.append(buf.pop())
        rng.shuffle(buf)
        streams.append(out + buf)
    seq = []
    for i in range(sum(sizes) // (micro * world_size)):
        for r in range(world_size):
            seq += streams[r * workers + i % workers][(i // workers) * micro : (i // workers + 1) * micro]
    return np.asarray(seq)


def test_mixing_is_at_least_the_previous_shuffle_buffers():
    """A CheXpert-sized split (224 shards of 1,000): distinct shards per global batch and the share of
    neighbouring samples from one shard, for the previous per-worker buffers (1 rank x 8 workers, 4 x 4)
    against the window shuffle at its default (data.shuffle_window: 16,384)."""
    sizes = [1000] * 224
    shard_of = np.repeat(np.arange(224), 1000)
    before = {(r, w): mixing(previous_order(sizes, 0, 0, r, w, 64), shard_of, 64 * r) for r, w in ((1, 8), (4, 4))}
    eo = epoch_order(sizes, 0, 0, 16_384)
    after = {gb: mixing(eo.order, np.repeat(eo.shards, 1000), gb) for gb in (64, 256)}
    print("previous:", before, "window shuffle:", after)
    assert after[64]["shards_per_batch"] > 3 * before[(1, 8)]["shards_per_batch"]
    assert after[256]["shards_per_batch"] >= 0.85 * before[(4, 4)]["shards_per_batch"]
    assert all(
        a["same_shard_neighbours"] < 0.5 * b["same_shard_neighbours"] for a in after.values() for b in before.values()
    )
