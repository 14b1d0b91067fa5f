"""An epoch's training order, a function of the shard sizes, the seed and the epoch only.

The shards are shuffled from ``(seed, epoch)`` and their samples concatenated ("concatenated positions"
0..N-1, the order a reader meets them in); the samples are then shuffled within consecutive windows of
``window`` positions. Position ``p`` of the epoch is concatenated position ``order[p]``; global batch ``b``
is positions ``b * G .. (b + 1) * G - 1``. Nothing here depends on ranks, loader workers or accumulation
(``data.partition`` cuts the global batches for them), so the same experiment sees the same global
batches on any cluster.

Why windows and not one global permutation: a reader walks the shards in order, start to end (a streamed
shard is never read at random), and holds at most one window of its own samples; samples more than a
window apart in the concatenated order never meet in a global batch. ``tests/test_order.py`` measures the
mixing against the earlier per-worker shuffle buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _rng(seed: int, epoch: int, what: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([abs(seed), abs(epoch), what])))


@dataclass(frozen=True)
class EpochOrder:
    shards: np.ndarray  # shard indices (into the split's shard list) in reading order
    starts: np.ndarray  # concatenated position where each shard in reading order starts (len: shards + 1)
    order: np.ndarray  # order[p]: the concatenated position of the epoch's p-th sample

    @property
    def samples(self) -> int:
        return int(self.starts[-1])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated positions -> (shard index into the split's list, sample index within that shard)."""
        i = np.searchsorted(self.starts, positions, side="right") - 1
        return self.shards[i], positions - self.starts[i]


def epoch_order(sizes: Sequence[int], seed: int, epoch: int, window: int, source: int = 0) -> EpochOrder:
    """The epoch's order over shards of ``sizes`` samples (see the module docstring); ``source``: which
    source of a mixed run (each draws its own streams; source 0's are those of an unmixed run)."""
    shards = _rng(seed, epoch, 2 * source).permutation(len(sizes)) if len(sizes) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64)[shards])]).astype(np.int64)
    n = int(starts[-1])
    keys = np.arange(n, dtype=np.int64) // max(1, window) + _rng(seed, epoch, 2 * source + 1).random(n)
    return EpochOrder(shards, starts, np.argsort(keys, kind="stable"))


@dataclass(frozen=True)
class MixedOrder:
    """An epoch over one or more sources: position ``p`` is concatenated position ``index[p]`` of source
    ``source[p]``, in that source's own ``EpochOrder`` (``parts``)."""

    parts: tuple[EpochOrder, ...]
    source: np.ndarray  # int64, per epoch position
    index: np.ndarray  # int64, per epoch position: a concatenated position of its source

    @property
    def samples(self) -> int:
        return len(self.source)


def mixed_order(sizes: Sequence[Sequence[int]], counts: Sequence[int], seed: int, epoch: int,
                window: int) -> MixedOrder:  # fmt: skip
    """The epoch's order over several sources: source ``s`` (shards of ``sizes[s]`` samples) gives the first
    ``counts[s]`` samples of its own shuffled order (all of them, or fewer: a weighted mix), interleaved so that
    every stretch of the epoch holds each source in proportion to its count.

    The interleaving is earliest-deadline-first: the i-th sample of source s is due at ``(i + 1) / counts[s]``
    and the epoch takes samples by due time (ties: the lower source first). Each source's samples stay in its
    own order (a reader walks each source's shards start to end), and any global batch holds
    ``G * counts[s] / sum(counts)`` of source s to within 2 samples (``tests/test_mix.py`` checks the bound).
    With one source this is ``epoch_order`` itself."""
    parts = tuple(epoch_order(sz, seed, epoch, window, source=s) for s, sz in enumerate(sizes))
    for s, (part, n) in enumerate(zip(parts, counts, strict=True)):
        if not 0 <= n <= part.samples:
            raise ValueError(f"source {s}: {n} samples asked of {part.samples}")
    if len(parts) == 1:
        n = int(counts[0])
        return MixedOrder(parts, np.zeros(n, np.int64), parts[0].order[:n].astype(np.int64))
    due = np.concatenate([(np.arange(n, dtype=np.float64) + 1) / n for n in counts])
    source = np.concatenate([np.full(n, s, np.int64) for s, n in enumerate(counts)])
    nth = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    by_due = np.argsort(due, kind="stable")  # sources are concatenated in order: ties go to the lower one
    source, nth = source[by_due], nth[by_due]
    index = np.empty_like(nth)
    for s, part in enumerate(parts):
        mine = source == s
        index[mine] = part.order[nth[mine]]
    return MixedOrder(parts, source, index)


def mixing(order: np.ndarray, shard_of: np.ndarray, batch: int) -> dict:
    """How well an order mixes (for comparing shuffles): the mean number of distinct shards per batch of
    ``batch`` consecutive samples, and the share of neighbouring samples that come from the same shard."""
    shard_seq = shard_of[order]
    full = len(shard_seq) // batch * batch
    per_batch = [len(np.unique(b)) for b in shard_seq[:full].reshape(-1, batch)] if full else [0]
    return {
        "shards_per_batch": float(np.mean(per_batch)),
        "same_shard_neighbours": float(np.mean(shard_seq[1:] == shard_seq[:-1])) if len(shard_seq) > 1 else 0.0,
    }
