"""Atomic file writes: readers (and a crash) see the old file or the new one, never half of one.

Write to a temporary file in the same folder, fsync it, ``os.replace`` it over the target (an atomic rename
on POSIX), then fsync the folder so the rename itself survives a power cut.

The file gets the mode an ``open()`` would give it (0666 less the umask): ``mkstemp`` makes its temporary
file 0600 whatever the umask, which left manifests, configs and checkpoints private to their writer in a
lab's shared shard and run folders (and unreadable to a web server serving shards as another user).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_file(path: str | Path, keep: str | Path | None = None) -> Iterator[BinaryIO]:
    """``keep``: move the file being replaced there first (one previous version survives the new one; a
    crash between the two renames leaves only ``keep``, which a reader falls back to)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def current_umask() -> int:
    """The process's umask: Linux shows it in /proc/self/status; elsewhere it is read by setting it and
    setting it straight back (os has no getter), which another thread creating a file at that instant
    could notice."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
