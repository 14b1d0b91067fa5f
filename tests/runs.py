"""`cxrdist train` from the tests, as a user runs it: the CLI in a subprocess, its run folder, a preemption."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

# the smallest real training: DenseNet-121 at 32 px on the CPU, in-process loading
TINY_CPU = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


def train(*args, env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cxrdist.cli", "train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def summary(run: Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())


def records(run: Path, rank: int, event: str | None = None) -> list[dict]:
    """Telemetry records of one rank (``event``: only those); none while the file does not exist yet."""
    f = Path(run) / "telemetry" / f"rank{rank}.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return [r for r in recs if event is None or r.get("event") == event]


def preempted(args: list, run: Path, after_lines: int, timeout: float = 300) -> tuple[dict, str]:
    """Start `cxrdist train ARGS --out RUN`, send SIGUSR2 (SLURM's warning before the time limit) once rank 0
    has written ``after_lines`` telemetry lines, wait for it to stop; (its summary, its stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrdist.cli", "train", *map(str, args), "--out", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tel = Path(run) / "telemetry" / "rank0.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (tel.exists() and len(tel.read_text().splitlines()) >= after_lines):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)  # `cxrdist train --nproc` forwards it to every rank
    _, err = proc.communicate(timeout=timeout)
    return summary(run), err
