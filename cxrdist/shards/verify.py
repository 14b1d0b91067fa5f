"""``cxrdist verify``: re-hash and re-count every shard against the manifest.

Samples are counted from the tar member names only (headers, through the one tar reader
``cxrdist.shards.tario``; nothing is decoded or unpickled): a sample is the run of members sharing a key,
as webdataset groups them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cxrdist.shards.manifest import IMAGE_EXTS, SHARD_NAME, SPLITS, read_manifest
from cxrdist.shards.tario import ShardError, members, split_name


def file_sha256(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def count_samples(path: Path) -> tuple[int, list[str]]:
    """(samples, problems) from the member names of a tar, by the one tar reader's key / extension rule
    (``tario.split_name``); nothing is read but headers. Raises ShardError when the tar is unreadable."""
    problems: list[str] = []
    samples, current, exts = 0, None, set()

    def close_sample():
        if current is None:
            return
        if "json" not in exts:
            problems.append(f"sample {current} has no .json")
        if not exts & set(IMAGE_EXTS):
            problems.append(f"sample {current} has no image (.jpg/.png)")

    for fname, _ in members(path, read=lambda fname: False):
        split = split_name(fname)
        if split is None:
            problems.append(f"member {fname!r} has no key.extension name")
            continue
        key, ext = split
        if key != current:
            close_sample()
            current, exts = key, set()
            samples += 1
        exts.add(ext)
    close_sample()
    return samples, problems


def verify(dir) -> list[str]:
    """Problems found (empty: every shard matches the manifest). Each names its shard."""
    d = Path(dir)
    m = read_manifest(d)
    problems: list[str] = []
    if m.get("dry_run"):
        problems.append("manifest.json: written by --dry-run, no shards to verify")
    listed: set[str] = set()
    for split in SPLITS:
        entry = m["splits"][split]
        total = 0
        for s in entry.get("shards", []):
            name = s["name"]
            listed.add(name)
            total += int(s.get("samples") or 0)
            path = d / name
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            digest, size = file_sha256(path)
            if s.get("bytes") is not None and size != s["bytes"]:
                problems.append(f"{name}: {size} bytes, manifest says {s['bytes']}")
            if digest != s.get("sha256"):
                problems.append(f"{name}: sha256 mismatch")
            try:
                n, inner = count_samples(path)
            except ShardError as e:
                problems.append(f"{name}: unreadable tar: {str(e).removeprefix(name + ': ')}")
                continue
            problems += [f"{name}: {p}" for p in inner]
            if n != s.get("samples"):
                problems.append(f"{name}: {n} samples, manifest says {s.get('samples')}")
        if total != entry.get("samples"):  # the manifest disagrees with itself
            problems.append(
                f"manifest.json: split {split} lists shards of {total} samples in all, but says {entry.get('samples')}"
            )
    for p in sorted(d.iterdir()):
        if SHARD_NAME.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: on disk but not in the manifest")
        elif p.name.endswith(".tar.partial"):
            problems.append(f"{p.name}: leftover partial shard (an interrupted `cxrdist shard`; re-run it)")
    return problems
