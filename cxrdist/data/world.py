"""The geometry of a training run, as one value: who this rank is, how many there are, how each rank reads,
and the global batch every optimizer step trains on.

``global_batch`` = ``micro_batch`` x ``world_size`` x ``accumulate``: the global batch is the experiment
(its samples are fixed by ``data.shuffle.epoch_order``); ranks, micro-batch and accumulation are how a
cluster fits it. A run resumed on another number of ranks keeps the global batch and adjusts the
accumulation (``World.resized``), or is refused when that cannot be done exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cxrdist.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    workers: int = 0  # loader processes per rank (0: read in the rank itself)
    seed: int = 0
    epoch: int = 0
    micro_batch: int = 1  # samples per rank per forward/backward
    global_batch: int = 1  # samples per optimizer step, all ranks and micro-steps

    def __post_init__(self):
        if not (0 <= self.rank < self.world_size) or self.micro_batch < 1 or self.workers < 0:
            raise ValueError(f"bad geometry: {self}")
        if self.global_batch % (self.micro_batch * self.world_size):
            raise UserError(
                f"a global batch of {self.global_batch} is not {self.world_size} rank(s) x a micro-batch of "
                f"{self.micro_batch} x a whole number of accumulation steps"
            )

    @property
    def accumulate(self) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def readers(self) -> int:
        """The processes that read for this rank: its workers, or the rank itself."""
        return max(1, self.workers)

    @property
    def rank_batch(self) -> int:
        """Samples this rank trains on per optimizer step."""
        return self.micro_batch * self.accumulate

    def at_epoch(self, epoch: int) -> World:
        return replace(self, epoch=epoch)

    @classmethod
    def of(cls, *, rank: int, world_size: int, workers: int, seed: int, micro_batch: int,
           global_batch: int = 0, accumulate: int = 1) -> World:  # fmt: skip
        """From the run's options: ``global_batch`` when given (0: micro-batch x ranks x ``accumulate``)."""
        if global_batch and accumulate != 1 and global_batch != micro_batch * world_size * accumulate:
            raise UserError(
                f"--global-batch-size {global_batch} and --accumulate {accumulate} disagree: {world_size} rank(s) x "
                f"--batch-size {micro_batch} x {accumulate} = {micro_batch * world_size * accumulate}"
            )
        gb = global_batch or micro_batch * world_size * max(1, accumulate)
        return cls(rank, world_size, workers, seed, 0, micro_batch, gb)

    def resized(self, global_batch: int) -> World:
        """This geometry continuing a run whose global batch was ``global_batch`` (a resume on another number
        of ranks): the accumulation is what keeps it, or a UserError says why it cannot be kept."""
        if global_batch == self.global_batch:
            return self
        per_step = self.micro_batch * self.world_size
        if global_batch % per_step:
            raise UserError(
                f"the run trained on global batches of {global_batch}; {self.world_size} rank(s) x --batch-size "
                f"{self.micro_batch} cannot make that with whole accumulation steps: choose --batch-size so that "
                f"{global_batch} / ({self.world_size} x batch) is a whole number"
            )
        return replace(self, global_batch=global_batch)
