"""The shard loader: WebDataset-layout shards read for DDP (not webdataset's pipeline: see below).

Every rank runs ``workers`` loader processes; together they are ``world_size * workers`` *global workers*.
Global worker ``g = rank * workers + w`` reads the shards ``order[g::G]`` (the order is shuffled per epoch
from ``(seed, epoch)`` for training), or, when there are fewer shards than global workers, every shard while
keeping every ``G``-th sample (``g``, ``g + G``, ...), so that each sample belongs to exactly one worker.

Workers read raw samples with the one tar reader (``cxrdist.shards.tario``), shuffle the *raw*
bytes in a seeded buffer, drop the samples a resumed run has already seen, and only then decode (explicit
decoders: ``.jpg``/``.png`` through :func:`cxrdist.imaging.decode`, ``.json`` through ``json.loads``; every
other member, ``.pickle``/``.pyd`` included, is ignored and never unpickled) and collate whole batches.

Training: every rank yields ``floor(train_samples / (world_size * batch_size))`` full batches. The torch
DataLoader takes batches from its workers round-robin, so rank-local batch ``i`` comes from worker
``i % workers``; each worker makes exactly its share, in shuffled passes over its shards (each pass drained
before the next starts), so it repeats samples only when its shards run dry.
``start_batch=k`` resumes mid-epoch: worker ``w`` plays the part of logical worker ``(w + k) % workers`` and
skips the raw samples of that worker's batches before ``k``, so the batches are exactly those the
uninterrupted run would have yielded from ``k`` on.

Evaluation: no shuffling, no repetition; every sample of the split is yielded exactly once across all ranks
and workers (each worker's last batch may be short); ``len()`` is exact from the manifest's shard counts.

A truncated or damaged shard raises :class:`ShardError` naming the shard (the sha256 of a local shard is
checked before its first sample is used, a streamed one's when it has been read to its end); a shard
holding a different number of samples than the manifest says does too, so an epoch is never silently short.
"""

from __future__ import annotations

import functools
import io
import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrdist.errors import UserError
from cxrdist.shards.cache import ShardCache
from cxrdist.shards.location import is_remote
from cxrdist.shards.manifest import IMAGE_EXTS, sample_meta
from cxrdist.shards.tario import RawSample, Shard, ShardError, iter_shard

SEX_CODE = {"M": 1.0, "F": 0.0}  # anything else (U, '', None) -> 0.5


# --------------------------------------------------------------------------------------------------------
# the plan: who reads what, and how many batches
# --------------------------------------------------------------------------------------------------------
def shard_order(shards: list[Shard], *, seed: int, epoch: int, train: bool) -> list[Shard]:
    """The epoch's shard order: shuffled from (seed, epoch) for training, the manifest's order otherwise."""
    order = list(shards)
    if train:
        random.Random(f"cxrdist-shards:{seed}:{epoch}").shuffle(order)
    return order


@dataclass(frozen=True)
class Share:
    """What one global worker reads: ``shards``, keeping the samples ``i`` (counted over those shards in
    order) with ``i % stride == offset``."""

    shards: tuple[Shard, ...]
    stride: int = 1
    offset: int = 0

    @property
    def samples(self) -> int:
        total = sum(s.samples for s in self.shards)
        if self.stride == 1:
            return total
        return max(0, (total - self.offset + self.stride - 1) // self.stride)

    def names(self) -> str:
        return ", ".join(s.name for s in self.shards)


def worker_share(order: list[Shard], g: int, num_global: int) -> Share:
    """Shards by global worker when there are enough of them, else every shard with a sample stride."""
    if len(order) >= num_global:
        return Share(tuple(order[g::num_global]))
    return Share(tuple(order), stride=num_global, offset=g)


def count_for(worker: int, total: int, workers: int) -> int:
    """How many of the indices ``0 .. total-1`` fall to ``worker`` under round-robin over ``workers``."""
    return max(0, (total - worker + workers - 1) // workers)


HashRule = Callable[[Shard], bool]  # whether a read of this shard checks its sha256


def iter_share(share: Share, rule: HashRule, verified: set[str]) -> Iterator[RawSample]:
    """The share's raw samples (``rule``: which shards are hashed); each shard that was hashed and read to
    its end is added to ``verified``."""
    i = 0
    for shard in share.shards:
        hashing = rule(shard)
        for sample in iter_shard(shard, check_sha256=hashing):
            if share.stride == 1 or i % share.stride == share.offset:
                yield sample
            i += 1
        if hashing:
            verified.add(shard.name)


def _shuffled_passes(
    share: Share, bufsize: int, rng: random.Random, rule: Callable[[bool], HashRule], verified: set[str]
) -> Iterator[RawSample]:
    """Endless passes over a share, each shuffled through the buffer and drained before the next one
    starts: a worker whose quota fits its share yields each of its samples at most once per epoch
    (``rule(first_pass)`` says which shards a pass hashes)."""
    if share.samples == 0:
        raise ShardError(f"a loader worker was given no samples ({share.names() or 'no shards'})")
    for n in itertools.count():
        yield from _shuffle(iter_share(share, rule(n == 0), verified), bufsize, rng)


def _shuffle(samples: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer (WebDataset's): emit a random element once ``bufsize`` are held."""
    if bufsize <= 1:
        yield from samples
        return
    buf: list[Any] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= bufsize:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


# --------------------------------------------------------------------------------------------------------
# decoding and collation
# --------------------------------------------------------------------------------------------------------
def sex_code(sex: Any) -> float:
    return SEX_CODE.get(sex, 0.5) if isinstance(sex, str) else 0.5


def collate(keys: list[str], images: list[np.ndarray], metas: list[dict]) -> dict[str, Any]:
    """The batch dict of the contract from decoded images (H x W uint8 or uint16) and their json."""
    stack = np.stack(images)[:, None]
    if stack.dtype == np.uint16:
        stack = stack.astype(np.int32)
    # L from the samples themselves: the manifest's label count is checked where samples are read
    labels = np.asarray([m["labels"] for m in metas], dtype=np.float32).reshape(len(metas), -1)
    mask = np.asarray([m["mask"] for m in metas], dtype=np.float32).reshape(len(metas), -1)
    age = np.asarray([np.nan if m.get("age") is None else m["age"] for m in metas], dtype=np.float32)
    sex = np.asarray([sex_code(m.get("sex")) for m in metas], dtype=np.float32)
    return {
        "image": torch.from_numpy(stack),
        "labels": torch.from_numpy(labels),
        "mask": torch.from_numpy(mask),
        "age": torch.from_numpy(age),
        "sex": torch.from_numpy(sex),
        "key": list(keys),
        # for evaluation: the bootstrap resamples patients; subgroups by view
        "patient_id": [str(m.get("patient_id", k)) for k, m in zip(keys, metas)],
        "view": [str(m.get("view") or "") for m in metas],
    }


def decode_batch(raw: list[RawSample], n_labels: int) -> dict[str, Any]:
    from cxrdist import imaging

    keys, images, metas = [], [], []
    for shard, key, members in raw:
        try:
            ext = next(e for e in IMAGE_EXTS if e in members)
            images.append(imaging.decode(members[ext], ext))
            metas.append(sample_meta(members["json"], n_labels))
        except StopIteration:
            raise ShardError(f"{shard}: sample {key} has no .jpg or .png image") from None
        except KeyError:
            raise ShardError(f"{shard}: sample {key} has no .json") from None
        except (imaging.UnusableImage, ValueError) as e:
            raise ShardError(f"{shard}: sample {key} is unreadable: {e}") from None
        keys.append(key)
    try:
        return collate(keys, images, metas)
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{', '.join(sorted({r[0] for r in raw}))}: samples do not stack into a batch "
            f"(mixed image sizes or bad json?): {e}"
        ) from None


@functools.lru_cache(maxsize=1)
def warm_decoders() -> None:
    """Decode one tiny JPEG here, so that forked loader workers inherit a ready decoder (imaging picks
    torchvision's libjpeg-turbo on first use; importing it anew in every worker costs seconds each epoch)."""
    from PIL import Image

    from cxrdist import imaging

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="JPEG")
    imaging.decode(buf.getvalue(), "jpg")


def batch_generator(*ints: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, epoch, rank, batch): augmentation that resumes exactly."""
    state = np.random.SeedSequence([abs(int(i)) for i in ints]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------------------------
# the dataset each worker iterates, and the loader
# --------------------------------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch; inside a DataLoader worker, that worker's share of them."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        train: bool,
        epoch: int,
        seed: int,
        start_batch: int,
        shuffle_buffer: int,
        batches_per_rank: int,
        n_labels: int,
        augment: torch.nn.Module | None = None,
        check_sha256: bool = True,
        finish_streamed: bool = True,
    ):
        super().__init__()
        self.shards = list(shards)
        self.n_labels = n_labels
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.workers = max(1, workers)  # logical workers per rank (1 for the in-process loader)
        self.train, self.seed = train, seed
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_rank = batches_per_rank
        self.augment = augment
        # (epoch, start_batch, check_sha256) in shared memory: persistent workers keep their copy of this
        # object across epochs, and read the next epoch's plan from here when the DataLoader restarts them
        self._plan = torch.tensor([epoch, start_batch, int(check_sha256)], dtype=torch.int64).share_memory_()
        # streamed shards this worker has hashed whole: a streamed shard is checked only at its end, so one
        # a worker stopped inside (its quota ended there) is hashed again on its next read, whatever the
        # epoch's check_sha256 says, until a read reaches its end (``finish_streamed``; off with --check-sha256 off)
        self.finish_streamed = finish_streamed
        self._verified: set[str] = set()

    @property
    def epoch(self) -> int:
        return int(self._plan[0])

    @property
    def start_batch(self) -> int:
        return int(self._plan[1])

    @property
    def check_sha256(self) -> bool:
        return bool(self._plan[2])

    def hash_rule(self, first_pass: bool) -> HashRule:
        """Which shards a pass hashes: all in the first pass of an epoch that checks; streamed shards not
        yet hashed whole by this worker in any pass."""
        every = self.check_sha256 and first_pass

        def rule(shard: Shard) -> bool:
            return every or (self.finish_streamed and is_remote(shard.path) and shard.name not in self._verified)

        return rule

    def set_epoch(self, epoch: int, start_batch: int = 0, check_sha256: bool | None = None) -> None:
        self._plan[0], self._plan[1] = epoch, start_batch
        if check_sha256 is not None:
            self._plan[2] = int(check_sha256)

    # -- the plan, also used by the main process for len() --
    def share(self, logical: int) -> Share:
        order = shard_order(self.shards, seed=self.seed, epoch=self.epoch, train=self.train)
        return worker_share(order, self.rank * self.workers + logical, self.world_size * self.workers)

    def eval_batches(self) -> int:
        return sum(-(-self.share(w).samples // self.batch_size) for w in range(self.workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream planned for {self.workers} workers, runs under {info.num_workers}")
        if self.train:
            yield from self._train((physical + self.start_batch) % self.workers)
        else:
            yield from self._eval(physical)

    def _train(self, logical: int) -> Iterator[dict[str, Any]]:
        W, bs = self.workers, self.batch_size
        mine = count_for(logical, self.batches_per_rank, W)
        skip = count_for(logical, self.start_batch, W)
        if mine <= skip:
            return
        share = self.share(logical)
        if share.samples == 0:  # more global workers than samples: this one draws from the whole split
            share = Share(tuple(shard_order(self.shards, seed=self.seed, epoch=self.epoch, train=True)))
        g = self.rank * W + logical
        rng = random.Random(f"cxrdist-samples:{self.seed}:{self.epoch}:{g}")
        raw = _shuffled_passes(share, min(self.shuffle_buffer, share.samples), rng, self.hash_rule, self._verified)
        raw = itertools.islice(raw, skip * bs, mine * bs)  # resume: drop raw samples, decode nothing
        for j, chunk in enumerate(_chunks(raw, bs), start=skip):
            yield self._finish(decode_batch(chunk, self.n_labels), logical + W * j)

    def _eval(self, logical: int) -> Iterator[dict[str, Any]]:
        share = self.share(logical)
        n = 0
        for j, chunk in enumerate(_chunks(iter_share(share, self.hash_rule(True), self._verified), self.batch_size)):
            n += len(chunk)
            yield self._finish(decode_batch(chunk, self.n_labels), logical + self.workers * j)
        if n != share.samples:
            raise ShardError(
                f"a loader worker read {n} samples where the manifest plans {share.samples} from {share.names()}"
            )

    def _finish(self, batch: dict[str, Any], index: int) -> dict[str, Any]:
        if self.augment is not None:
            with torch.no_grad():
                gen = batch_generator(self.seed, self.epoch, self.rank, index)
                batch["image"] = self.augment(batch["image"], generator=gen)
        return batch


def clean_message(e: UserError) -> str:
    """A UserError re-raised by the DataLoader carries the worker's traceback: keep its one-line message."""
    found = re.findall(rf"^(?:[\w.]+\.)?{type(e).__name__}: (.*)$", str(e), re.M)
    return found[-1] if found else str(e)


def iterate(loader: DataLoader, error: type[UserError]) -> Iterator[Any]:
    """Iterate a DataLoader; a worker's ``error`` comes out as one clean line, and (non-persistent loaders)
    the workers are shut down before it is raised (the re-raised exception's traceback would otherwise keep
    the DataLoader iterator, and its worker processes, alive in a reference cycle until some later garbage
    collection). A persistent loader keeps its workers until ``ShardLoader.close()``."""
    it = iter(loader)
    message = None
    try:
        yield from it
    except error as e:
        message = clean_message(e)
        e.__traceback__ = None
    del it  # the last reference: the iterator's __del__ stops and joins its workers now
    if message is not None:
        raise error(message)


def as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The workers already collate: skip the DataLoader's recursive per-item conversion."""
    return batch


class ShardLoader:
    """Iterable over this rank's batches for one epoch; ``len()`` is the number of batches it yields."""

    def __init__(
        self,
        stream: ShardStream,
        *,
        workers: int,
        pin_memory: bool,
        length: int,
        samples: int,
        manifest: dict,
        persistent: bool = False,
    ):
        self.stream, self.workers, self.pin_memory = stream, workers, pin_memory
        self.length, self.samples, self.manifest = length, samples, manifest
        self.batch_size = stream.batch_size
        self.image_size = int(manifest.get("size", 0))
        self.encoding = manifest.get("encoding", "jpg")
        self.persistent = persistent and workers > 0
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.length

    def restart(self, epoch: int, start_batch: int = 0, check_sha256: bool | None = None) -> ShardLoader:
        """The same loader (and, when persistent, the same worker processes) for another training epoch
        (``check_sha256``: hash the shards in it; None: as before)."""
        if not self.stream.train or not 0 <= start_batch <= self.stream.batches_per_rank:
            raise ValueError(
                f"restart(epoch={epoch}, start_batch={start_batch}) on a loader planned for "
                f"{self.stream.batches_per_rank} training batches"
            )
        self.stream.set_epoch(epoch, start_batch, check_sha256)
        self.length = self.stream.batches_per_rank - start_batch
        self.samples = self.length * self.batch_size
        return self

    def close(self) -> None:
        """Stop the persistent workers now: dropping the last reference to the DataLoader drops its
        iterator, whose finaliser shuts the workers down and joins them (a rank may end with os._exit)."""
        self._loader = None

    def dataloader(self) -> DataLoader:
        if self._loader is None or not self.persistent:
            self._loader = DataLoader(
                self.stream,
                batch_size=None,
                collate_fn=as_is,
                num_workers=self.workers,
                pin_memory=self.pin_memory and torch.cuda.is_available(),
                prefetch_factor=2 if self.workers else None,
                persistent_workers=self.persistent,
            )
        return self._loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.workers and self.encoding == "jpg":
            warm_decoders()
        n = 0
        for batch in iterate(self.dataloader(), ShardError):
            n += 1
            yield batch
        if n != self.length:
            raise ShardError(
                f"the loader yielded {n} batches, {self.length} planned "
                f"(shards: {', '.join(s.name for s in self.stream.shards)})"
            )


def read_shard_list(shard_dir: str | Path, split: str, cache: ShardCache | None = None) -> tuple[dict, list[Shard]]:
    """The manifest and its shards of ``split`` (paths, sample counts, sizes and, to be checked as each is
    read, hashes)."""
    from cxrdist.shards.manifest import load_manifest, shard_paths

    manifest = load_manifest(shard_dir, splits=(split,))
    entries = manifest["splits"][split].get("shards", [])
    paths = shard_paths(manifest, shard_dir, split)
    shards = []
    for entry, path in zip(entries, paths, strict=True):
        shards.append(
            Shard(
                name=entry["name"],
                path=str(path),
                samples=int(entry["samples"]),
                bytes=int(entry.get("bytes") or 0),
                sha256=str(entry.get("sha256") or ""),
                cache=cache if is_remote(path) else None,
            )
        )
    return manifest, shards


def make_loader(
    shard_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    train: bool = True,
    epoch: int = 0,
    seed: int = 0,
    start_batch: int = 0,
    shuffle_buffer: int = 1000,
    augment: torch.nn.Module | None = None,
    pin_memory: bool = False,
    persistent: bool = False,
    check_sha256: bool = True,
    cache: ShardCache | None = None,
    finish_streamed: bool = True,
) -> ShardLoader:
    """The shard loader of one rank for one epoch (see the module docstring for the rules); each shard's
    sha256 is checked against the manifest before it is used (``check_sha256``; `bench loader` measures it)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0:
        raise ValueError(
            f"bad loader geometry: batch_size={batch_size} rank={rank} world_size={world_size} workers={workers}"
        )
    manifest, shards = read_shard_list(shard_dir, split, cache)
    total = sum(s.samples for s in shards)
    batches_per_rank = total // (world_size * batch_size)
    if train:
        if batches_per_rank == 0:
            raise UserError(
                f"split {split!r} has {total} samples: not one batch of {batch_size} for each of {world_size} rank(s)"
            )
        if not 0 <= start_batch <= batches_per_rank:
            raise ValueError(f"start_batch={start_batch} outside 0..{batches_per_rank}")
    elif start_batch:
        raise ValueError("start_batch is for training loaders only")
    stream = ShardStream(
        shards,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=workers,
        train=train,
        epoch=epoch,
        seed=seed,
        start_batch=start_batch,
        shuffle_buffer=shuffle_buffer,
        batches_per_rank=batches_per_rank,
        n_labels=len(manifest["labels"]),
        augment=augment,
        check_sha256=check_sha256,
        finish_streamed=finish_streamed,
    )
    if train:
        length = batches_per_rank - start_batch
        samples = length * batch_size
    else:
        length = stream.eval_batches()
        samples = sum(stream.share(w).samples for w in range(stream.workers))
    return ShardLoader(
        stream,
        workers=workers,
        pin_memory=pin_memory,
        length=length,
        samples=samples,
        manifest=manifest,
        persistent=persistent and train,
    )
