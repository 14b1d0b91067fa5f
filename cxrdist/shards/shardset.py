"""A shard set: what a location and its manifest say, read and checked once per process, then handed down.

``ShardSet.open(location)`` parses the location, reads ``manifest.json`` once (for a URL: one fetch and one
listing), checks it (every split non-empty; a local shard present with the manifest's size: what the
trainer's input check used to re-read for itself) and builds the ``Shard`` records of every split. The
trainer opens one and hands it to its loaders; loader workers get it by pickling (fork), so no layer below
the trainer parses the location or reads the manifest again. Mixing sources (several shard sets in one
run: ``cxrdist.shards.mix``) is one ShardSet too, whose ``parts`` are the sources' own sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxrdist.errors import UserError
from cxrdist.shards import location
from cxrdist.shards.cache import ShardCache
from cxrdist.shards.manifest import SPLITS, load_manifest, shard_paths, split_samples
from cxrdist.shards.tario import Shard


@dataclass(frozen=True, eq=False)  # one per process, compared (and cached) by identity
class ShardSet:
    location: str  # as given: in memory only (it may hold credentials; see cxrdist/redact.py)
    manifest: dict = field(repr=False)
    splits: dict[str, tuple[Shard, ...]] = field(repr=False)
    parts: tuple[Part, ...] = field(default=(), repr=False)  # a mix's sources (cxrdist/shards/mix.py); () else

    @classmethod
    def open(cls, where: str | Path, cache: ShardCache | None = None, splits: tuple[str, ...] = SPLITS) -> ShardSet:
        """Read and check ``where`` once; ``cache`` (``--shard-cache``) is attached to its streamed shards;
        ``splits``: the ones that must hold samples (the others may be empty, and are never read)."""
        loc = location.parse(where)
        folder = loc.local or loc.text
        manifest = load_manifest(folder, splits=splits)
        shards = {split: tuple(_shards(manifest, folder, split, cache)) for split in SPLITS}
        if loc.local is not None:
            for split in SPLITS:
                for s in shards[split]:
                    _check_local(Path(s.path), s, folder)
        return cls(str(where), manifest, shards)

    # -- what the manifest says ----------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def local(self) -> Path | None:
        return None if self.parts else location.parse(self.location).local

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts) if self.parts else location.parse(self.location).name

    def sources(self) -> tuple[Part, ...]:
        """The sources a training epoch draws from: a mix's parts, or this set as its one source."""
        return self.parts or (Part("", self, tuple(range(len(self.labels))), self.samples("train")),)

    def epoch_samples(self) -> int:
        """Training samples per epoch (a weighted mix may take fewer than its sources hold)."""
        return sum(p.epoch_samples for p in self.sources())

    def samples(self, split: str) -> int:
        return split_samples(self.manifest, split)

    def shards(self, split: str) -> tuple[Shard, ...]:
        return self.splits[split]

    def sizes(self, split: str) -> list[int]:
        return [s.samples for s in self.splits[split]]

    def largest_shard(self) -> int:
        return max((s.bytes for split in self.splits.values() for s in split), default=0)

    def meta(self) -> dict:
        """What a checkpoint records to read files the way these shards hold them (``predict``)."""
        return {"size": self.manifest["size"], "encoding": self.manifest["encoding"], "labels": list(self.labels)}


@dataclass(frozen=True, eq=False)
class Part:
    """One source of a mixed shard set: ``name`` (in its samples' keys and patient ids, and its shards' names),
    its own set, the mix's label column of each of its labels, and the training samples it gives each epoch."""

    name: str
    set: ShardSet
    columns: tuple[int, ...]
    epoch_samples: int


def _shards(manifest: dict, folder, split: str, cache: ShardCache | None) -> list[Shard]:
    entries = manifest["splits"][split].get("shards", [])
    out = []
    for entry, path in zip(entries, shard_paths(manifest, folder, split), strict=True):
        out.append(
            Shard(
                name=entry["name"],
                path=str(path),
                samples=int(entry["samples"]),
                bytes=int(entry.get("bytes") or 0),
                sha256=str(entry.get("sha256") or ""),
                cache=cache if location.is_remote(path) else None,
            )
        )
    return out


def _check_local(path: Path, shard: Shard, folder) -> None:
    if not path.is_file():
        raise UserError(f"{path}: listed in manifest.json but missing (run `cxrdist verify {folder}`)")
    if shard.bytes and path.stat().st_size != shard.bytes:
        raise UserError(
            f"{path}: {path.stat().st_size} bytes on disk, manifest.json says {shard.bytes} "
            f"(run `cxrdist verify {folder}`)"
        )
