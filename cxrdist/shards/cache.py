"""A per-node cache of streamed shards (``--shard-cache DIR``, e.g. node-local NVMe).

The first read of a shard from a URL location streams it as usual and writes the bytes beside the parse into
``DIR/<location hash>/<name>.partial-<pid>``; once the whole shard has arrived and its size and sha256 match
the manifest, the file is renamed into place (atomic), and later reads memory-map the local copy. A reader
that stops inside a shard, or finds its bytes wrong, keeps nothing.

Shared by the ranks (and loader workers) of a node: a shard is filled by whoever holds its ``.lock``
(``fcntl.flock``, released by the kernel if that process dies); the others stream without caching it
rather than wait, so no shard is downloaded into the cache twice at once. Bounded: before a shard is kept,
the least recently used ones are evicted until it fits under ``limit_bytes`` (a shard that alone exceeds
it is not kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class ShardCache:
    root: str
    limit_bytes: int

    def folder(self, base_url: str) -> Path:
        return Path(self.root) / hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]

    def hit(self, base_url: str, name: str, size: int) -> Path | None:
        """The local copy of a shard, when it is there whole (its use is recorded for eviction)."""
        path = self.folder(base_url) / name
        try:
            if path.stat().st_size != size:
                return None
            os.utime(path)  # least recently used: by modification time, touched on every hit
        except OSError:
            return None
        return path

    def filler(self, base_url: str, name: str, size: int) -> Filler | None:
        """Someone to write a shard into the cache as it streams; None when another process is filling it or
        it can never fit."""
        if size > self.limit_bytes:
            return None
        folder = self.folder(base_url)
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{name}.lock", "wb")  # noqa: SIM115 - held until the filler ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        return Filler(self, folder / name, size, lock)

    def make_room(self, need: int, keep: Path) -> bool:
        """Evict the least recently used shards until ``need`` more bytes fit under the limit."""
        files = [p for p in Path(self.root).glob("*/*.tar") if p != keep]
        stats = []
        for p in files:
            with contextlib.suppress(OSError):
                stats.append((p.stat().st_mtime, p.stat().st_size, p))
        total = sum(s for _, s, _ in stats)
        for _, size, p in sorted(stats):
            if total + need <= self.limit_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
        return total + need <= self.limit_bytes


class Filler:
    """Writes one shard's bytes as they stream; ``commit()`` keeps the file, anything else drops it."""

    def __init__(self, cache: ShardCache, path: Path, size: int, lock: BinaryIO):
        self.cache, self.path, self.size, self.lock = cache, path, size, lock
        self.partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        self.file: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: bytes) -> None:
        if self.file is not None:
            self.file.write(data)

    def commit(self) -> None:
        """The shard arrived whole and verified: make room for it, then rename it into place."""
        try:
            self.file.close()
            self.file = None
            if self.cache.make_room(self.size, self.path):
                os.replace(self.partial, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()
        self.lock.close()  # releases the flock
