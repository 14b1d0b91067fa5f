"""A per-node cache of streamed shards (``--shard-cache DIR``, e.g. node-local NVMe).

The first read of a shard from a URL location streams it as usual and writes the bytes beside the parse into
``DIR/<location hash>/<name>.partial-<pid>``; once the whole shard has arrived and its size and sha256 match
the manifest, the file is renamed into place (atomic), and later reads memory-map the local copy. A reader
that stops inside a shard, or finds its bytes wrong, keeps nothing.

Shared by the ranks (and loader workers) of a node: a shard is filled by whoever holds its ``.lock``
(``fcntl.flock``, released by the kernel if that process dies); another reader that needs it meanwhile
waits for that copy while its partial file grows (``wait_for``), so a shard that several readers of a node
need (every training reader walks every shard: data.stream) is downloaded once; a filler that stalls for
``STALL_S`` is given up on and the shard streamed. Bounded: before a shard is kept,
the least recently used ones are evicted until it fits under ``limit_bytes`` (a shard that alone exceeds
it is not kept).

A cache is a convenience, never a reason to fail: a copy that fails its sha256 is dropped and the shard read
from its URL again (once); a cache that cannot be written mid-run (disk full, gone read-only) stops
caching with one warning per process, its partial file removed, and the read goes on streaming.
``check_folder`` refuses an unusable folder before any rank starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cxrdist.errors import UserError

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # what this process has already warned about (once each)
STALL_S = 30.0  # a filler whose partial file has not grown for this long is given up on


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning("%s", message)


def check_folder(root: str | Path, largest: int) -> None:
    """A usable cache folder before any rank starts: a folder (made if missing), writable, with room for the
    largest shard; otherwise a UserError naming it and what is wrong."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--shard-cache {root}: a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--shard-cache {root}: cannot write there: {e.strerror or e}") from None
    free = shutil.disk_usage(root).free
    if free < largest:
        raise UserError(
            f"--shard-cache {root}: {free / 1e6:,.0f} MB free, the largest shard is {largest / 1e6:,.0f} MB: free "
            "some room, or choose another folder"
        )


@dataclass(frozen=True)
class ShardCache:
    root: str
    limit_bytes: int

    def folder(self, base_url: str) -> Path:
        return Path(self.root) / hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]

    def hit(self, base_url: str, name: str, size: int, sha256: str = "") -> Path | None:
        """The local copy of a shard, when it is there whole (its use is recorded for eviction). ``sha256``: its
        bytes are checked first; a copy that differs (a disk error, a hand-edited file) is dropped, so the
        shard is read from its URL again instead of failing every run that finds it."""
        path = self.folder(base_url) / name
        try:
            if path.stat().st_size != size:
                return None
            if sha256:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                    if digest.hexdigest() != sha256:
                        path.unlink()
                        logger.warning("%s: the cached copy failed its sha256: dropped, read from the URL again", path)
                        return None
            os.utime(path)  # least recently used: by modification time, touched on every hit
        except OSError:
            return None
        return path

    def wait_for(self, base_url: str, name: str, size: int, sha256: str = "") -> Path | None:
        """Another reader of this node is filling ``name``: its copy once it is in place, or None when nobody
        is filling it (any more) or its partial file stopped growing for ``STALL_S``."""
        folder, grown, since = self.folder(base_url), -1, time.monotonic()
        while True:
            path = self.hit(base_url, name, size, sha256)
            if path is not None:
                return path
            partials = list(folder.glob(f"{name}.partial-*"))
            if not partials:
                return self.hit(base_url, name, size, sha256)  # it may have landed just now
            now = sum(p.stat().st_size for p in partials if p.exists())
            if now != grown:
                grown, since = now, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                return None
            time.sleep(0.05)

    def filler(self, base_url: str, name: str, size: int) -> Filler | None:
        """Someone to write a shard into the cache as it streams; None when another process is filling it or
        it can never fit."""
        if size > self.limit_bytes or self.root in _BROKEN:
            return None
        folder = self.folder(base_url)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = open(folder / f"{name}.lock", "wb")  # noqa: SIM115 - held until the filler ends
        except OSError as e:
            self.broken(e)
            return None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return None
        try:
            return Filler(self, folder / name, size, lock)
        except OSError as e:
            lock.close()
            self.broken(e)
            return None

    def broken(self, e: OSError) -> None:
        """The cache cannot be written (disk full, read-only now): this process stops caching, says so once,
        and reads on from the URLs."""
        _BROKEN.add(self.root)
        warn_once(f"broken:{self.root}", f"--shard-cache {self.root}: {e.strerror or e}: no longer caching in this "
                  "process; the shards are streamed")  # fmt: skip

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


_BROKEN: set[str] = set()  # cache roots this process could not write


class Filler:
    """Writes one shard's bytes as they stream; ``commit()`` keeps the file, anything else drops it. A write
    that fails (disk full) drops the partial file and ends caching in this process (``ShardCache.broken``);
    the stream itself goes on."""

    def __init__(self, cache: ShardCache, path: Path, size: int, lock: BinaryIO):
        self.cache, self.path, self.size, self.lock = cache, path, size, lock
        self.partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        self.file: BinaryIO | None = open(self.partial, "wb")  # noqa: SIM115 - closed by commit/abort

    def write(self, data: bytes) -> None:
        if self.file is not None:
            try:
                self.file.write(data)
            except OSError as e:
                self.abort()
                self.cache.broken(e)

    def commit(self) -> None:
        """The shard arrived whole and verified: make room for it, then rename it into place."""
        if self.file is None:  # a write failed: nothing to keep
            return
        try:
            self.file.close()
            self.file = None
            if self.cache.make_room(self.size, self.path):
                os.replace(self.partial, self.path)
        except OSError as e:
            self.cache.broken(e)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails too
                self.file.close()
            self.file = None
        with contextlib.suppress(OSError):
            self.partial.unlink()
        self.lock.close()  # releases the flock
