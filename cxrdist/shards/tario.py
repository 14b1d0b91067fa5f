"""The one tar reader: every reader of shards (the loader, the file loaders, ``verify``, ``bench``) uses it.

Why our own and not ``tarfile`` or webdataset's: a shard is read sample by sample in a loader worker, where
``tarfile`` costs ~100 us of Python per member and webdataset's pipeline adds its own per-sample stages and
pickling-capable decoders; this parser memory-maps the file and walks the 512-byte headers in place (ustar,
pax and GNU long names, checksums checked), a few microseconds a member, and hands out raw bytes only for
the extensions asked for. Nothing is decoded here, and nothing is ever unpickled.

The key / extension rule is webdataset's: the key is the member name up to the first dot after its last
slash, the extension the rest (``split_name``). Members without a dot are not part of any sample.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cxrdist.errors import UserError
from cxrdist.shards import location
from cxrdist.shards.cache import Filler, ShardCache
from cxrdist.shards.location import is_remote
from cxrdist.shards.manifest import IMAGE_EXTS

KNOWN_EXTS = frozenset((*IMAGE_EXTS, "json"))  # everything else in a tar is ignored (never decoded)


class ShardError(UserError):
    """A shard that is missing, truncated, damaged or disagrees with the manifest (the message names it)."""


@dataclass(frozen=True)
class Shard:
    name: str
    path: str
    samples: int
    bytes: int = 0  # 0: unknown (no size check)
    sha256: str = ""  # "": unknown or not to be checked
    cache: ShardCache | None = None  # a streamed shard's node-local cache (--shard-cache)
    source: int = 0  # which source of a mixed shard set it belongs to (cxrdist/shards/mix.py)


# --------------------------------------------------------------------------------------------------------
# reading a tar: raw samples, no decoding
# --------------------------------------------------------------------------------------------------------
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def split_name(fname: str) -> tuple[str, str] | None:
    """webdataset's rule: ``a/b.c.d`` -> key ``a/b``, extension ``c.d`` (lower-case); None without a dot."""
    slash = fname.rfind("/") + 1
    dot = fname.find(".", slash)
    if dot < 0:
        return None
    return fname[:dot], fname[dot + 1 :].lower()


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for very large members
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    """The header checksum: the byte sum with the checksum field read as spaces (8 x 32 = 256).

    Compared modulo 65521 through zlib's Adler-32, whose low half is 1 + the byte sum mod 65521: a third
    of the cost of ``sum(header)`` in Python, run for every member of every shard."""
    stored = _octal(header[148:156])
    byte_sum = (zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 256
    return (stored - byte_sum) % 65521 == 0


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<name>\\n"`` records)."""
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def members(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    expected_bytes: int = 0,
    expected_sha256: str = "",
    read: Callable[[str], bool] = lambda fname: True,
    cache: ShardCache | None = None,
    cache_sha256: str = "",
) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(member name, data)`` for the regular files of a tar, in order (ustar, pax, GNU long names);
    ``data`` is copied out only where ``read(name)`` says so, else None. Raises :class:`ShardError` naming
    the shard for a missing, truncated or damaged file, and, given ``expected_sha256``, for one whose bytes
    hash otherwise.

    A local file is memory-mapped and parsed in place, its hash checked before the first member is yielded
    (nothing of a damaged shard is used; the pages hashed are the ones then parsed, from cache). A URL
    (``location.is_remote``) is streamed through the same parser, hashed as it arrives and checked at its
    end, size included: its samples are used before the check, and a reader that stops inside a shard
    (a training worker whose quota ends there) leaves it unchecked (the loader hashes it again on its next
    read, ``data.stream.ShardStream.hash_rule``). With a ``cache``, a URL
    read whole whose bytes match ``cache_sha256`` is kept on local disk and read from there next time."""
    if is_remote(path):
        url = str(path)
        base, _, file = url.rpartition("/")
        cache = None if url.startswith("pipe:") else cache  # a command has no stable file to key a copy by
        local = cache.hit(base, file, expected_bytes, expected_sha256) if cache and expected_bytes else None
        if local is not None:
            yield from members(local, name=name or file, expected_bytes=expected_bytes, read=read)  # hit() hashed it
            return
        filler = cache.filler(base, file, expected_bytes) if cache and expected_bytes and cache_sha256 else None
        if filler is None and cache and expected_bytes:  # another reader of the node may be filling it
            local = cache.wait_for(base, file, expected_bytes, expected_sha256)
            if local is not None:
                yield from members(local, name=name or file, expected_bytes=expected_bytes, read=read)
                return
        try:
            yield from _streamed_members(url, name, expected_bytes, expected_sha256, read, filler, cache_sha256)
        finally:
            if filler is not None:
                filler.abort()  # a no-op after a commit; a stopped or failed read keeps nothing
        return
    name = name or Path(path).name
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if expected_bytes and size < expected_bytes:
                raise ShardError(f"{name}: truncated tar ({size} of {expected_bytes} bytes in the manifest)")
            if size == 0:
                raise ShardError(f"{name}: truncated tar / unreadable: empty file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ShardError(f"{name}: unreadable: {e.strerror or e}") from None
    with mm:
        if expected_sha256 and hashlib.sha256(mm).hexdigest() != expected_sha256:
            raise ShardError(
                f"{name}: sha256 mismatch: its bytes differ from the manifest's (damaged or replaced shard; "
                f"run `cxrdist verify`)"
            )
        yield from _parse_tar(_Mapped(mm, size), name, read)


def _streamed_members(
    url: str,
    name: str | None,
    expected_bytes: int,
    expected_sha256: str,
    read: Callable[[str], bool],
    filler: Filler | None = None,
    cache_sha256: str = "",
) -> Iterator[tuple[str, bytes | None]]:
    if url.startswith("pipe:"):  # the command with the shard's name already in it
        folder, file = location.Location(url), ""
    else:
        base, _, file = url.rpartition("/")
        folder = location.Location(base)
    name = name or file or url
    where = f"{name} ({url})"
    try:
        stream = folder.open(file, expected_bytes)
    except FileNotFoundError:
        raise ShardError(f"{where}: missing (listed in the manifest)") from None
    except location.LocationError as e:
        raise ShardError(f"{name}: {e}") from None
    with stream:
        src = _Streamed(stream, hashing=bool(expected_sha256) or filler is not None, tee=filler)
        try:
            yield from _parse_tar(src, where, read)
            src.drain()
        except location.LocationError as e:
            raise ShardError(f"{name}: {e}") from None
    if expected_bytes and src.pos != expected_bytes:
        raise ShardError(f"{where}: {src.pos} bytes, the manifest says {expected_bytes} (truncated or replaced shard)")
    if expected_sha256 and src.sha.hexdigest() != expected_sha256:
        raise ShardError(f"{where}: sha256 mismatch: its bytes differ from the manifest's (damaged or replaced shard)")
    if filler is not None and src.pos == expected_bytes and src.sha.hexdigest() == cache_sha256:
        filler.commit()


class _Mapped:
    """A memory-mapped tar, read in place."""

    def __init__(self, mm: mmap.mmap, size: int):
        self.mm, self.size, self.pos = mm, size, 0

    def take(self, n: int) -> bytes:
        data = self.mm[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        n = max(0, min(n, self.size - self.pos))
        self.pos += n
        return n


class _Streamed:
    """A tar arriving over a stream: every byte is counted and hashed as it is read."""

    def __init__(self, f, hashing: bool = True, tee: Filler | None = None):
        self.f, self.pos, self.sha, self.hashing, self.tee = f, 0, hashlib.sha256(), hashing, tee

    def take(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0:
            chunk = self.f.read(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        if self.hashing:
            self.sha.update(data)
        if self.tee is not None:
            self.tee.write(data)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            got = len(self.take(min(n - done, 1 << 20)))
            if not got:
                break
            done += got
        return done

    def drain(self) -> None:
        """Read (and hash) what follows the end-of-archive marker: the tar's padding blocks."""
        while self.skip(1 << 20):
            pass


def iter_tar(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    expected_bytes: int = 0,
    expected_sha256: str = "",
    wanted: frozenset[str] | None = KNOWN_EXTS,
    cache: ShardCache | None = None,
    cache_sha256: str = "",
    select: Callable[[str, str], bool] | None = None,
) -> Iterator[tuple[str, str, bytes | None]]:
    """Yield ``(key, ext, data)`` for the members of a tar that have a key.extension name; ``data`` is None
    (never read) when ``ext`` is not in ``wanted`` (None: every extension), or ``select(key, ext)`` says no."""

    split: tuple[str, str] | None = None

    def read(fname: str) -> bool:  # called for each member just before it is yielded: split once
        nonlocal split
        split = split_name(fname)
        if split is None:
            return False
        chosen = select is None or select(*split)  # every keyed member: select counts the samples
        return chosen and (wanted is None or split[1] in wanted)

    found = members(
        path,
        name=name,
        expected_bytes=expected_bytes,
        expected_sha256=expected_sha256,
        read=read,
        cache=cache,
        cache_sha256=cache_sha256,
    )
    for _fname, data in found:
        if split is not None:
            yield split[0], split[1], data


def _parse_tar(src, name: str, read: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """The one parser, over ``src.take(n)`` / ``src.skip(n)`` (a mapped file or a stream)."""
    long_name: str | None = None
    while True:
        at = src.pos
        header = src.take(_BLOCK)
        if len(header) < _BLOCK:
            raise ShardError(
                f"{name}: truncated tar / unreadable: ends at byte {src.pos} without an end-of-archive marker"
            )
        if header == _ZERO_BLOCK:
            return
        try:
            if not _checksum_ok(header):
                raise ValueError("checksum mismatch")
            msize = _octal(header[124:136])
        except ValueError:
            raise ShardError(f"{name}: damaged tar / unreadable: bad member header at byte {at}") from None
        kind, pad = header[156:157], -msize % _BLOCK
        if kind in (b"L", b"x"):  # the next member's real name (GNU long name, pax header)
            data = src.take(msize)
            _past_end(len(data) < msize or src.skip(pad) < pad, name, at, src.pos)
            long_name = data.split(b"\0", 1)[0].decode("utf-8") if kind == b"L" else _pax_path(data)
            continue
        fname, long_name = long_name, None
        regular = kind in (b"0", b"\0", b"7")  # not directories, links, global pax headers, ...
        if regular and fname is None:
            fname = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:
                fname = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + fname
        if regular and read(fname):
            data = src.take(msize)
            _past_end(len(data) < msize or src.skip(pad) < pad, name, at, src.pos)
            yield fname, data
        else:
            _past_end(src.skip(msize + pad) < msize + pad, name, at, src.pos)
            if regular:
                yield fname, None


def _past_end(short: bool, name: str, at: int, end: int) -> None:
    if short:
        raise ShardError(f"{name}: truncated tar / unreadable: the member at byte {at} runs past the end ({end} bytes)")


RawSample = tuple[str, str, dict[str, bytes]]  # (shard name, key, {ext: bytes})


def iter_shard(
    shard: Shard,
    wanted: frozenset[str] = KNOWN_EXTS,
    check_sha256: bool = True,
    take: Callable[[int], bool] | None = None,
) -> Iterator[RawSample]:
    """Raw samples of one shard (members grouped by key; only ``wanted`` extensions are read), checked
    against the manifest's count and (``check_sha256``, when the shard has one) its hash; a key that comes
    back after other keys (two samples of one key) is a ShardError naming it. ``take(i)``: whether the bytes
    of the shard's ``i``-th sample are copied out at all (a training reader's own samples); the others
    come with no members, skipped unread."""
    count = 0
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    sha = shard.sha256 if check_sha256 else ""
    index, last = -1, None

    def select(k: str, ext: str) -> bool:
        nonlocal index, last
        if k != last:
            index, last = index + 1, k
        return take(index)

    found = iter_tar(
        shard.path,
        name=shard.name,
        expected_bytes=shard.bytes,
        expected_sha256=sha,
        wanted=wanted,
        cache=shard.cache,
        cache_sha256=shard.sha256,
        select=select if take is not None else None,
    )
    for k, ext, data in found:
        if k != key:
            if key is not None:
                count += 1
                yield shard.name, key, members
            if k in seen:
                raise ShardError(f"{shard.name}: key {k} appears twice (two samples of one key; run `cxrdist verify`)")
            seen.add(k)
            key, members = k, {}
        if data is not None:
            members[ext] = data
    if key is not None:
        count += 1
        yield shard.name, key, members
    if count != shard.samples:
        raise ShardError(
            f"{shard.name}: holds {count} samples but the manifest says {shard.samples} "
            f"(truncated or replaced shard; run `cxrdist verify`)"
        )
