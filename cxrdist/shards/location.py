"""Where a shard folder lives: a local folder, ``file://``, ``s3://``, ``gs://``, ``http(s)://`` or ``pipe:``.

A ``Location`` names the folder; the manifest's shard names are files under it (``contain.SHARD_NAME``
keeps them plain names, so nothing outside it is ever read). Local folders keep the memory-mapped path;
everything else is streamed.

Which client, and why: fsspec's filesystems (s3fs for S3, gcsfs for GCS, its aiohttp-based HTTP
filesystem), because they read credentials and endpoints the way each store's own tools do
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws`` profiles, ``GOOGLE_APPLICATION_CREDENTIALS``), so
MinIO, Ceph and on-prem S3 work unchanged; webdataset's ``gopen`` would shell out to ``curl``/``aws`` per
shard, with no sizes, no listing and errors only as exit codes. ``pipe:CMD`` (webdataset's convention)
stays for anything else: ``CMD`` with ``{name}`` replaced by a file name, its stdout read.

Reading is sequential (a tar is parsed as it arrives: no whole-file download first). A transient failure
(connection reset, timeout, 5xx) is retried a bounded number of times with backoff, resuming at the byte
where it broke (a range request where the store serves ranges, else re-reading and discarding); after
that a ``LocationError`` names the URL. Every retry is a warning line, so a slow store is never silent.

Bounds (docs/SECURITY.md), so that a server that stalls or never answers costs seconds, not hours:
- ``READ_TIMEOUT_S`` (30 s): an HTTP read that gets no byte for that long fails (and is retried);
- ``READ_DEADLINE_S`` (60 s): a read stops retrying once it has lasted that long (5 tries at most), so a
  shard whose server stalls or never answers costs about 60 s plus one read timeout (two tries);
- ``HOST_GIVE_UPS`` (2): after two reads from one host have given up, this process tries no other read
  from it ("the host keeps failing"), so a command spends at most about 3 minutes on a dead host.
Both times can be set with ``CXRDIST_READ_TIMEOUT_S`` / ``CXRDIST_READ_DEADLINE_S``.

What a server sends is not trusted either: a redirect to another scheme or host is refused (set
``CXRDIST_ALLOW_REDIRECTS=1`` to follow), a 4xx is named with its code, an HTML page is not a shard.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cxrdist.errors import UserError

SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "https"}
EXTRAS = {"s3": ("s3fs", "s3"), "gcs": ("gcsfs", "gcs"), "http": ("aiohttp", "http"), "https": ("aiohttp", "http")}
ATTEMPTS, BACKOFF_S = 5, 0.5  # per read: 5 tries, 0.5 s doubling between them
READ_TIMEOUT_S, READ_DEADLINE_S, HOST_GIVE_UPS = 30.0, 60.0, 2  # see the module docstring
CHUNK = 1 << 20
logger = logging.getLogger(__name__)
_GAVE_UP: dict[str, int] = {}  # host -> reads from it that gave up in a row, in this process
_REDIRECTED: dict[str, str] = {}  # URL -> where the server sent the client (same scheme and host)


def read_timeout() -> float:
    return float(os.environ.get("CXRDIST_READ_TIMEOUT_S") or READ_TIMEOUT_S)


def read_deadline() -> float:
    return float(os.environ.get("CXRDIST_READ_DEADLINE_S") or READ_DEADLINE_S)


class RedirectRefused(Exception):
    """A redirect to another scheme or host (raised inside aiohttp's redirect hook, which stops it)."""


def redirect_allowed(src: str, dest: str) -> bool:
    a, b = urlparse(src), urlparse(dest)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc) or os.environ.get("CXRDIST_ALLOW_REDIRECTS") == "1"


async def _on_redirect(session, ctx, params) -> None:
    """aiohttp's hook before it follows a redirect: refuse another host, note the new URL."""
    from urllib.parse import urljoin

    src = str(params.url)
    dest = urljoin(src, params.response.headers.get("Location", ""))
    if not redirect_allowed(src, dest):
        raise RedirectRefused(
            f"the server redirects to {dest}, another scheme or host: refused (CXRDIST_ALLOW_REDIRECTS=1 follows it)"
        )
    _REDIRECTED[src] = dest


def final_url(url: str) -> str:
    """Where ``url`` ends after the redirects that were followed."""
    seen = {url}
    while url in _REDIRECTED and _REDIRECTED[url] not in seen:
        url = _REDIRECTED[url]
        seen.add(url)
    return url


_TRACE: Any = None


def _trace_configs() -> list:
    """One TraceConfig per process (fsspec keys its cached filesystem by the options' text)."""
    global _TRACE
    if _TRACE is None:
        import aiohttp

        _TRACE = aiohttp.TraceConfig()
        _TRACE.on_request_redirect.append(_on_redirect)
    return [_TRACE]


class LocationError(UserError):
    """A location that cannot be used (unknown scheme, missing extra, unreachable); the message names it."""


def is_remote(text: str | Path) -> bool:
    """Whether ``text`` names a location that is streamed (a URL other than file://, or pipe:)."""
    t = str(text)
    return t.startswith("pipe:") or urlparse(t).scheme in SCHEMES


@dataclass(frozen=True)
class Location:
    text: str  # as given (a URL or a path)

    @property
    def scheme(self) -> str:
        if self.text.startswith("pipe:"):
            return "pipe"
        return SCHEMES.get(urlparse(self.text).scheme, "")

    @property
    def local(self) -> Path | None:
        """The folder, for a local location (a path or file://); None for a streamed one."""
        if self.scheme:
            return None
        return Path(urlparse(self.text).path) if self.text.startswith("file://") else Path(self.text)

    @property
    def name(self) -> str:
        """The folder's own name (its last path segment)."""
        if self.local is not None:
            return self.local.resolve().name
        if self.scheme == "pipe":
            return "pipe"
        return self.text.rstrip("/").rsplit("/", 1)[-1] or self.scheme

    def url(self, name: str) -> str:
        """Where file ``name`` of this folder is (a path for local locations)."""
        if self.local is not None:
            return str(self.local / name)
        if self.scheme == "pipe":
            return self.text.replace("{name}", name)
        return self.text.rstrip("/") + "/" + name

    def __str__(self) -> str:
        return self.text

    # -- remote access ------------------------------------------------------------------------------
    @cached_property
    def fs(self) -> Any:
        """The fsspec filesystem (imported on first use; a missing extra is a one-line error)."""
        import fsspec

        module, extra = EXTRAS[self.scheme]
        # no listing cache: a folder re-uploaded while this process lives (a rerun of `cxrdist shard --out
        # s3://...`) is read as it is now, not by a stale ETag (HTTP 412); fsspec keeps one instance per
        # process (new after a fork), so a shard costs no new client or credential lookup
        options: dict[str, Any] = {"use_listings_cache": False}
        if self.scheme in ("http", "https"):  # no whole-body limit (aiohttp's 300 s would cut a big shard):
            import aiohttp  # a read without a byte for read_timeout() fails instead

            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=min(30.0, read_timeout()), sock_read=read_timeout()
            )
            options["client_kwargs"] = {"timeout": timeout, "trace_configs": _trace_configs()}
        try:
            return fsspec.filesystem(self.scheme, **options)
        except ImportError:
            raise LocationError(
                f"{self.text}: reading {self.scheme}:// locations needs {module}: pip install 'cxrdist[{extra}]'"
            ) from None

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def sizes(self) -> dict[str, int] | None:
        """File name -> size of everything in the folder, from one listing; None where the location cannot
        list (pipe:, an HTTP server without an index page)."""
        if self.local is not None:
            return {p.name: p.stat().st_size for p in self.local.iterdir() if p.is_file()}
        if self.scheme == "pipe":
            return None
        web = self.scheme in ("http", "https")
        try:
            found = self.fs.ls(self.text.rstrip("/") + ("/" if web else ""), detail=True)
        except FileNotFoundError:
            return None if web else {}
        except Exception as e:  # noqa: BLE001 - a store's client raises its own kinds: one line naming it
            if web:
                return None
            raise LocationError(f"{self.text}: cannot list it: {first_line(e)}") from None
        out = {str(i["name"]).rstrip("/").rsplit("/", 1)[-1]: int(i.get("size") or 0) for i in found}
        return out if not web or "manifest.json" in out else None  # a page of other links is no listing

    @property
    def writable(self) -> bool:
        return self.local is not None or self.scheme in ("s3", "gcs")

    def put(self, local: Path, name: str) -> None:
        """Upload ``local`` as file ``name`` (an object store shows an object only once it is complete)."""
        if not self.writable:
            raise LocationError(f"{self.text}: cannot write there (shards go to a folder, s3:// or gs://)")
        try:
            self.fs.put_file(str(local), self.url(name))
        except Exception as e:  # noqa: BLE001 - the store's client raises its own kinds: one line naming it
            raise LocationError(f"{self.url(name)}: upload failed: {first_line(e)}") from None

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.url(name))
        except FileNotFoundError:
            pass

    def open(self, name: str, expected_bytes: int = 0) -> io.BufferedIOBase:
        """A sequential binary stream of file ``name`` that retries and resumes (see the module docstring).
        A missing file is FileNotFoundError; an unreachable one a LocationError naming its URL. Buffered in
        1 MB reads: each read of the client crosses to fsspec's event-loop thread, too dear per tar member."""
        if self.local is not None:
            return open(self.url(name), "rb")
        return io.BufferedReader(Stream(self, name, expected_bytes), buffer_size=CHUNK)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if not text and "Timeout" in type(e).__name__:
        text = f"no byte for {read_timeout():g} s"
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def parse(text: str | Path) -> Location:
    """A ``--shards`` / ``verify`` argument as a Location; an unknown scheme is a one-line error."""
    t = str(text)
    scheme = urlparse(t).scheme
    if t.startswith("pipe:"):
        if "{name}" not in t:
            raise LocationError(f"{t}: a pipe: location needs {{name}} where the file name goes")
        return Location(t)
    if scheme and scheme not in SCHEMES and scheme != "file" and not (len(scheme) == 1 and t[1:3] == ":\\"):
        raise LocationError(
            f"{t}: unknown location scheme {scheme!r}: use a folder, file://, s3://, gs://, http(s):// or pipe:CMD"
        )
    return Location(t)


def transient(e: BaseException) -> bool:
    """Failures worth another try: connection resets, timeouts, server errors (not 404 or 403)."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(e, ConnectionError | TimeoutError | OSError):
        return True
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)  # server errors, request timeout, slow down
    name = type(e).__name__
    return any(k in name for k in ("Timeout", "Connection", "Disconnected", "Payload", "ClientError", "Incomplete"))


def http_refusal(e: BaseException) -> str | None:
    """ "403 Forbidden" for an HTTP answer that refuses (4xx other than 404, and not a timeout or rate
    limit), found on ``e`` or the error it was raised from (fsspec reports them as FileNotFoundError)."""
    for err in (e, e.__cause__, e.__context__):
        status = getattr(err, "status", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (404, 408, 429):
            from http import HTTPStatus

            reason = getattr(err, "message", "") or (
                HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            )
            return f"{status} {reason}".strip()
    return None


class Stream(io.RawIOBase):
    """File ``name`` of a remote location read front to back; each read that fails transiently reopens the
    file at the byte reached (``ATTEMPTS`` tries with doubling ``BACKOFF_S``)."""

    def __init__(self, location: Location, name: str, expected_bytes: int = 0):
        super().__init__()
        self.location, self.name, self.url = location, name, location.url(name)
        self.host = urlparse(self.url).netloc if location.scheme != "pipe" else "pipe"
        self.expected_bytes = expected_bytes
        self.pos = 0
        self._f: Any = None
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        if _GAVE_UP.get(self.host, 0) >= HOST_GIVE_UPS:
            raise LocationError(
                f"{self.url}: not tried: the last {_GAVE_UP[self.host]} reads from {self.host} gave up "
                "(the host keeps failing)"
            )
        self._retry(self._open)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        self._close_source()
        if self.location.scheme == "pipe":
            self._stderr = tempfile.TemporaryFile()  # never a pipe: a chatty command would block on it
            try:
                self._proc = subprocess.Popen(shlex.split(self.url[5:]), stdout=subprocess.PIPE, stderr=self._stderr)
            except OSError as e:
                raise LocationError(f"{self.url}: cannot run the command: {e.strerror or e}") from None
            self._f = self._proc.stdout
            self._discard(self.pos)
            return
        fs = self.location.fs
        if self.location.scheme in ("http", "https"):  # the fs gives a read timeout, not a whole-body one
            headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
            # a stream (no range request per block). A size, even a stand-in where none is known (a streamed
            # file does not use it), spares fsspec's HEAD: it reports an unreachable server as a missing file,
            # and doubles every read timeout; the GET itself says 404, or what the file is
            size = self.expected_bytes or 1 << 62
            self._f = fs.open(self.url, "rb", block_size=0, headers=headers, size=size)
            response = getattr(self._f, "r", None)
            status = getattr(response, "status", 200)
            kind = str(getattr(response, "headers", {}).get("Content-Type", ""))
            if kind.startswith("text/html"):  # a login page or a proxy's error page, sent with 200
                what = "a tar" if self.name.endswith(".tar") else f"{self.name}"
                raise LocationError(
                    f"{final_url(self.url)}: the server sent text/html (an error or login page), not {what}"
                )
            if self.pos and status != 206:  # the server ignores ranges: read again up to where it broke
                self._discard(self.pos)
        else:
            self._f = fs.open(self.url, "rb", block_size=8 * CHUNK, cache_type="readahead")
            self._f.seek(self.pos)

    def _discard(self, n: int) -> None:
        while n > 0:
            got = self._f.read(min(n, CHUNK))
            if not got:
                raise ConnectionError(f"the stream ended at byte {self.pos - n} while resuming at {self.pos}")
            n -= len(got)

    def _retry(self, fn, *args):
        delay, started = BACKOFF_S, time.monotonic()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn(*args)
            except LocationError:
                raise
            except Exception as e:  # noqa: BLE001 - the store's client decides the kind; transient() reads it
                self._refused(e)
                e = e.__cause__ if isinstance(e, FileNotFoundError) else e  # fsspec's "not found": unreachable
                if not transient(e) or attempt == ATTEMPTS or time.monotonic() - started > read_deadline():
                    _GAVE_UP[self.host] = _GAVE_UP.get(self.host, 0) + 1
                    raise LocationError(
                        f"{final_url(self.url)}: unreadable after {attempt} attempt(s) in "
                        f"{time.monotonic() - started:.0f} s at byte {self.pos}: {first_line(e)}"
                    ) from None
                from cxrdist.redact import redact

                logger.warning(
                    "%s", redact(f"{final_url(self.url)}: {first_line(e)} at byte {self.pos}; retry {attempt} of "
                                 f"{ATTEMPTS - 1} in {delay:g} s")
                )  # fmt: skip
                self._close_source()  # the next attempt reopens at self.pos (_read_once, or _open itself)
                time.sleep(delay)
                delay *= 2

    def _refused(self, e: Exception) -> None:
        """What is no reason to try again, said as it is: a refused redirect, a 4xx, a missing file."""
        for err in (e, e.__cause__, e.__context__):
            if isinstance(err, RedirectRefused):
                raise LocationError(f"{self.url}: {err}") from None
        refusal = http_refusal(e)
        if refusal:  # 401, 403, 410, ...: said as the server said it (a 403 is no missing file)
            raise LocationError(f"{final_url(self.url)}: the server answered {refusal}") from None
        if isinstance(e, FileNotFoundError) and not (e.__cause__ and transient(e.__cause__)):
            raise FileNotFoundError(f"{final_url(self.url)}: no such file") from None

    def _read_once(self, n: int) -> bytes:
        if self._f is None:
            self._open()
        data = self._f.read(n)
        if not data and self._proc is not None and self._proc.wait() != 0:
            self._stderr.seek(0)
            tail = self._stderr.read()[-300:].decode("utf-8", "replace").strip()
            raise LocationError(f"{self.url}: the command exited with {self._proc.returncode}: {tail}")
        if not data and self.expected_bytes and self.pos < self.expected_bytes:
            raise ConnectionError(f"the stream ended at byte {self.pos} of {self.expected_bytes}")
        if not data:
            _GAVE_UP.pop(self.host, None)  # read to its end: the host works
        return data

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        data = self._retry(self._read_once, n)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _close_source(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001,S110 - closing a broken connection: nothing to keep
                pass
            self._f = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def close(self) -> None:
        self._close_source()
        super().close()
