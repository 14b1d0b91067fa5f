"""Real servers on 127.0.0.1 for the streaming tests: an HTTP file server (ranges on or off, faults on
request), moto's S3 API server (the real boto3/s3fs clients talk to it over HTTP) and gcp-storage-emulator's
GCS JSON API server (gcsfs talks to it as to storage.googleapis.com)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class Faults:
    """What the HTTP server does wrong, per file name: ``drop`` (send half, then cut the connection) for
    the next N requests of it, ``gone`` (404), ``status`` (that status code and its reason, e.g. 403),
    ``html`` (200 with an HTML error page, as a captive portal or a proxy does), ``stall`` (promise the
    Content-Length, send that many bytes, then go silent), ``redirect`` (302 to that URL), ``huge`` (a body of
    that many bytes, produced as it is read), ``hang`` (no answer at all; ``*.tar``: every shard);
    ``auth``: "user:password" every request must carry."""

    def __init__(self):
        self.drop: dict[str, int] = {}
        self.gone: set[str] = set()
        self.status: dict[str, int] = {}
        self.html: set[str] = set()
        self.stall: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self.huge: dict[str, int] = {}
        self.hang: set[str] = set()  # never answered: no status line, nothing
        self.auth: str | None = None
        self.requests: list[tuple[str, str]] = []  # (file name, Range header or "")


class Handler(http.server.SimpleHTTPRequestHandler):
    ranges = True
    faults: Faults

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        name = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        self.faults.requests.append((name, self.headers.get("Range", "")))
        if self.refused(name):
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()  # directory index pages, 404s
        data = path.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if self.ranges and m:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        self.end_headers()
        body = data[start:]
        if self.faults.drop.get(name, 0) > 0:
            self.faults.drop[name] -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(0.3)  # the client reads what arrived, then the connection breaks under its next read
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def refused(self, name: str) -> bool:
        """Answer with the fault set for ``name`` (True), or leave it to the normal reply (False)."""
        f = self.faults
        if f.auth is not None:
            import base64

            want = "Basic " + base64.b64encode(f.auth.encode()).decode()
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
        if name in f.hang or "*.tar" in f.hang and name.endswith(".tar"):
            time.sleep(3600)  # the request is read, no answer ever comes; the server's thread is a daemon
        elif name in f.gone:
            self.send_error(404)
        elif name in f.status:
            self.send_error(f.status[name])
        elif name in f.redirect:
            self.send_response(302)
            self.send_header("Location", f.redirect[name])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif name in f.html:
            page = b"<html><body><h1>Session expired</h1><p>Please log in again.</p></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif name in f.stall:
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 30))  # promises 10 GiB
            self.end_headers()
            self.wfile.write(b"\0" * f.stall[name])
            self.wfile.flush()
            time.sleep(3600)  # silent; the server's thread is a daemon
        elif name in f.huge:
            self.send_response(200)
            self.send_header("Content-Length", str(f.huge[name]))
            self.end_headers()
            left, block = f.huge[name], b"{" + b" " * ((1 << 20) - 1)
            try:
                while left > 0:
                    self.wfile.write(block[: min(left, len(block))])
                    left -= len(block)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what is wanted
                pass
        else:
            return False
        return True

    def do_HEAD(self):
        name = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if self.faults.auth is not None or name in self.faults.status or name in self.faults.redirect:
            self.refused(name)
            return
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
            self.end_headers()
        else:
            super().do_HEAD()


@contextlib.contextmanager
def http_server(root: Path, ranges: bool = True) -> Iterator[tuple[str, Faults, http.server.ThreadingHTTPServer]]:
    """Serve ``root`` on 127.0.0.1 (a free port): yields (base URL, faults, server)."""
    faults = Faults()
    handler = type("H", (Handler,), {"ranges": ranges, "faults": faults})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults, server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        sock.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 API server on 127.0.0.1; yields the environment a client needs (endpoint, test keys)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    finally:
        server.stop()


@contextlib.contextmanager
def gcs_server(bucket: str) -> Iterator[dict[str, str]]:
    """gcp-storage-emulator's GCS JSON API server on 127.0.0.1 with ``bucket``; yields the environment gcsfs
    reads (``STORAGE_EMULATOR_HOST``, and gcsfs's bucket-type probe off: it speaks gRPC, which the emulator
    does not, and would wait 60 s per bucket before falling back to the JSON API that real GCS also serves)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    finally:
        server.stop()


def upload(env: dict[str, str], folder: Path, bucket: str, prefix: str) -> str:
    """Put every file of ``folder`` under s3://bucket/prefix with boto3; returns the URL."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], **_keys(env))
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    for p in sorted(folder.iterdir()):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return f"s3://{bucket}/{prefix}"


def _keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
