"""Who trains which samples: an epoch's global batches (``data.shuffle``) cut for ranks, accumulation
steps and the readers of each rank.

Global batch ``b`` is epoch positions ``[b * G, (b + 1) * G)``. Rank ``r`` trains, at micro-step ``a`` of that
optimizer step, positions ``b * G + (a * R + r) * B`` .. ``+ B - 1`` (R ranks, micro-batch B): every rank
the same number of samples, each position once. A rank's micro-batches are numbered ``m = b * A + a``; its
DataLoader takes them from its readers in turn, so reader ``w`` makes the micro-batches ``m`` with
``(m - m0) % W == w`` from the first one of this read, ``m0`` (a resumed epoch starts mid-way).
"""

from __future__ import annotations

import numpy as np

from cxrdist.data.shuffle import MixedOrder
from cxrdist.data.world import World


def steps_per_epoch(samples: int, global_batch: int) -> int:
    """Optimizer steps in an epoch: whole global batches (the tail that does not fill one waits for the
    next epoch's shuffle)."""
    return samples // global_batch


def micro_positions(world: World, micro: int) -> np.ndarray:
    """The epoch positions of this rank's micro-batch ``micro`` (= step x accumulate + micro-step)."""
    step, a = divmod(micro, world.accumulate)
    start = step * world.global_batch + (a * world.world_size + world.rank) * world.micro_batch
    return np.arange(start, start + world.micro_batch, dtype=np.int64)


def reader_micro_batches(world: World, first_step: int, steps: int, reader: int) -> range:
    """The micro-batches reader ``reader`` of this rank makes, in order, for optimizer steps
    ``first_step .. steps - 1``."""
    m0, end = first_step * world.accumulate, steps * world.accumulate
    return range(m0 + reader, end, world.readers)


def reader_plan(world: World, order: MixedOrder, first_step: int, steps: int, reader: int) -> dict[tuple, tuple]:
    """What one reader needs, keyed by (source, concatenated position in it): ``{(s, c): (micro-batch, slot)}``."""
    need = {}
    for m in reader_micro_batches(world, first_step, steps, reader):
        at = micro_positions(world, m)
        for slot, sc in enumerate(zip(order.source[at].tolist(), order.index[at].tolist())):
            need[sc] = (m, slot)
    return need
