"""``cxrdist verify``: re-hash and re-count every shard against the manifest.

Samples are counted from the tar member names only (headers, through the one tar reader
``cxrdist.shards.tario``; nothing is decoded or unpickled): a sample is the run of members sharing a key,
as webdataset groups them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cxrdist.contain import SHARD_NAME, shard_name_problem
from cxrdist.shards.manifest import IMAGE_EXTS, SPLITS, read_manifest, sample_meta, shard_list_problems
from cxrdist.shards.tario import ShardError, members, split_name


def file_sha256(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def count_samples(path: Path, n_labels: int | None = None) -> tuple[int, list[str]]:
    """(samples, problems) from the members of a tar, by the one tar reader's key / extension rule
    (``tario.split_name``): headers, and with ``n_labels`` each ``.json`` checked as the loader checks it
    (``manifest.sample_meta``); images are not decoded. Raises ShardError when the tar is unreadable."""
    problems: list[str] = []
    samples, current, exts, seen = 0, None, set(), set()

    def close_sample():
        if current is None:
            return
        if "json" not in exts:
            problems.append(f"sample {current} has no .json")
        if not exts & set(IMAGE_EXTS):
            problems.append(f"sample {current} has no image (.jpg/.png)")

    for fname, data in members(path, read=lambda fname: n_labels is not None and fname.endswith(".json")):
        split = split_name(fname)
        if split is None:
            problems.append(f"member {fname!r} has no key.extension name")
            continue
        key, ext = split
        if key != current:
            close_sample()
            if key in seen:
                problems.append(f"key {key} appears twice (two samples of one key)")
            seen.add(key)
            current, exts = key, set()
            samples += 1
        exts.add(ext)
        if data is not None and ext == "json":
            try:
                sample_meta(data, n_labels)
            except ValueError as e:
                problems.append(f"sample {key}: {e}")
    close_sample()
    return samples, problems


def _shard_problems(path: Path, s: dict, n_labels: int) -> list[str]:
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    digest, size = file_sha256(path)
    if s.get("bytes") is not None and size != s["bytes"]:
        problems.append(f"{name}: {size} bytes, manifest says {s['bytes']}")
    if digest != s.get("sha256"):
        problems.append(f"{name}: sha256 mismatch")
    try:
        n, inner = count_samples(path, n_labels)
    except ShardError as e:
        return problems + [f"{name}: unreadable tar: {str(e).removeprefix(name + ': ')}"]
    problems += [f"{name}: {p}" for p in inner]
    if n != s.get("samples"):
        problems.append(f"{name}: {n} samples, manifest says {s.get('samples')}")
    return problems


def verify(dir) -> list[str]:
    """Problems found (empty: every shard matches the manifest). Each names its shard."""
    d = Path(dir)
    m = read_manifest(d)
    problems: list[str] = []
    if m.get("dry_run"):
        problems.append("manifest.json: written by --dry-run, no shards to verify")
    problems += shard_list_problems(m)
    listed: set[str] = set()
    for split in SPLITS:
        for s in m["splits"][split].get("shards", []):
            name = s.get("name") if isinstance(s, dict) else s
            if shard_name_problem(name, split) or name in listed:
                continue  # said above; a name that points elsewhere is never opened
            listed.add(name)
            problems += _shard_problems(d / name, s, len(m["labels"]))
    for p in sorted(d.iterdir()):
        if SHARD_NAME.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: on disk but not in the manifest")
        elif p.name.endswith(".tar.partial"):
            problems.append(f"{p.name}: leftover partial shard (an interrupted `cxrdist shard`; re-run it)")
    return problems
