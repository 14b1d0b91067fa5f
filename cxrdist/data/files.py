"""The loose-file loaders of the poster's Table 4: every image read from its original file each epoch.

The sample list is the shard folder's own: keys, labels and source paths come from the ``.json`` members of
the split's shards (image members are skipped unread), so the file loaders see exactly the samples the
shard loader sees, in the same order, whatever seed or split the packer used. Each worker reads an image
with :func:`cxrdist.imaging.read_image` (DICOM, JPEG or PNG by extension), fits it into the manifest's
square size and quantises it like packing did (uint8 for ``jpg``, 16-bit as int32 for ``png16``).

``fmt`` names the arm: ``jpeg`` for a JPEG source (CheXpert, MIMIC-CXR-JPG), ``dicom`` for a DICOM source
(MIMIC-CXR). The files read are whatever the packed source holds: ``jpeg`` on a DICOM source reads the
DICOMs (a warning says so), so compare a jpg-source folder for the jpeg arm with a dcm-source one.

Batches and rules are the shard loader's: train yields ``floor(N / (world_size * batch_size))`` full batches
on every rank (DistributedSampler with drop_last, reshuffled from ``seed + epoch``), ``start_batch`` skips
indices only; eval yields every sample once across ranks (the last batch of a rank may be short).
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
from cxrdist.data.stream import batch_generator, collate, iterate, read_shard_list
from cxrdist.errors import UserError
from cxrdist.shards.manifest import sample_meta
from cxrdist.shards.tario import iter_shard

FORMATS = ("jpeg", "dicom")


class FileError(UserError):
    """A loose image that is missing or unreadable (the message names the file)."""


@functools.lru_cache(maxsize=8)
def _index(shard_dir: str, split: str, stamp: float) -> tuple[dict, tuple[tuple[str, dict], ...]]:
    manifest, shards = read_shard_list(shard_dir, split)
    items = []
    for shard in shards:
        for name, key, members in iter_shard(shard, wanted=frozenset({"json"})):
            if "json" not in members:
                raise FileError(f"{name}: sample {key} has no .json")
            try:
                items.append((key, sample_meta(members["json"], len(manifest["labels"]))))
            except ValueError as e:
                raise FileError(f"{name}: sample {key} is unreadable: {e}") from None
    return manifest, tuple(items)


def file_index(shard_dir: str | Path, split: str) -> tuple[dict, list[tuple[str, dict]]]:
    """The manifest and ``(key, json)`` of every sample of ``split``, in shard order (cached per folder)."""
    d = Path(shard_dir)
    stamp = (d / "manifest.json").stat().st_mtime if (d / "manifest.json").exists() else 0.0
    manifest, items = _index(str(d.resolve()), split, stamp)
    return manifest, list(items)


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


class RankBatchSampler(Sampler):
    """This rank's batches of dataset indices, each index paired with its epoch and rank-local batch number
    (what the worker's augmentation is seeded from: persistent workers never see the sampler itself).

    Train: DistributedSampler(shuffle, seed + epoch, drop_last) then whole batches only; eval: indices
    ``rank, rank + world_size, ...`` (every sample once across ranks), the last batch possibly short.
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        epoch: int,
        seed: int,
        start_batch: int = 0,
    ):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.train, self.epoch, self.seed, self.start_batch = train, epoch, seed, start_batch

    def indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.n, self.world_size))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        usable = self.n // self.world_size * self.world_size
        return perm[self.rank : usable : self.world_size]

    def total_batches(self) -> int:
        per_rank = self.n // self.world_size if self.train else len(range(self.rank, self.n, self.world_size))
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.total_batches() - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        idx, bs = self.indices(), self.batch_size
        for j in range(self.start_batch, self.total_batches()):
            yield [(self.epoch, j, i) for i in idx[j * bs : (j + 1) * bs]]


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
        self.sampler: RankBatchSampler = loader.batch_sampler
        self.batch_size = self.sampler.batch_size
        self.image_size = int(manifest.get("size", 0))
        self.encoding = manifest.get("encoding", "jpg")

    def __len__(self) -> int:
        return self.length

    def restart(self, epoch: int, start_batch: int = 0, check_sha256: bool | None = None) -> FileLoader:
        """The same loader, and its persistent worker processes, for another training epoch (the sampler
        lives in this process; the workers get the epoch with every index). ``check_sha256``: files have no
        hash to check."""
        sampler = self.sampler
        if not sampler.train or not 0 <= start_batch <= sampler.total_batches():
            raise ValueError(
                f"restart(epoch={epoch}, start_batch={start_batch}) on a loader of {sampler.total_batches()}"
            )
        sampler.epoch, sampler.start_batch = epoch, start_batch
        self.length = len(sampler)
        self.samples = self.length * self.batch_size
        return self

    def close(self) -> None:
        """Stop the persistent workers now: dropping the DataLoader drops its iterator, whose finaliser shuts
        the workers down and joins them (as ShardLoader.close)."""
        self.loader = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from iterate(self.loader, FileError)


def make_file_loader(
    manifest_dir: str | Path,
    split: str,
    fmt: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    train: bool = True,
    epoch: int = 0,
    seed: int = 0,
    start_batch: int = 0,
    augment: torch.nn.Module | None = None,
    source_root: str | Path | None = None,
    pin_memory: bool = False,
    persistent: bool = False,
) -> FileLoader:
    """A loader over the original image files of a shard folder's ``split`` (same batches, same rules)."""
    if fmt not in FORMATS:
        raise UserError(f"file loader format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0:
        raise ValueError(
            f"bad loader geometry: batch_size={batch_size} rank={rank} world_size={world_size} workers={workers}"
        )
    manifest, items = file_index(manifest_dir, split)
    root = Path(source_root or manifest.get("root") or "")
    if not root.is_dir():
        raise UserError(
            f"source root {root} is not a folder: give --source-root (the dataset the shards in "
            f"{manifest_dir} were packed from)"
        )
    first = str(items[0][1].get("source", "")) if items else ""
    if first and not escapes(first) and not (root / first).exists():  # an escaping one fails when read
        raise UserError(
            f"{root / first} does not exist: is {root} the dataset the shards in "
            f"{manifest_dir} were packed from? (give --source-root)"
        )
    from cxrdist.imaging import DICOM_SUFFIXES

    dicoms = sum(str(m["source"]).lower().endswith(DICOM_SUFFIXES) for _, m in items)
    reads = "dicom" if items and dicoms == len(items) else "jpeg" if not dicoms else "mixed"
    if fmt == "jpeg" and dicoms:
        warnings.warn(
            f"--format jpeg on {manifest_dir}: its source holds DICOM files, so this loader reads "
            f"the DICOMs; pack a JPEG source for the jpeg arm",
            stacklevel=2,
        )
    elif fmt == "dicom" and reads != "dicom":
        warnings.warn(
            f"--format dicom on {manifest_dir}: its source holds non-DICOM files ({reads}); "
            f"pack a DICOM source (MIMIC-CXR) for the dicom arm",
            stacklevel=2,
        )
    sampler = RankBatchSampler(
        len(items),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        train=train,
        epoch=epoch,
        seed=seed,
        start_batch=start_batch,
    )
    if train:
        if sampler.total_batches() == 0:
            raise UserError(
                f"split {split!r} has {len(items)} samples: not one batch of {batch_size} for each "
                f"of {world_size} rank(s)"
            )
        if not 0 <= start_batch <= sampler.total_batches():
            raise ValueError(f"start_batch={start_batch} outside 0..{sampler.total_batches()}")
    elif start_batch:
        raise ValueError("start_batch is for training loaders only")
    dataset = FileDataset(items, root, int(manifest["size"]), manifest.get("encoding", "jpg"))
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(augment, seed, rank),
        pin_memory=pin_memory and torch.cuda.is_available(),
        prefetch_factor=2 if workers else None,
        persistent_workers=persistent and train and workers > 0,  # the training loader keeps its workers
    )
    length = len(sampler)
    samples = length * batch_size if train else len(sampler.indices())
    return FileLoader(loader, length=length, samples=samples, manifest=manifest, fmt=fmt, reads=reads)
