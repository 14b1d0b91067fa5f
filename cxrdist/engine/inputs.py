"""What the trainer reads: shard or loose-file loaders for each split, and where augmentation runs.

``augment=auto`` runs the augmentation batched on the device after transfer when training on GPUs (the
loader workers then only read and decode, so GPUs do not starve) and inside the loader workers on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxrdist import cpus, dist
from cxrdist.config import TrainConfig
from cxrdist.data.transforms import Augment
from cxrdist.errors import UserError
from cxrdist.shards import location
from cxrdist.shards.cache import ShardCache
from cxrdist.shards.manifest import load_manifest, shard_paths, split_samples


def check_inputs(cfg: TrainConfig) -> dict:
    """Missing or empty shard folder, a manifest that disagrees with the shards: a clear error now."""
    if not cfg.data.shards:
        raise UserError("--shards is required (a folder written by `cxrdist shard`)")
    loc = location.parse(cfg.data.shards)
    folder = loc.local or loc.text
    manifest = load_manifest(folder)  # a URL location: every shard listed there (sizes: checked as they stream)
    if loc.local is None and cfg.data.format != "shards":
        raise UserError(f"--format {cfg.data.format} reads a local shard folder, not {loc}")
    if cfg.data.shard_cache:
        check_cache(cfg.data.shard_cache, loc, manifest)
    for split in ("train", "val", "test"):
        if split_samples(manifest, split) == 0:
            raise UserError(f"{folder}/manifest.json: split {split!r} has no samples")
        if loc.local is None:
            continue
        for entry, path in zip(manifest["splits"][split]["shards"], shard_paths(manifest, folder, split)):
            if not path.is_file():
                raise UserError(f"{path}: listed in manifest.json but missing (run `cxrdist verify {folder}`)")
            if path.stat().st_size != entry["bytes"]:
                raise UserError(
                    f"{path}: {path.stat().st_size} bytes on disk, manifest.json says {entry['bytes']} "
                    f"(run `cxrdist verify {folder}`)"
                )
    if cfg.data.format != "shards":
        root = Path(cfg.data.source_root or manifest["root"])
        if not root.is_dir():
            raise UserError(
                f"--format {cfg.data.format} reads the source images, but {root} is not a folder (pass --source-root)"
            )
    return manifest


def check_cache(cache: str, loc: location.Location, manifest: dict) -> None:
    """--shard-cache: a usable folder with room for the largest shard (for a streamed location), or a warning
    that a local folder is read in place and the cache is not used."""
    if loc.local is not None or loc.scheme == "pipe":
        import logging

        what = "a local folder, read in place" if loc.local is not None else "a pipe: command (no file to cache)"
        from cxrdist.redact import redact

        logging.getLogger(__name__).warning(
            "--shard-cache %s: %s is %s: the cache is not used", cache, redact(str(loc)), what
        )
        return
    from cxrdist.shards.cache import check_folder

    sizes = [int(s.get("bytes") or 0) for split in manifest["splits"].values() for s in split.get("shards", [])]
    check_folder(cache, max(sizes, default=0))


class Loaders:
    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device, batch_size: int):
        self.cfg, self.env, self.device, self.batch_size = cfg, env, device, batch_size
        loc = location.parse(cfg.data.shards)
        self.folder: Path | str = loc.local or loc.text  # a URL location is streamed
        self.manifest = load_manifest(self.folder)
        self.labels: tuple[str, ...] = tuple(self.manifest["labels"])  # the model head's outputs, in order
        where = cfg.data.augment
        if where == "auto":
            where = "device" if device.type == "cuda" else "worker"
        self.where = where
        size = cfg.data.image_size
        chans = dict(in_chans=cfg.model.in_chans, channels_last=cfg.run.channels_last)
        self._train_aug = Augment(size, train=where != "none", **chans)
        self._eval_aug = Augment(size, train=False, **chans)
        self.workers = (
            cfg.data.workers
            if cfg.data.workers >= 0
            else cpus.auto_workers(dist.threads_per_rank(env), gpu=device.type == "cuda")
        )
        self._train_loader = None  # kept across epochs: its worker processes persist (shards)
        self._hashed: set[str] = set()  # splits whose shards this process has hashed (--check-sha256 first)
        d = cfg.data
        self.cache = ShardCache(d.shard_cache, int(d.shard_cache_gb * 1e9)) if d.shard_cache else None

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

    def _make(self, split: str, *, train: bool, check_sha256: bool, epoch: int = 0, start_batch: int = 0, augment=None):
        common = dict(
            batch_size=self.batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            workers=self.workers,
            train=train,
            epoch=epoch,
            seed=self.cfg.run.seed,
            start_batch=start_batch,
            augment=augment,
            pin_memory=self.device.type == "cuda",
        )
        if self.cfg.data.format == "shards":
            from cxrdist.data.stream import make_loader

            return make_loader(
                self.folder,
                split,
                shuffle_buffer=self.cfg.data.shuffle_buffer,
                persistent=train,
                check_sha256=check_sha256,
                cache=self.cache,
                finish_streamed=self.cfg.data.check_sha256 != "off",
                **common,
            )
        from cxrdist.data.files import make_file_loader

        root = self.cfg.data.source_root or None
        return make_file_loader(self.folder, split, self.cfg.data.format, source_root=root, persistent=train, **common)

    def train(self, epoch: int, start_batch: int = 0):
        return self._train(epoch, start_batch, self.hash_now("train"))

    def _train(self, epoch: int, start_batch: int, check_sha256: bool):
        if self._train_loader is not None and hasattr(self._train_loader, "restart"):
            return self._train_loader.restart(epoch, start_batch, check_sha256)
        augment = self._train_aug if self.where == "worker" else None
        self._train_loader = self._make(
            "train", train=True, check_sha256=check_sha256, epoch=epoch, start_batch=start_batch, augment=augment
        )
        return self._train_loader

    def eval(self, split: str):
        return self._make(split, train=False, check_sha256=self.hash_now(split))

    def close(self) -> None:
        """Shut the training loader's persistent workers down (before the process ends)."""
        if self._train_loader is not None and hasattr(self._train_loader, "close"):
            self._train_loader.close()
        self._train_loader = None

    def steps_per_epoch(self) -> int:
        n = len(self._train(0, 0, check_sha256=True))  # planning only: hashing is decided per epoch
        if n == 0:
            raise UserError(
                f"{self.folder}: {split_samples(self.manifest, 'train')} training samples are fewer "
                f"than one global batch ({self.batch_size} x {self.env.world_size} ranks)"
            )
        return n

    def samples(self, split: str) -> int:
        return split_samples(self.manifest, split)

    def meta(self) -> dict:
        """What `cxrdist predict` needs to see files the way training saw them."""
        return {
            "size": self.manifest["size"],
            "encoding": self.manifest["encoding"],
            "image_size": self.cfg.data.image_size,
            "labels": list(self.labels),
        }
