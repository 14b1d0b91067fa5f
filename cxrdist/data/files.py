"""The loose-file loaders of the poster's Table 4: every image read from its original file each epoch.

The sample list is the shard set's own: keys, labels and source paths come from the ``.json`` members of
the split's shards (image members are skipped unread), so the file loaders see exactly the samples the
shard loader sees, whatever seed or split the packer used. Each worker reads an image with
:func:`cxrdist.imaging.read_image` (DICOM, JPEG or PNG by extension), fits it into the manifest's square
size and quantises it like packing did (uint8 for ``jpg``, 16-bit as int32 for ``png16``).

``fmt`` names the arm: ``jpeg`` for a JPEG source (CheXpert, MIMIC-CXR-JPG), ``dicom`` for a DICOM source
(MIMIC-CXR). The files read are whatever the packed source holds: ``jpeg`` on a DICOM source reads the
DICOMs (a warning says so), so compare a jpg-source folder for the jpeg arm with a dcm-source one.

Batches and rules are the shard loader's, from the same two values (``ShardSet``, ``World``): training takes
the epoch's global batches of ``data.shuffle``/``data.partition`` (files are read at random, so any micro-batch
is one lookup away; the global batches equal the shard loader's for the same seed and window), a resumed
epoch starts at its next step; evaluation yields every sample once across ranks (the last batch of a rank
may be short).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxrdist.contain import OUTSIDE, Outside, escapes, within
from cxrdist.data.partition import micro_positions, steps_per_epoch
from cxrdist.data.shuffle import epoch_order
from cxrdist.data.stream import WINDOW, batch_generator, collate, iterate
from cxrdist.data.world import World
from cxrdist.errors import UserError
from cxrdist.shards.manifest import sample_meta
from cxrdist.shards.shardset import ShardSet
from cxrdist.shards.tario import iter_shard

FORMATS = ("jpeg", "dicom")


class FileError(UserError):
    """A loose image that is missing or unreadable (the message names the file)."""


@functools.lru_cache(maxsize=8)
def _index(shards: ShardSet, split: str) -> tuple[tuple[str, dict], ...]:
    items = []
    for shard in shards.shards(split):
        for name, key, members in iter_shard(shard, wanted=frozenset({"json"})):
            if "json" not in members:
                raise FileError(f"{name}: sample {key} has no .json")
            try:
                items.append((key, sample_meta(members["json"], len(shards.labels))))
            except ValueError as e:
                raise FileError(f"{name}: sample {key} is unreadable: {e}") from None
    return tuple(items)


def file_index(shards: ShardSet, split: str) -> list[tuple[str, dict]]:
    """``(key, json)`` of every sample of ``split``, in the manifest's shard order (cached per shard set)."""
    return list(_index(shards, split))


class FileDataset(Dataset):
    """Item ``(epoch, batch_index, i)`` -> the sample's key, quantised image and json (read in the worker)."""

    def __init__(self, items: list[tuple[str, dict]], root: Path, size: int, encoding: str):
        self.items, self.root, self.size, self.encoding = items, root, size, encoding

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: tuple[int, int, int]) -> tuple[int, int, str, np.ndarray, dict]:
        from cxrdist import imaging

        epoch, batch_index, i = item
        key, meta = self.items[i]
        try:
            path = within(self.root, str(meta.get("source", "")))
        except Outside:
            raise FileError(f"sample {key}: its source {meta.get('source')!r} is {OUTSIDE} ({self.root})") from None
        try:
            img = imaging.fit_square(imaging.read_image(path), self.size)
        except FileNotFoundError:
            raise FileError(f"{path}: no such file (sample {key}; is the source root right?)") from None
        except (imaging.UnusableImage, OSError, ValueError) as e:
            raise FileError(f"{path}: unreadable (sample {key}): {e}") from None
        return epoch, batch_index, key, quantise(img, self.encoding), meta


def quantise(img01: np.ndarray, encoding: str) -> np.ndarray:
    """float [0, 1] -> the packed pixel type: uint8 (jpg) or uint16 (png16)."""
    peak, dtype = (255.0, np.uint8) if encoding == "jpg" else (65535.0, np.uint16)
    return np.rint(np.clip(img01, 0.0, 1.0) * peak).astype(dtype)


class TrainSampler(Sampler):
    """This rank's training micro-batches of an epoch as dataset indices, each paired with its epoch and
    micro-batch number (what the worker's augmentation is seeded from: persistent workers never see the
    sampler itself). The positions are the shard loader's (``data.partition.micro_positions``), mapped from
    the epoch's reading order to the manifest's order of the samples."""

    def __init__(self, sizes: list[int], world: World, *, start_step: int, window: int):
        self.sizes, self.world, self.start_step, self.window = sizes, world, start_step, window
        self.steps = steps_per_epoch(sum(sizes), world.global_batch)
        self.train = True

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.world.accumulate

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        w = self.world
        eo = epoch_order(self.sizes, w.seed, w.epoch, self.window)
        first = np.concatenate([[0], np.cumsum(self.sizes)])  # manifest order: where each shard starts
        for m in range(self.start_step * w.accumulate, self.steps * w.accumulate):
            shard, idx = eo.locate(eo.order[micro_positions(w, m)])
            yield [(w.epoch, m, int(i)) for i in (first[shard] + idx).tolist()]


class EvalSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` (every sample once across ranks), the last batch short."""

    def __init__(self, n: int, world: World):
        self.n, self.world, self.train = n, world, False

    def indices(self) -> list[int]:
        return list(range(self.world.rank, self.n, self.world.world_size))

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.world.micro_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        idx, bs = self.indices(), self.world.micro_batch
        for j in range(len(self)):
            yield [(0, j, i) for i in idx[j * bs : (j + 1) * bs]]


class Collate:
    """Stack a batch (in the worker) and, for CPU training, augment it there with a per-batch seed."""

    def __init__(self, augment: torch.nn.Module | None, seed: int, rank: int):
        self.augment, self.seed, self.rank = augment, seed, rank

    def __call__(self, samples: list[tuple[int, int, str, np.ndarray, dict]]) -> dict[str, Any]:
        batch = collate([s[2] for s in samples], [s[3] for s in samples], [s[4] for s in samples])
        if self.augment is not None:
            with torch.no_grad():
                gen = batch_generator(self.seed, samples[0][0], self.rank, samples[0][1])
                batch["image"] = self.augment(batch["image"], generator=gen)
        return batch


class FileLoader:
    """Iterable over this rank's batches for one epoch; ``len()`` is the number of batches it yields."""

    def __init__(self, loader: DataLoader, *, length: int, samples: int, manifest: dict, fmt: str, reads: str):
        self.loader, self.length, self.samples, self.manifest = loader, length, samples, manifest
        self.fmt, self.reads = fmt, reads
        self.sampler: TrainSampler | EvalSampler = loader.batch_sampler
        self.batch_size = self.sampler.world.micro_batch
        self.image_size = int(manifest.get("size", 0))
        self.encoding = manifest.get("encoding", "jpg")

    def __len__(self) -> int:
        return self.length

    def restart(self, epoch: int, start_step: int = 0, check_sha256: bool | None = None) -> FileLoader:
        """The same loader, and its persistent worker processes, for another training epoch (the sampler
        lives in this process; the workers get the epoch with every index). ``check_sha256``: files have no
        hash to check."""
        sampler = self.sampler
        if not sampler.train or not 0 <= start_step <= sampler.steps:
            raise ValueError(f"restart(epoch={epoch}, start_step={start_step}) on a loader of {sampler.steps} steps")
        sampler.world, sampler.start_step = sampler.world.at_epoch(epoch), start_step
        self.length = len(sampler)
        self.samples = self.length * self.batch_size
        return self

    def close(self) -> None:
        """Stop the persistent workers now: dropping the DataLoader drops its iterator, whose finaliser shuts
        the workers down and joins them (as ShardLoader.close)."""
        self.loader = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from iterate(self.loader, FileError)


def _dataset(shards: ShardSet, split: str, fmt: str, source_root) -> tuple[list, FileDataset, str]:
    """The split's samples, the dataset reading their files, and what the files are (jpeg | dicom | mixed)."""
    if fmt not in FORMATS:
        raise UserError(f"file loader format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    items = file_index(shards, split)
    root = Path(source_root or shards.manifest.get("root") or "")
    where = shards.name
    if not root.is_dir():
        raise UserError(
            f"source root {root} is not a folder: give --source-root (the dataset the shards in {where} were "
            "packed from)"
        )
    first = str(items[0][1].get("source", "")) if items else ""
    if first and not escapes(first) and not (root / first).exists():  # an escaping one fails when read
        raise UserError(
            f"{root / first} does not exist: is {root} the dataset the shards in {where} were packed from? "
            "(give --source-root)"
        )
    from cxrdist.imaging import DICOM_SUFFIXES

    dicoms = sum(str(m["source"]).lower().endswith(DICOM_SUFFIXES) for _, m in items)
    reads = "dicom" if items and dicoms == len(items) else "jpeg" if not dicoms else "mixed"
    if fmt == "jpeg" and dicoms:
        warnings.warn(
            f"--format jpeg on {where}: its source holds DICOM files, so this loader reads the DICOMs; pack a "
            "JPEG source for the jpeg arm",
            stacklevel=3,
        )
    elif fmt == "dicom" and reads != "dicom":
        warnings.warn(
            f"--format dicom on {where}: its source holds non-DICOM files ({reads}); pack a DICOM source "
            "(MIMIC-CXR) for the dicom arm",
            stacklevel=3,
        )
    return items, FileDataset(items, root, int(shards.manifest["size"]), shards.manifest.get("encoding", "jpg")), reads


def file_train_loader(shards: ShardSet, world: World, fmt: str, *, start_step: int = 0, window: int = WINDOW,
                      augment: torch.nn.Module | None = None, source_root=None, pin_memory: bool = False,
                      persistent: bool = True) -> FileLoader:  # fmt: skip
    """This rank's training micro-batches from the original files (the shard loader's global batches)."""
    items, dataset, reads = _dataset(shards, "train", fmt, source_root)
    sampler = TrainSampler(shards.sizes("train"), world, start_step=start_step, window=window)
    if sampler.steps == 0:
        raise UserError(f"split 'train' has {len(items)} samples: not one global batch of {world.global_batch}")
    if not 0 <= start_step <= sampler.steps:
        raise ValueError(f"start_step={start_step} outside 0..{sampler.steps}")
    loader = _dataloader(dataset, sampler, world, augment, pin_memory, persistent)
    return FileLoader(loader, length=len(sampler), samples=len(sampler) * world.micro_batch,
                      manifest=shards.manifest, fmt=fmt, reads=reads)  # fmt: skip


def file_eval_loader(shards: ShardSet, split: str, world: World, fmt: str, *, source_root=None,
                     pin_memory: bool = False) -> FileLoader:  # fmt: skip
    """This rank's share of ``split`` from the original files, every sample once across ranks."""
    items, dataset, reads = _dataset(shards, split, fmt, source_root)
    sampler = EvalSampler(len(items), world)
    loader = _dataloader(dataset, sampler, world, None, pin_memory, False)
    return FileLoader(loader, length=len(sampler), samples=len(sampler.indices()), manifest=shards.manifest,
                      fmt=fmt, reads=reads)  # fmt: skip


def _dataloader(dataset, sampler, world: World, augment, pin_memory: bool, persistent: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=world.workers,
        collate_fn=Collate(augment, world.seed, world.rank),
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=2 if world.workers else None,
        persistent_workers=persistent and world.workers > 0,  # the training loader keeps its workers
    )
