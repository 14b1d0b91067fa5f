"""The shard folder's ``manifest.json``: atomic writing, loading with clear errors, small helpers.

Contract (docs/ARCHITECTURE.md, "The shard folder"): ``version``, ``source``, ``root``, ``labels``,
``policy``, ``split``, ``views``, ``size``, ``encoding``, ``counts``, ``splits.{train,val,test}.{samples,
patients, prevalence, shards[{name, samples, bytes, sha256}]}``, ``skipped[{source, reason}]``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cxrdist.atomic import atomic_write_json
from cxrdist.errors import UserError

MANIFEST = "manifest.json"
DRY_RUN_MANIFEST = "manifest.dry-run.json"
VERSION = 1
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
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
    """Parse ``dir/manifest.json`` and check its fields; does not look at the shards (see ``load_manifest``)."""
    d = Path(dir)
    if not d.exists():
        raise ManifestError(f"{d}: no such shard folder (run `cxrdist shard --out {d} ...` first)")
    if not d.is_dir():
        raise ManifestError(f"{d}: not a folder (a shard folder holds manifest.json and *.tar)")
    path = d / MANIFEST
    if not path.is_file():
        hint = " (only a --dry-run manifest is there)" if (d / DRY_RUN_MANIFEST).is_file() else ""
        raise ManifestError(f"{d}: no {MANIFEST}{hint}: run `cxrdist shard --out {d} ...` first")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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


def load_manifest(dir, *, splits=SPLITS) -> dict:
    """Load and check a shard folder: the manifest, every listed shard present, ``splits`` non-empty.

    Raises ``ManifestError`` (a ``UserError``) naming the problem.
    """
    d = Path(dir)
    m = read_manifest(d)
    if m.get("dry_run"):
        raise ManifestError(
            f"{d / MANIFEST}: written by `cxrdist shard --dry-run` (no shards): run it without --dry-run"
        )
    for split in splits:
        if split_samples(m, split) == 0:
            raise ManifestError(
                f"{d}: split {split!r} is empty ({len(m['splits'][split].get('shards', []))} shards, "
                "0 samples): too few images, or all skipped (see skipped in manifest.json)"
            )
    for split in SPLITS:
        for p in shard_paths(m, d, split):
            if not p.is_file():
                raise ManifestError(
                    f"{d}: shard {p.name} is listed in {MANIFEST} but missing "
                    "(re-run `cxrdist shard` to re-pack it; `cxrdist verify` checks them all)"
                )
    return m


def shard_paths(manifest: dict, dir, split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return [Path(dir) / s["name"] for s in manifest["splits"][split].get("shards", [])]


def split_samples(manifest: dict, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return int(manifest["splits"][split].get("samples", 0))
