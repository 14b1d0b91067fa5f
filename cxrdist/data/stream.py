"""The shard loader: WebDataset-layout shards read for every rank (not webdataset's pipeline: see below).

A loader takes the run's two values: the ``ShardSet`` (what the location and manifest say, read once) and the
``World`` (rank, ranks, workers per rank, seed, epoch, micro-batch, global batch).

Training: the epoch's order is ``data.shuffle.epoch_order`` (shard sizes, seed and epoch only) and
``data.partition`` cuts its global batches into the ranks' micro-batches, so the same experiment trains on
the same global batches with 1, 2 or 8 ranks and any number of loader workers, and a run resumes on another
topology (a resumed epoch starts at its next global batch). Each of a rank's readers (its loader workers, or
the rank itself) makes the micro-batches the DataLoader takes from it, by walking the epoch's shards in
reading order, start to end, keeping the bytes of its own samples only (the others are skipped unread: a
local shard is memory-mapped, so they are not even paged in) and decoding a micro-batch once all its samples
are in (``data.reader``). Every reader thus walks every shard of the epoch: for a streamed location
``--shard-cache`` makes that one download per node. Each shard's sha256 is checked by one reader per epoch
(the one ``q % readers`` names for the shard at reading position ``q``), at its end for a streamed shard.

Evaluation: no shuffling, no repetition; global worker ``g = rank * workers + w`` of ``G`` reads the shards
``[g::G]`` (every shard with a sample stride when there are fewer shards than workers), so every sample of
the split is yielded exactly once across all ranks and workers (each worker's last batch may be short);
``len()`` is exact from the manifest's shard counts.

A mixed shard set (``cxrdist.shards.mix``) trains on its sources side by side: ``data.shuffle.mixed_order``
interleaves their own epoch orders, each reader walks each source's shards in that source's reading order,
and every sample is decoded into the run's label columns (``Columns``: the union; mask 0 where its source
has no such label) under a ``<source>/`` key and patient id. Evaluation reads the sources' shards as one list.

Workers read raw samples with the one tar reader (``cxrdist.shards.tario``) and decode with explicit
decoders (``.jpg``/``.png`` through :func:`cxrdist.imaging.decode`, ``.json`` through ``json.loads``; every
other member, ``.pickle``/``.pyd`` included, is ignored and never unpickled). A truncated or damaged shard
raises :class:`ShardError` naming the shard; one holding another number of samples than the manifest says
does too, so an epoch is never silently short.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxrdist.config import DataConfig
from cxrdist.data.partition import reader_plan, steps_per_epoch
from cxrdist.data.shuffle import mixed_order
from cxrdist.data.world import World
from cxrdist.errors import UserError
from cxrdist.shards.location import is_remote
from cxrdist.shards.manifest import IMAGE_EXTS, sample_meta
from cxrdist.shards.shardset import ShardSet
from cxrdist.shards.tario import RawSample, Shard, ShardError, iter_shard

SEX_CODE = {"M": 1.0, "F": 0.0}  # anything else (U, '', None) -> 0.5
WINDOW = DataConfig.shuffle_window  # samples per shuffle window (tests/test_order.py measures the mixing)


# --------------------------------------------------------------------------------------------------------
# evaluation: who reads what
# --------------------------------------------------------------------------------------------------------
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


def worker_share(order: list[Shard] | tuple[Shard, ...], g: int, num_global: int) -> Share:
    """Shards by global worker when there are enough of them, else every shard with a sample stride."""
    if len(order) >= num_global:
        return Share(tuple(order[g::num_global]))
    return Share(tuple(order), stride=num_global, offset=g)


HashRule = Callable[[Shard], bool]  # whether a read of this shard checks its sha256


def iter_share(share: Share, rule: HashRule, verified: set[str]) -> Iterator[tuple[int, RawSample]]:
    """The share's (source, raw sample) pairs (``rule``: which shards are hashed); each shard that was hashed
    and read to its end is added to ``verified``."""
    i = 0
    for shard in share.shards:
        hashing = rule(shard)
        for sample in iter_shard(shard, check_sha256=hashing):
            if share.stride == 1 or i % share.stride == share.offset:
                yield shard.source, sample
            i += 1
        if hashing:
            verified.add(shard.name)


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while True:
        chunk = [x for _, x in zip(range(n), it)]
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


@dataclass(frozen=True)
class Columns:
    """Where each source's labels land in the run's: per source, its labels' columns and the prefix of its
    keys and patient ids (``nih/``; none for an unmixed set, whose labels are the run's as they are)."""

    width: int
    columns: tuple[tuple[int, ...], ...]
    prefixes: tuple[str, ...]

    @classmethod
    def of(cls, shards: ShardSet) -> Columns:
        parts = shards.parts
        if not parts:
            return cls(len(shards.labels), (tuple(range(len(shards.labels))),), ("",))
        return cls(len(shards.labels), tuple(p.columns for p in parts), tuple(f"{p.name}/" for p in parts))

    def place(self, source: int, key: str, meta: dict) -> tuple[str, dict]:
        """A source's sample in the run's label columns (mask 0 where the source has no such label)."""
        prefix = self.prefixes[source]
        if not prefix:
            return key, meta
        labels, mask = [0.0] * self.width, [0] * self.width
        for j, k in enumerate(self.columns[source]):
            labels[k], mask[k] = meta["labels"][j], meta["mask"][j]
        patient = prefix + str(meta.get("patient_id", key))
        return prefix + key, {**meta, "labels": labels, "mask": mask, "patient_id": patient}


def decode_batch(raw: list[tuple[int, RawSample]], cols: Columns) -> dict[str, Any]:
    """(source, raw sample) pairs -> the batch dict (``cols``: where each source's labels go)."""
    from cxrdist import imaging

    keys, images, metas = [], [], []
    for source, (shard, key, members) in raw:
        try:
            ext = next(e for e in IMAGE_EXTS if e in members)
            images.append(imaging.decode(members[ext], ext))
            meta = sample_meta(members["json"], len(cols.columns[source]))
        except StopIteration:
            raise ShardError(f"{shard}: sample {key} has no .jpg or .png image") from None
        except KeyError:
            raise ShardError(f"{shard}: sample {key} has no .json") from None
        except (imaging.UnusableImage, ValueError) as e:
            raise ShardError(f"{shard}: sample {key} is unreadable: {e}") from None
        key, meta = cols.place(source, key, meta)
        keys.append(key)
        metas.append(meta)
    try:
        return collate(keys, images, metas)
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(
            f"{', '.join(sorted({r[1][0] for r in raw}))}: samples do not stack into a batch "
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
# the datasets the workers iterate
# --------------------------------------------------------------------------------------------------------
class _Plan:
    """(epoch, start step, check_sha256) in shared memory: persistent workers keep their copy of the
    dataset across epochs, and read the next epoch's plan from here when the DataLoader restarts them."""

    def __init__(self, epoch: int, start: int, check_sha256: bool):
        self.t = torch.tensor([epoch, start, int(check_sha256)], dtype=torch.int64).share_memory_()

    def set(self, epoch: int, start: int, check_sha256: bool | None) -> None:
        self.t[0], self.t[1] = epoch, start
        if check_sha256 is not None:
            self.t[2] = int(check_sha256)

    @property
    def values(self) -> tuple[int, int, bool]:
        return int(self.t[0]), int(self.t[1]), bool(self.t[2])


def _reader_id(readers: int) -> int:
    info = get_worker_info()
    if info is not None and info.num_workers != readers:
        raise RuntimeError(f"planned for {readers} reader(s), runs under {info.num_workers} worker(s)")
    return info.id if info is not None else 0


class TrainStream(IterableDataset):
    """This rank's training micro-batches of one epoch; inside a DataLoader worker, that worker's share."""

    def __init__(self, shards: ShardSet, world: World, *, steps: int, start_step: int, window: int,
                 augment: torch.nn.Module | None, check_sha256: bool):  # fmt: skip
        super().__init__()
        split = shards.shards("train")
        # each source's training shards, in its own manifest's order (the indices its epoch order uses)
        self.sources = tuple(tuple(x for x in split if x.source == s) for s in range(len(shards.sources())))
        self.counts = tuple(p.epoch_samples for p in shards.sources())
        self.cols = Columns.of(shards)
        self.world, self.steps, self.window, self.augment = world, steps, window, augment
        self.plan = _Plan(world.epoch, start_step, check_sha256)

    @property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(x for source in self.sources for x in source)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from cxrdist.data.reader import read_micro_batches

        epoch, start, check = self.plan.values
        world = self.world.at_epoch(epoch)
        # the DataLoader takes batch j of this read from worker j % W: the reader of micro-batch m0 + j
        reader = _reader_id(world.readers)
        sizes = [[x.samples for x in source] for source in self.sources]
        order = mixed_order(sizes, self.counts, world.seed, epoch, self.window)
        plan = reader_plan(world, order, start, self.steps, reader)
        me = world.rank * world.readers + reader  # which shards this reader hashes: one reader per shard
        every = world.world_size * world.readers
        offset = np.cumsum([0] + [len(x) for x in self.sources]).tolist()  # a source's shards' first number
        hashes = (lambda s, q: check and (offset[s] + q) % every == me) if check else (lambda s, q: False)
        sources = list(zip(self.sources, order.parts))
        for m, raw in read_micro_batches(sources, plan, world.micro_batch, hashes):
            yield self._finish(decode_batch(raw, self.cols), world, m)

    def _finish(self, batch: dict[str, Any], world: World, micro: int) -> dict[str, Any]:
        if self.augment is not None:
            with torch.no_grad():
                gen = batch_generator(world.seed, world.epoch, world.rank, micro)
                batch["image"] = self.augment(batch["image"], generator=gen)
        return batch


class EvalStream(IterableDataset):
    """This rank's evaluation batches of a split; inside a DataLoader worker, that worker's share."""

    def __init__(self, shards: ShardSet, split: str, world: World, *, check_sha256: bool):
        super().__init__()
        self.shards, self.world, self.cols = shards.shards(split), world, Columns.of(shards)
        self.plan = _Plan(0, 0, check_sha256)
        self._verified: set[str] = set()

    def share(self, logical: int) -> Share:
        w = self.world
        return worker_share(self.shards, w.rank * w.readers + logical, w.world_size * w.readers)

    def batches(self) -> int:
        return sum(-(-self.share(w).samples // self.world.micro_batch) for w in range(self.world.readers))

    def hash_rule(self) -> HashRule:
        """Every shard when this read checks; a streamed shard never yet hashed whole by this process
        otherwise (a streamed shard is checked only at its end)."""
        every = self.plan.values[2]
        return lambda shard: every or (is_remote(shard.path) and shard.name not in self._verified)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical = _reader_id(self.world.readers)
        share, n = self.share(logical), 0
        raw = iter_share(share, self.hash_rule(), self._verified)
        for chunk in _chunks(raw, self.world.micro_batch):
            n += len(chunk)
            yield decode_batch(chunk, self.cols)
        if n != share.samples:
            raise ShardError(
                f"a loader worker read {n} samples where the manifest plans {share.samples} from {share.names()}"
            )


# --------------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------------
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
    """Iterable over this rank's batches for one epoch (training: micro-batches); ``len()`` is their number."""

    def __init__(self, stream: TrainStream | EvalStream, *, length: int, samples: int, manifest: dict,
                 pin_memory: bool, persistent: bool = False):  # fmt: skip
        self.stream, self.workers = stream, stream.world.workers
        self.pin_memory, self.length, self.samples, self.manifest = pin_memory, length, samples, manifest
        self.batch_size = stream.world.micro_batch
        self.image_size = int(manifest.get("size", 0))
        self.encoding = manifest.get("encoding", "jpg")
        self.persistent = persistent and self.workers > 0
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.length

    def restart(self, epoch: int, start_step: int = 0, check_sha256: bool | None = None) -> ShardLoader:
        """The same loader (and, when persistent, the same worker processes) for another training epoch
        (``check_sha256``: hash the shards in it; None: as before)."""
        stream = self.stream
        if not isinstance(stream, TrainStream) or not 0 <= start_step <= stream.steps:
            raise ValueError(f"restart(epoch={epoch}, start_step={start_step}) on a loader of {self.length} batches")
        stream.plan.set(epoch, start_step, check_sha256)
        self.length = (stream.steps - start_step) * stream.world.accumulate
        self.samples = self.length * self.batch_size
        return self

    def reread(self, check_sha256: bool) -> ShardLoader:
        """The same evaluation loader (and, when persistent, the same worker processes) for another read of
        its split (``check_sha256``: hash its shards this time)."""
        if not isinstance(self.stream, EvalStream):
            raise ValueError("reread() is for evaluation loaders; a training loader restarts at an epoch")
        self.stream.plan.set(0, 0, check_sha256)
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


def train_loader(shards: ShardSet, world: World, *, start_step: int = 0, window: int = WINDOW,
                 augment: torch.nn.Module | None = None, pin_memory: bool = False, persistent: bool = False,
                 check_sha256: bool = True) -> ShardLoader:  # fmt: skip
    """This rank's training micro-batches of epoch ``world.epoch`` from step ``start_step`` on (see the module
    docstring for the rules); ``restart`` moves the same loader to another epoch."""
    steps = steps_per_epoch(shards.epoch_samples(), world.global_batch)
    if steps == 0:
        raise UserError(
            f"{shards.name}: {shards.epoch_samples()} training samples per epoch are fewer than one global batch of "
            f"{world.global_batch} ({world.world_size} rank(s) x {world.micro_batch} x {world.accumulate})"
        )
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step={start_step} outside 0..{steps}")
    stream = TrainStream(shards, world, steps=steps, start_step=start_step, window=window, augment=augment,
                         check_sha256=check_sha256)  # fmt: skip
    length = (steps - start_step) * world.accumulate
    return ShardLoader(stream, length=length, samples=length * world.micro_batch, manifest=shards.manifest,
                       pin_memory=pin_memory, persistent=persistent)  # fmt: skip


def eval_loader(shards: ShardSet, split: str, world: World, *, pin_memory: bool = False,
                check_sha256: bool = True, persistent: bool = False) -> ShardLoader:  # fmt: skip
    """This rank's share of ``split``, every sample once across the ranks and their workers (``persistent``:
    the same workers for every read, see ``ShardLoader.reread``)."""
    stream = EvalStream(shards, split, world, check_sha256=check_sha256)
    samples = sum(stream.share(w).samples for w in range(world.readers))
    return ShardLoader(stream, length=stream.batches(), samples=samples, manifest=shards.manifest,
                       pin_memory=pin_memory, persistent=persistent)  # fmt: skip
