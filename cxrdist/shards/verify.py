"""``cxrdist verify``: re-hash and re-count every shard against the manifest, and check that no key and no
patient is in two splits.

Samples are counted from the tar member names only (headers, through the one tar reader
``cxrdist.shards.tario``; nothing is decoded or unpickled): a sample is the run of members sharing a key,
as webdataset groups them.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from cxrdist.contain import SHARD_NAME, shard_name_problem
from cxrdist.shards import location
from cxrdist.shards.manifest import IMAGE_EXTS, SPLITS, read_manifest, sample_meta, shard_list_problems
from cxrdist.shards.tario import ShardError, members, split_name


def file_sha256(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def count_samples(
    path: Path | str, n_labels: int | None = None, patients: set[str] | None = None, expected: tuple[int, str] = (0, "")
) -> tuple[int, list[str], set[str]]:
    """(samples, problems, keys) from the members of a tar, by the one tar reader's key / extension rule
    (``tario.split_name``): headers, and with ``n_labels`` each ``.json`` checked as the loader checks it
    (``manifest.sample_meta``), its ``patient_id`` added to ``patients``; images are not decoded. Raises
    ShardError when the tar is unreadable, or (``expected``: bytes, sha256) differs from them."""
    problems: list[str] = []
    samples, current, exts, seen = 0, None, set(), set()

    def close_sample():
        if current is None:
            return
        if "json" not in exts:
            problems.append(f"sample {current} has no .json")
        if not exts & set(IMAGE_EXTS):
            problems.append(f"sample {current} has no image (.jpg/.png)")

    wanted = lambda fname: n_labels is not None and fname.endswith(".json")  # noqa: E731
    for fname, data in members(path, expected_bytes=expected[0], expected_sha256=expected[1], read=wanted):
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
                meta = sample_meta(data, n_labels)
            except ValueError as e:
                problems.append(f"sample {key}: {e}")
            else:
                if patients is not None and meta.get("patient_id") not in (None, ""):
                    patients.add(str(meta["patient_id"]))
    close_sample()
    return samples, problems, seen


@dataclass
class SplitContents:
    """What verify saw of one split: where each key was, and the patients (for the cross-split checks)."""

    keys: dict[str, str] = field(default_factory=dict)  # key -> shard name
    patients: set[str] = field(default_factory=set)


def _shard_problems(path: Path | str, s: dict, n_labels: int, seen: SplitContents) -> list[str]:
    """A local shard is hashed, then parsed; a URL is streamed once, hashed and sized as it is parsed."""
    name, problems, expected = s["name"], [], (0, "")
    if isinstance(path, str):
        expected = (int(s.get("bytes") or 0), str(s.get("sha256") or ""))
    elif not path.is_file():
        return [f"{name}: missing"]
    else:
        digest, size = file_sha256(path)
        if s.get("bytes") is not None and size != s["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest says {s['bytes']}")
        if digest != s.get("sha256"):
            problems.append(f"{name}: sha256 mismatch")
    try:
        n, inner, keys = count_samples(path, n_labels, seen.patients, expected)
    except ShardError as e:
        why = str(e).removeprefix(name + ": ").removeprefix(f"{name} ({path}): ")
        return problems + [
            f"{name}: {why}" if "mismatch" in why or "missing" in why else f"{name}: unreadable tar: {why}"
        ]
    problems += [f"{name}: {p}" for p in inner]
    for key in sorted(keys & seen.keys.keys()):
        problems.append(f"{name}: key {key} is also in {seen.keys[key]}")
    seen.keys.update(dict.fromkeys(keys, name))
    if n != s.get("samples"):
        problems.append(f"{name}: {n} samples, manifest says {s.get('samples')}")
    return problems


def leakage(contents: dict[str, SplitContents], show: int = 3) -> list[str]:
    """Keys or patients in two splits: val or test images (or their patients' other images) trained on,
    or scored twice, which the patient-wise split rules out."""
    problems = []
    for a, b in itertools.combinations(SPLITS, 2):
        for what, x, y in (
            ("keys", contents[a].keys.keys(), contents[b].keys.keys()),
            ("patients", contents[a].patients, contents[b].patients),
        ):
            both = sorted(set(x) & set(y))
            if both:
                more = f" and {len(both) - show:,} more" if len(both) > show else ""
                problems.append(f"splits {a} and {b} share {len(both):,} {what}: {', '.join(both[:show])}{more}")
    return problems


def verify(dir) -> list[str]:
    """Problems found (empty: every shard matches the manifest). Each names its shard."""
    loc = location.parse(dir)
    m = read_manifest(loc.text)
    problems: list[str] = []
    if m.get("dry_run"):
        problems.append("manifest.json: written by --dry-run, no shards to verify")
    problems += shard_list_problems(m)
    listed: set[str] = set()
    contents = {split: SplitContents() for split in SPLITS}
    for split in SPLITS:
        for s in m["splits"][split].get("shards", []):
            name = s.get("name") if isinstance(s, dict) else s
            if shard_name_problem(name, split) or name in listed:
                continue  # said above; a name that points elsewhere is never opened
            listed.add(name)
            path = loc.local / name if loc.local is not None else loc.url(name)
            problems += _shard_problems(path, s, len(m["labels"]), contents[split])
    problems += leakage(contents)
    for found in sorted(loc.sizes() or ()):
        if SHARD_NAME.match(found) and found not in listed:
            problems.append(f"{found}: {'on disk' if loc.local else 'at ' + loc.text} but not in the manifest")
        elif found.endswith(".tar.partial"):
            problems.append(f"{found}: leftover partial shard (an interrupted `cxrdist shard`; re-run it)")
    return problems
