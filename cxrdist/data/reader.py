"""One reader's training micro-batches: the epoch's shards walked in reading order, start to end.

``plan`` (``data.partition.reader_plan``) maps each concatenated position this reader needs to its
(micro-batch, slot). The reader opens the shards from the first that holds one of its positions to the last,
in the epoch's reading order (``data.shuffle.EpochOrder``), copies out the bytes of its own samples only
(``tario.iter_shard``'s ``take``: the others are skipped unread) and yields each micro-batch, in order, as soon
as its last sample is in. It holds at most the raw samples of its micro-batches that are still incomplete:
about one shuffle window's worth divided by the readers of the job. ``hashes(q)`` says whether it checks the
sha256 of the shard at reading position ``q`` (one reader per shard and epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cxrdist.data.shuffle import EpochOrder
from cxrdist.shards.tario import RawSample, Shard, ShardError, iter_shard


def read_micro_batches(
    shards: Sequence[Shard],
    eo: EpochOrder,
    plan: dict[int, tuple[int, int]],
    micro_batch: int,
    hashes: Callable[[int], bool] = lambda q: False,
) -> Iterator[tuple[int, list[RawSample]]]:
    """``(micro-batch, its raw samples in slot order)`` for every micro-batch in ``plan``, in increasing order."""
    if not plan:
        return
    positions = np.fromiter(plan, dtype=np.int64, count=len(plan))
    first, last = np.searchsorted(eo.starts, [positions.min(), positions.max()], side="right") - 1
    order = sorted({m for m, _ in plan.values()})
    pending: dict[int, list] = {m: [None] * micro_batch for m in order}
    missing = {m: micro_batch for m in order}
    nxt = 0
    for q in range(int(first), int(last) + 1):
        base, end = int(eo.starts[q]), int(eo.starts[q + 1])
        mine = {c - base for c in range(base, end) if c in plan}
        shard = shards[int(eo.shards[q])]
        for i, sample in enumerate(iter_shard(shard, check_sha256=hashes(q), take=mine.__contains__)):
            if i not in mine:
                continue
            m, slot = plan[base + i]
            pending[m][slot] = sample
            missing[m] -= 1
            while nxt < len(order) and missing[order[nxt]] == 0:  # in order, as soon as complete
                yield order[nxt], pending.pop(order[nxt])
                nxt += 1
    if nxt != len(order):
        raise ShardError(
            f"a loader reader finished its shards with {len(order) - nxt} micro-batch(es) incomplete "
            f"({', '.join(s.name for s in shards)})"
        )
