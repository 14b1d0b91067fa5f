"""The shard folder's ``manifest.json``: atomic writing, loading with clear errors, small helpers.

Contract (docs/ARCHITECTURE.md, "The shard folder"): ``version``, ``source``, ``root``, ``labels``,
``policy``, ``split``, ``views``, ``size``, ``encoding``, ``counts``, ``splits.{train,val,test}.{samples,
patients, prevalence, shards[{name, samples, bytes, sha256}]}``, ``skipped[{source, reason}]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxrdist.atomic import atomic_write_json
from cxrdist.contain import shard_name_problem
from cxrdist.errors import UserError
from cxrdist.shards import location

MANIFEST = "manifest.json"
DRY_RUN_MANIFEST = "manifest.dry-run.json"
VERSION = 1
SPLITS = ("train", "val", "test")
REQUIRED_FIELDS = (
    "version",
    "source",
    "root",
    "labels",
    "policy",
    "split",
    "views",
    "size",
    "encoding",
    "counts",
    "splits",
    "skipped",
)


IMAGE_EXTS = ("jpg", "png")  # a sample's image member: 8-bit JPEG or 16-bit PNG


class ManifestError(UserError):
    """The shard folder or its manifest is missing, incomplete or inconsistent."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_manifest(dir, manifest: dict, name: str = MANIFEST) -> Path:
    path = Path(dir) / name
    atomic_write_json(path, manifest)
    return path


def read_manifest(dir) -> dict:
    """Parse ``dir/manifest.json`` (a folder or a URL location) and check its fields; does not look at the
    shards (see ``load_manifest``)."""
    loc = location.parse(dir)
    if loc.local is None:
        return _remote_manifest(loc)
    d = loc.local
    if not d.exists():
        raise ManifestError(f"{d}: no such shard folder (run `cxrdist shard --out {d} ...` first)")
    if not d.is_dir():
        raise ManifestError(f"{d}: not a folder (a shard folder holds manifest.json and *.tar)")
    path = d / MANIFEST
    if not path.is_file():
        hint = " (only a --dry-run manifest is there)" if (d / DRY_RUN_MANIFEST).is_file() else ""
        raise ManifestError(f"{d}: no {MANIFEST}{hint}: run `cxrdist shard --out {d} ...` first")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from None
    return check_fields(text, path)


# a manifest lists shards, not samples: ~100 MB for a million samples with every skip listed; a body past this
# is no manifest, and is not read into memory
MANIFEST_CAP = 256 << 20


def _remote_manifest(loc: location.Location) -> dict:
    url = loc.url(MANIFEST)
    try:
        with loc.open(MANIFEST) as f:
            raw = f.read(MANIFEST_CAP + 1)
    except FileNotFoundError:
        raise ManifestError(f"{loc}: no {MANIFEST} there (a shard folder written by `cxrdist shard`)") from None
    url = location.final_url(url)  # where a same-host redirect led: what the messages name
    if len(raw) > MANIFEST_CAP:
        raise ManifestError(
            f"{url}: more than {MANIFEST_CAP >> 20} MiB, the cap for a {MANIFEST} (a million samples take about "
            "100 MB): refused, not read further"
        )
    try:
        return check_fields(raw.decode("utf-8"), url)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{url}: unreadable manifest: {e}") from None


def check_fields(text: str, path) -> dict:
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: not a manifest (expected a JSON object)")
    missing = [k for k in REQUIRED_FIELDS if k not in m]
    if missing:
        raise ManifestError(f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if m["version"] != VERSION:
        raise ManifestError(
            f"{path}: manifest version {m['version']!r}, this cxrdist reads version {VERSION}: re-run `cxrdist shard`"
        )
    bad = [s for s in SPLITS if not isinstance(m["splits"].get(s), dict)]
    if bad:
        raise ManifestError(f"{path}: no split {', '.join(bad)} in the manifest")
    return m


def shard_list_problems(m: dict) -> list[str]:
    """What is wrong with the shard lists themselves (no file is opened): a name that is not a plain
    ``{split}-NNNNNN.tar`` of its split, a shard listed twice or in two splits, split totals that disagree
    with their shards' counts."""
    problems, seen = [], {}
    for split in SPLITS:
        entry = m["splits"][split]
        total = 0
        for s in entry.get("shards", []):
            name = s.get("name") if isinstance(s, dict) else s
            why = shard_name_problem(name, split)
            if why:
                problems.append(f"{MANIFEST}: split {split}: {why}")
                continue
            if name in seen:
                problems.append(f"{MANIFEST}: {name} is listed twice (in {seen[name]} and {split})")
            seen[name] = split
            total += int(s.get("samples") or 0)
        if total != entry.get("samples"):
            problems.append(
                f"{MANIFEST}: split {split} lists shards of {total} samples in all, but says {entry.get('samples')}"
            )
    return problems


def load_manifest(dir, *, splits=SPLITS) -> dict:
    """Load and check a shard folder (or URL location): the manifest, every listed shard present (one
    listing for a URL; a ``pipe:`` location cannot list), ``splits`` non-empty.

    Raises ``ManifestError`` (a ``UserError``) naming the problem.
    """
    loc = location.parse(dir)
    d = str(loc).rstrip("/")
    m = read_manifest(loc.text)
    if m.get("dry_run"):
        raise ManifestError(
            f"{loc.url(MANIFEST)}: written by `cxrdist shard --dry-run` (no shards): run it without --dry-run"
        )
    problems = shard_list_problems(m)
    if problems:
        more = f" (and {len(problems) - 1} more: run `cxrdist verify {d}`)" if len(problems) > 1 else ""
        raise ManifestError(f"{d}/{problems[0]}{more}")
    for split in splits:
        if split_samples(m, split) == 0:
            raise ManifestError(
                f"{d}: split {split!r} is empty ({len(m['splits'][split].get('shards', []))} shards, "
                "0 samples): too few images, or all skipped (see skipped in manifest.json)"
            )
    present = (lambda name: (loc.local / name).is_file()) if loc.local is not None else _listed(loc)
    for split in SPLITS:
        for s in m["splits"][split].get("shards", []):
            if not present(s["name"]):
                raise ManifestError(
                    f"{d}: shard {s['name']} is listed in {MANIFEST} but missing "
                    "(re-run `cxrdist shard` to re-pack it; `cxrdist verify` checks them all)"
                )
    return m


def _listed(loc: location.Location):
    sizes = loc.sizes()
    return (lambda name: True) if sizes is None else (lambda name: name in sizes)  # unlisted: read will say


def shard_paths(manifest: dict, dir, split: str) -> list[Path | str]:
    """Each shard of ``split``: a path in a local folder, a URL (or pipe: command) for a remote location."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    loc = location.parse(dir)
    paths: list[Path | str] = []
    for s in manifest["splits"][split].get("shards", []):
        why = shard_name_problem(s["name"], split)  # whoever calls this, nothing outside the folder is opened
        if why:
            raise ManifestError(f"{loc.url(MANIFEST)}: split {split}: {why}")
        paths.append(loc.local / s["name"] if loc.local is not None else loc.url(s["name"]))
    return paths


def split_samples(manifest: dict, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return int(manifest["splits"][split].get("samples", 0))


def sample_meta(raw: bytes, n_labels: int) -> dict:
    """A sample's ``.json``, checked against the manifest's label count: ``labels`` and ``mask`` are
    ``n_labels`` numbers each, labels in [0, 1], mask 0 or 1. Raises ValueError saying what is wrong."""
    m = json.loads(raw)
    if not isinstance(m, dict):
        raise ValueError("its .json is not an object")
    for k in ("labels", "mask"):
        v = m.get(k)
        if not isinstance(v, list) or len(v) != n_labels:
            have = f"{len(v)} entries" if isinstance(v, list) else "none"
            raise ValueError(f"{k} has {have}; the manifest names {n_labels} labels")
    try:
        labels, mask = np.asarray(m["labels"], np.float64), np.asarray(m["mask"], np.float64)
    except (TypeError, ValueError):
        raise ValueError("labels and mask must be numbers") from None
    if not np.isin(mask, (0.0, 1.0)).all():
        raise ValueError(f"mask values must be 0 or 1, not {sorted(set(mask.tolist()) - {0.0, 1.0})[:3]}")
    if not ((labels >= 0.0) & (labels <= 1.0)).all():  # NaN fails this too
        raise ValueError("label values must lie in [0, 1]")
    return m
