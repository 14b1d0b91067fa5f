"""One reader's training micro-batches: each source's epoch shards walked in reading order, start to end.

``plan`` (``data.partition.reader_plan``) maps each (source, concatenated position) this reader needs to its
(micro-batch, slot). For every source the reader opens the shards from the first that holds one of its
positions to the last, in that source's reading order (``data.shuffle.EpochOrder``), copies out the bytes of
its own samples only (``tario.iter_shard``'s ``take``: the others are skipped unread) and yields each
micro-batch, in order, as soon as its last sample is in. A source is read only as far as the next incomplete
micro-batch needs (a mixed run walks its sources side by side), so the reader holds at most the raw samples
of its micro-batches that are still incomplete: about one shuffle window's worth per source divided by the
readers of the job. ``hashes(s, q)`` says whether it checks the sha256 of source s's shard at reading
position ``q`` (one reader per shard and epoch); every shard it opens is read to its end, where that check
and the sample count check happen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cxrdist.data.shuffle import EpochOrder
from cxrdist.shards.tario import RawSample, Shard, ShardError, iter_shard

Source = tuple[Sequence[Shard], EpochOrder]  # a source's shards (its split's list) and its epoch order


def walk(shards: Sequence[Shard], eo: EpochOrder, wanted: np.ndarray,
         hashes: Callable[[int], bool]) -> Iterator[tuple[int, RawSample]]:  # fmt: skip
    """``(concatenated position, raw sample)`` for the sorted positions ``wanted``, in order, reading the
    shards that hold them (and any between) start to end."""
    if not len(wanted):
        return
    first, last = np.searchsorted(eo.starts, [wanted[0], wanted[-1]], side="right") - 1
    for q in range(int(first), int(last) + 1):
        base, end = int(eo.starts[q]), int(eo.starts[q + 1])
        lo, hi = np.searchsorted(wanted, [base, end])
        mine = set((wanted[lo:hi] - base).tolist())
        shard = shards[int(eo.shards[q])]
        for i, sample in enumerate(iter_shard(shard, check_sha256=hashes(q), take=mine.__contains__)):
            if i in mine:
                yield base + i, sample


def read_micro_batches(
    sources: Sequence[Source],
    plan: dict[tuple[int, int], tuple[int, int]],
    micro_batch: int,
    hashes: Callable[[int, int], bool] = lambda s, q: False,
) -> Iterator[tuple[int, list[tuple[int, RawSample]]]]:
    """``(micro-batch, its (source, raw sample) pairs in slot order)`` for every micro-batch in ``plan``, in
    increasing order."""
    if not plan:
        return
    wanted = [np.sort(np.fromiter((c for s2, c in plan if s2 == s), np.int64)) for s in range(len(sources))]
    streams = [
        walk(shards, eo, w, lambda q, s=s: hashes(s, q)) for s, ((shards, eo), w) in enumerate(zip(sources, wanted))
    ]
    owed: dict[int, Counter] = {}  # micro-batch -> source -> samples still to come
    for (s, _), (m, _) in plan.items():
        owed.setdefault(m, Counter())[s] += 1
    pending: dict[int, list] = {m: [None] * micro_batch for m in owed}
    for m in sorted(owed):
        while owed[m]:
            s = next(iter(owed[m]))
            try:
                c, sample = next(streams[s])
            except StopIteration:
                names = ", ".join(x.name for x in sources[s][0])
                raise ShardError(
                    f"a loader reader finished its shards with micro-batch {m} incomplete ({names})"
                ) from None
            m2, slot = plan[(s, c)]
            pending[m2][slot] = (s, sample)
            owed[m2][s] -= 1
            if not owed[m2][s]:
                del owed[m2][s]
        yield m, pending.pop(m)
    for stream in streams:  # to the end of each opened shard: its sha256 and sample count are checked there
        for _ in stream:
            raise ShardError("a loader reader met a sample it did not plan for")
