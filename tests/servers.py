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
    the next N requests of it, ``gone`` (404)."""

    def __init__(self):
        self.drop: dict[str, int] = {}
        self.gone: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (file name, Range header or "")


class Handler(http.server.SimpleHTTPRequestHandler):
    ranges = True
    faults: Faults

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        name = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.faults.requests.append((name, self.headers.get("Range", "")))
        if name in self.faults.gone:
            self.send_error(404)
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

    def do_HEAD(self):
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
