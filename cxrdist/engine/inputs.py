"""What the trainer reads: the run's shard set (opened once), its geometry, the shard or loose-file loaders
of each split, and where augmentation runs.

``augment=auto`` runs the augmentation batched on the device after transfer when training on GPUs (the
loader workers then only read and decode, so GPUs do not starve) and inside the loader workers on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxrdist import cpus, dist
from cxrdist.config import TrainConfig
from cxrdist.data.partition import steps_per_epoch
from cxrdist.data.transforms import Augment
from cxrdist.data.world import World
from cxrdist.errors import UserError
from cxrdist.shards import location, mix
from cxrdist.shards.cache import ShardCache
from cxrdist.shards.shardset import ShardSet


def open_shards(cfg: TrainConfig) -> ShardSet:
    """The run's shard set, read and checked once: a missing or empty folder, a manifest that disagrees with
    the shards, an unusable --shard-cache are one clear error here, before any rank starts."""
    d = cfg.data
    if not d.shards and not d.mix:
        raise UserError("--shards is required (a folder written by `cxrdist shard`)")
    if mix.is_mix(d.shards, d.mix):
        return open_mix(cfg)
    loc = location.parse(d.shards)
    if loc.local is None and d.format != "shards":
        raise UserError(f"--format {d.format} reads a local shard folder, not {loc}")
    shards = ShardSet.open(cfg.data.shards, cache=shard_cache(cfg, streamed=loc.local is None))
    if d.shard_cache:
        check_cache(d.shard_cache, loc, shards)
    if d.format != "shards":
        root = Path(d.source_root or shards.manifest["root"])
        if not root.is_dir():
            raise UserError(
                f"--format {d.format} reads the source images, but {root} is not a folder (pass --source-root)"
            )
    return shards


def open_mix(cfg: TrainConfig) -> ShardSet:
    """Several sources as one shard set (``cxrdist.shards.mix``): each checked as ``--shards`` alone would be."""
    d = cfg.data
    if d.format != "shards":
        raise UserError(f"--format {d.format} reads one source's own files; a mix of sources trains from shards")
    entries = mix.entries_of(d.shards, d.mix)
    streamed = any(location.parse(e.location).local is None for e in entries)
    shards = mix.open_mix(entries, shard_cache(cfg, streamed))
    if d.shard_cache:
        for e, part in zip(entries, shards.parts):
            check_cache(d.shard_cache, location.parse(e.location), part.set)
    return shards


def shard_cache(cfg: TrainConfig, streamed: bool) -> ShardCache | None:
    """``--shard-cache`` for a run that streams shards from a URL (a local folder is read in place)."""
    d = cfg.data
    return ShardCache(d.shard_cache, int(d.shard_cache_gb * 1e9)) if d.shard_cache and streamed else None


def check_cache(cache: str, loc: location.Location, shards: ShardSet) -> None:
    """--shard-cache: a usable folder with room for the largest shard (for a streamed location), or a warning
    that a local folder is read in place and the cache is not used."""
    if loc.local is not None or loc.scheme == "pipe":
        import logging

        from cxrdist.redact import redact

        what = "a local folder, read in place" if loc.local is not None else "a pipe: command (no file to cache)"
        logging.getLogger(__name__).warning(
            "--shard-cache %s: %s is %s: the cache is not used", cache, redact(str(loc)), what
        )
        return
    from cxrdist.shards.cache import check_folder

    check_folder(cache, shards.largest_shard())


def loader_workers(cfg: TrainConfig, env: dist.DistEnv, device: torch.device) -> int:
    """``--workers``, or (-1) what the rank's share of the machine supports (cxrdist.cpus.auto_workers)."""
    if cfg.data.workers >= 0:
        return cfg.data.workers
    return cpus.auto_workers(dist.threads_per_rank(env), gpu=device.type == "cuda")


def run_world(cfg: TrainConfig, env: dist.DistEnv, workers: int, devices_per_process: int = 1) -> World:
    """The run's geometry from its options (dp: one process holds the micro-batch of all its GPUs)."""
    return World.of(
        rank=env.rank,
        world_size=env.world_size,
        workers=workers,
        seed=cfg.run.seed,
        micro_batch=cfg.optim.batch_size * devices_per_process,
        global_batch=cfg.optim.global_batch_size,
        accumulate=cfg.optim.accumulate,
    )


class Loaders:
    def __init__(self, cfg: TrainConfig, world: World, device: torch.device, shards: ShardSet):
        self.cfg, self.world, self.device, self.shards = cfg, world, device, shards
        self.labels: tuple[str, ...] = shards.labels  # the model head's outputs, in order
        where = cfg.data.augment
        if where == "auto":
            where = "device" if device.type == "cuda" else "worker"
        self.where = where
        size = cfg.data.image_size
        chans = dict(in_chans=cfg.model.in_chans, channels_last=cfg.run.channels_last)
        self._train_aug = Augment(size, train=where != "none", **chans)
        self._eval_aug = Augment(size, train=False, **chans)
        self._train_loader = None  # kept across epochs: its worker processes persist
        self._hashed: set[str] = set()  # splits whose shards this process has hashed (--check-sha256 first)
        # the evaluation loaders are kept too (their workers idle while the model trains): val is read every
        # epoch, and forking a fresh set of workers for each read, from a rank that runs gloo, TensorBoard and
        # progress threads, is where validation loops hang now and then at a later read (pytorch/pytorch#75147,
        # Megatron-DeepSpeed#282; here once, rank 0 of a 2-rank CPU run at its 2nd val read)
        self._eval: dict = {}

    @property
    def workers(self) -> int:
        return self.world.workers

    def augment(self, train: bool) -> Augment:
        return self._train_aug if train else self._eval_aug

    def hash_now(self, split: str) -> bool:
        """Whether this read of ``split`` checks each shard's sha256: every read, none, or (``first``, the
        default: hashing costs ~5% of a worker's time at 256 px, `cxrdist bench loader`) the first read of
        each split in this process, a resumed run's included (the shards may have changed in between)."""
        mode = self.cfg.data.check_sha256
        first = split not in self._hashed
        self._hashed.add(split)
        return mode == "every" or (mode == "first" and first)

    def train(self, epoch: int, start_step: int = 0):
        check = self.hash_now("train")
        if self._train_loader is not None:
            return self._train_loader.restart(epoch, start_step, check)
        world, d = self.world.at_epoch(epoch), self.cfg.data
        common = dict(
            start_step=start_step,
            window=d.shuffle_window,
            augment=self._train_aug if self.where == "worker" else None,
            pin_memory=self.device.type == "cuda",
        )
        if d.format == "shards":
            from cxrdist.data.stream import train_loader

            self._train_loader = train_loader(self.shards, world, persistent=True, check_sha256=check, **common)
        else:
            from cxrdist.data.files import file_train_loader

            root = d.source_root or None
            self._train_loader = file_train_loader(self.shards, world, d.format, source_root=root, **common)
        return self._train_loader

    def eval(self, split: str, keep: bool = False):
        """This rank's evaluation loader of ``split``; ``keep``: the same loader and workers for every later
        read of it (the trainer's val, read every epoch)."""
        check, pin = self.hash_now(split), self.device.type == "cuda"
        if self.cfg.data.format == "shards":
            from cxrdist.data.stream import eval_loader

            if split in self._eval:
                return self._eval[split].reread(check)
            loader = eval_loader(self.shards, split, self.world, pin_memory=pin, check_sha256=check, persistent=keep)
            if keep:
                self._eval[split] = loader
            return loader
        from cxrdist.data.files import file_eval_loader

        root = self.cfg.data.source_root or None
        return file_eval_loader(self.shards, split, self.world, self.cfg.data.format, source_root=root, pin_memory=pin)

    def close(self) -> None:
        """Shut the training and evaluation loaders' persistent workers down (before the process ends)."""
        for loader in (self._train_loader, *self._eval.values()):
            if loader is not None:
                loader.close()
        self._train_loader, self._eval = None, {}

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: whole global batches of the training split."""
        n = steps_per_epoch(self.shards.epoch_samples(), self.world.global_batch)
        if n == 0:
            w = self.world
            raise UserError(
                f"{self.shards.name}: {self.shards.epoch_samples()} training samples per epoch are fewer than one "
                f"global batch of {w.global_batch} ({w.world_size} rank(s) x {w.micro_batch} x {w.accumulate} step(s))"
            )
        return n

    def samples(self, split: str) -> int:
        return self.shards.samples(split)

    def meta(self) -> dict:
        """What `cxrdist predict` needs to see files the way training saw them."""
        return self.shards.meta() | {"image_size": self.cfg.data.image_size}
