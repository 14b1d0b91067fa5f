"""Several shard sets trained as one (``--shards A,B`` or ``--mix FILE``): torchxrayvision's "all" models,
CheXclusion's ALLData.

The mix is one ``ShardSet`` whose ``parts`` are the sources' own sets, opened and checked as any other (a
streamed one through its ``--shard-cache``). Its label set is the union of theirs (``labels.union``: the
same finding under another name is one column); a label a source does not define has mask 0 on that source's
samples, so it adds nothing to their loss and nothing to their metrics. Each source keeps its own
patient-wise split (it was made when that source was sharded), and its shards, keys and patient ids are
named after it (``nih/train-000003.tar``, ``nih/00000013_005``), so an evaluation can score each source apart.

How much of each source an epoch takes (``epoch_samples``): all of every source by default (the natural
proportions); with weights, the largest epoch that keeps the proportions without repeating a sample; with
sample counts, those. ``data.shuffle.mixed_order`` keeps the proportions in every global batch.

A mix file is a CSV with a header: ``shards`` (a location, as ``--shards`` takes it) and either ``weight``
(a positive number) or ``samples`` (training samples per epoch, at most what the source holds)::

    shards,weight
    /data/shards/chexpert,2
    s3://bucket/nih,1
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cxrdist.errors import UserError
from cxrdist.labels import describe, set_name, union
from cxrdist.redact import redact
from cxrdist.shards.cache import ShardCache
from cxrdist.shards.manifest import SPLITS
from cxrdist.shards.shardset import Part, ShardSet


@dataclass(frozen=True)
class Entry:
    """One source of a mix: its location, and its weight or its samples per epoch (neither: all it holds)."""

    location: str
    weight: float | None = None
    samples: int | None = None


def of_source(keys, source: str) -> np.ndarray:
    """Which of a mixed split's ``keys`` are ``source``'s (the loader names them ``<source>/<key>``)."""
    return np.fromiter((k.startswith(f"{source}/") for k in keys), bool, len(keys))


def is_mix(shards: str, mix_file: str = "") -> bool:
    """Whether ``--shards`` / ``--mix`` name several sources (a ``pipe:`` command is one location)."""
    return bool(mix_file) or ("," in shards and not shards.startswith("pipe:"))


def parse_shards(shards: str) -> list[Entry]:
    """``--shards A,B,...``: every source whole."""
    entries = [Entry(x.strip()) for x in shards.split(",")]
    if any(not e.location for e in entries):
        raise UserError(f"--shards {redact(shards)}: an empty location in the list")
    return entries


def check_entries(entries: Sequence[Entry], where: str) -> None:
    """Refused in a mix: a ``pipe:`` location (a command, run only when typed alone as ``--shards``: a mix
    file or a recorded config could otherwise run one) and a source listed twice."""
    seen = set()
    for e in entries:
        if e.location.startswith("pipe:"):
            raise UserError(f"{where}: {redact(e.location)} is a pipe: command; a mix reads folders and URLs only")
        if e.location in seen:
            raise UserError(f"{where}: {redact(e.location)} is listed twice")
        seen.add(e.location)


def parse_mix_file(text: str, where: str) -> list[Entry]:
    """A mix file's rows (see the module docstring); a bad row is a UserError naming ``where`` and the row."""
    rows = list(csv.DictReader(io.StringIO(text)))
    head = set(rows[0]) if rows else set()
    kind = [k for k in ("weight", "samples") if k in head]
    if "shards" not in head or len(kind) != 1:
        raise UserError(f"{where}: a mix file has a header with 'shards' and one of 'weight' or 'samples'")
    out = []
    for n, row in enumerate(rows, 2):
        loc, cell = (row.get("shards") or "").strip(), (row.get(kind[0]) or "").strip()
        try:
            value = float(cell) if kind[0] == "weight" else int(cell)
        except ValueError:
            value = None
        if not loc or value is None or not math.isfinite(value) or value <= 0:
            raise UserError(f"{where}:{n}: needs a location and a positive {kind[0]}, not {cell!r}")
        out.append(Entry(loc, weight=value) if kind[0] == "weight" else Entry(loc, samples=int(value)))
    if not out:
        raise UserError(f"{where}: no sources listed")
    return out


def entries_of(shards: str, mix_file: str = "") -> list[Entry]:
    """The mix a run's ``--shards`` / ``--mix`` name (both: the file wins, and a warning says so when they
    differ)."""
    if not mix_file:
        entries = parse_shards(shards)
        check_entries(entries, f"--shards {redact(shards)}")
        return entries
    path = Path(mix_file).expanduser()
    if not path.is_file():
        raise UserError(f"--mix {mix_file}: no such file")
    entries = parse_mix_file(path.read_text(errors="replace"), str(path))
    check_entries(entries, str(path))
    if shards and [e.location for e in entries] != [e.location for e in parse_shards(shards)]:
        import logging

        logging.getLogger(__name__).warning("--mix %s names the sources; --shards %s is not used", path, redact(shards))
    return entries


def epoch_samples(available: Sequence[int], entries: Sequence[Entry]) -> list[int]:
    """Training samples per epoch from each source (``available``: what each holds); see the module docstring."""
    if any(e.samples is not None for e in entries):
        for a, e in zip(available, entries, strict=True):
            if e.samples is None or e.samples > a:
                raise UserError(
                    f"{redact(e.location)}: the mix asks {e.samples} training samples per epoch of {a} "
                    "(a source is never repeated within an epoch)"
                )
        return [int(e.samples) for e in entries]
    if all(e.weight is None for e in entries):
        return list(available)
    total = sum(e.weight for e in entries)
    share = [e.weight / total for e in entries]
    epoch = min(a / f for a, f in zip(available, share, strict=True))  # the source that runs out first
    return [min(a, int(math.floor(epoch * f + 1e-9))) for a, f in zip(available, share, strict=True)]


def part_names(sets: Sequence[ShardSet]) -> list[str]:
    """Each source's name: its manifest's source (``chexpert``, ``nih``), numbered when two share one."""
    names: list[str] = []
    for s in sets:
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", str(s.manifest.get("source") or "source")).strip("-") or "source"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def open_mix(entries: Sequence[Entry], cache: ShardCache | None = None) -> ShardSet:
    """The sources opened (each read and checked once) and put together as one shard set."""
    sets = [ShardSet.open(e.location, cache=cache) for e in entries]
    first = sets[0].manifest
    for e, s in zip(entries, sets):
        for key in ("size", "encoding"):
            if s.manifest.get(key) != first.get(key):
                raise UserError(
                    f"{redact(e.location)}: its images are {key} {s.manifest.get(key)}, "
                    f"{redact(entries[0].location)}'s {first.get(key)}: a mix trains on one stored form "
                    "(re-shard with one --size / --encoding)"
                )
    names = part_names(sets)
    labels, columns = union([s.labels for s in sets])
    counts = epoch_samples([s.samples("train") for s in sets], entries)
    parts = tuple(Part(n, s, c, k) for n, s, c, k in zip(names, sets, columns, counts, strict=True))
    splits = {
        split: tuple(
            replace(x, name=f"{p.name}/{x.name}", source=i) for i, p in enumerate(parts) for x in p.set.shards(split)
        )
        for split in SPLITS
    }
    manifest = mixed_manifest(parts, labels, entries)
    return ShardSet(",".join(e.location for e in entries), manifest, splits, parts)


def mixed_manifest(parts: Sequence[Part], labels: tuple[str, ...], entries: Sequence[Entry]) -> dict:
    """What the mix's one manifest says: the union's labels, the sources' splits summed, and each source."""
    first = parts[0].set.manifest

    def common(key: str):
        values = {str(p.set.manifest.get(key)) for p in parts}
        return first.get(key) if len(values) == 1 else "mixed"

    splits = {}
    for split in SPLITS:
        ms = [p.set.manifest["splits"][split] for p in parts]
        splits[split] = {
            "samples": sum(int(m.get("samples", 0)) for m in ms),
            "patients": sum(int(m.get("patients", 0)) for m in ms),
            "shards": [
                {**entry, "name": f"{p.name}/{entry['name']}"}
                for p, m in zip(parts, ms, strict=True)
                for entry in m.get("shards", [])
            ],
        }
    return {
        "version": first.get("version"),
        "source": "+".join(p.name for p in parts),
        "root": None,
        "labels": list(labels),
        "label_set": set_name(labels),
        "labels_missing": [],
        "policy": common("policy"),
        "split": common("split"),
        # "<source>/...": cxrdist.matrix names a run's training source by what precedes the first slash
        "protocol": "+".join(p.name for p in parts)
        + "/mix of "
        + ", ".join(f"{p.name} ({p.set.manifest.get('protocol') or '?'})" for p in parts),
        "views": common("views"),
        "size": first.get("size"),
        "encoding": first.get("encoding"),
        "splits": splits,
        "mix": [
            {
                "name": p.name,
                "location": redact(e.location),
                "labels": describe(p.set.labels),
                "columns": list(p.columns),
                "epoch_samples": p.epoch_samples,
                "samples": {split: p.set.samples(split) for split in SPLITS},
            }
            for p, e in zip(parts, entries)
        ],
    }
