"""The demo data: a synthetic CheXpert-layout set packed once into shards, for `make demo` and a launcher
called without ``--shards``.

Paths are the caller's, never the package's (it may be installed from a wheel): ``shards/demo`` under the
working directory, from the checkout's embedded ``demo/chexpert`` when it is there, else synthesised.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from cxrdist.errors import UserError

DEMO_SHARDS = Path("shards/demo")
DEMO_RAW = Path("demo/chexpert")
DEMO_N, DEMO_RAW_SIZE, DEMO_PACK_SIZE = 2400, 128, 64
DEMO_PACK = dict(size=DEMO_PACK_SIZE, workers=2, samples_per_shard=250, quiet=True)  # the rest: pack's defaults


def demo_shards() -> Path:
    return DEMO_SHARDS.absolute()


def ensure_demo_shards(out: Path | None = None, log: TextIO | None = None, raw: Path | None = None) -> Path:
    """The demo shards at ``out`` (default ``shards/demo``), packed on first use; two callers at once: one
    packs, the other waits for it."""
    import fcntl

    log = log or sys.stderr
    out = Path(out or demo_shards())
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "manifest.json").is_file():
            return out
        from cxrdist.shards.pack import pack
        from cxrdist.synth import synthesize

        t0 = time.monotonic()
        print(f"demo data: {DEMO_N} CheXpert-layout images packed into {out} (first use only)", file=log)
        raw = Path(raw or DEMO_RAW)
        root = raw / "CheXpert-v1.0-small"
        if not (root / "train.csv").is_file():
            root = Path(synthesize(layout="chexpert", out=raw, n=DEMO_N, size=DEMO_RAW_SIZE, seed=0))
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = pack(source="chexpert", root=root, out=tmp, **DEMO_PACK)
        if manifest is None:
            raise UserError(f"packing the demo data into {tmp} failed")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        counts = {k: v["samples"] for k, v in manifest["splits"].items()}
        print(f"demo data ready in {time.monotonic() - t0:.0f} s: {counts} at {DEMO_PACK_SIZE} px", file=log)
    return out
