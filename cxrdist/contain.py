"""Containment: what a dataset, a manifest or a shard names is read only from inside where it belongs.

A CSV row's image path, a shard's ``source``, a manifest's shard name all come from files cxrdist did not
write (or that someone may have edited). One rule for every reader (docs/SECURITY.md):

- a *path* from a table or a sample is relative, and resolved with symlinks followed it stays inside its
  root (``within``); the table-level check (``escapes``) is the same rule without touching the disk, so a
  row that tries to leave is skipped before anything is opened, with one reason for all of them (whether the
  file exists elsewhere is never told);
- a *shard name* is a plain ``{split}-NNNNNN.tar`` of its own split (``shard_name_problem``), nothing else.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

OUTSIDE = "outside the dataset root"
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")


class Outside(ValueError):
    """A path that leaves its root."""


def escapes(rel: str) -> bool:
    """True when ``rel`` (a path as a table gives it) is absolute, empty, holds a NUL or backslash, or climbs
    above its start with ``..``. Pure: no file system access."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return True
    norm = posixpath.normpath(rel)
    return norm == ".." or norm.startswith("../") or norm == "."


def within(root: str | Path, rel: str) -> Path:
    """``root / rel`` if it stays inside ``root`` once symlinks are followed, else ``Outside``."""
    if escapes(str(rel)):
        raise Outside(OUTSIDE)
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise Outside(OUTSIDE)
    return path


def shard_name_problem(name, split: str) -> str | None:
    """Why ``name`` is not a shard name of ``split`` (None: it is one)."""
    if not isinstance(name, str) or not SHARD_NAME.match(name):
        return f"{name!r} is not a shard name ({split}-NNNNNN.tar)"
    if not name.startswith(split + "-"):
        return f"{name!r} is listed under split {split!r}"
    return None
