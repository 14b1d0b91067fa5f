"""`cxrdist` from the tests, as a user runs it: the plumbing recipe, the CLI in a subprocess or in this
process, its run folder, a preemption.

The plumbing recipe (``TINY``) is ``cxrtiny`` (cxrdist.models: a ~100k-parameter CNN with BatchNorm,
registered in timm like any model; a 1 MB checkpoint) at 32 px on the CPU: a step takes ~5-10 ms where
DenseNet-121 takes ~215 ms, and torch.compile builds it in ~20 s where timm's test_resnet takes ~50 s. Every
test whose subject is the plumbing (backends, resume, streaming, launchers, compile, refusals) trains it;
DenseNet (``DENSE``) is trained only where the model is the subject (tests/README.md lists them).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

# the smallest real training on the CPU, in-process loading; the model is added by TINY / DENSE
TINY_CPU = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
TINY = ["--model", "cxrtiny", *TINY_CPU, "--log-every", "2"]
DENSE = ["--model", "densenet121", *TINY_CPU, "--log-every", "2"]


def train(*args, env: dict | None = None, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`cxrdist train ARGS` in its own process (ranks, signals, exit codes and one-line errors are the
    subject; otherwise see ``in_process``)."""
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


def cli(*args, timeout: float = 300, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Any `cxrdist` subcommand in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "cxrdist.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@contextlib.contextmanager
def process_state():
    """What a CLI run inside this process may change and a later test must not inherit: signal handlers
    (the trainer's SIGUSR2 flag), torch's thread counts, the package logger's handlers."""
    import torch

    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    logger = logging.getLogger("cxrdist")
    kept, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
        del interop  # settable once per process only: never changed by cxrdist
        logger.handlers[:] = kept
        logger.setLevel(level)
        logger.propagate = propagate


def in_process(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`cxrdist ARGS` through ``cxrdist.cli.main`` in this process (single-rank train, eval, predict, export):
    the same parser, checks and exit codes as the command, without 6-8 s of imports per call."""
    from cxrdist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with process_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    proc = subprocess.CompletedProcess(["cxrdist", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def shard_loader(where, split: str, *, batch: int = 4, workers: int = 0, train: bool = False, cache=None,
                 check_sha256: bool = True):  # fmt: skip
    """One rank's loader over ``where``: ShardSet.open + World + train_loader (the ``train`` split) or
    eval_loader (the tests' shorthand for the two values a run builds)."""
    from cxrdist.data import World, eval_loader, train_loader
    from cxrdist.shards.shardset import ShardSet

    shards = ShardSet.open(where, cache=cache, splits=(split,))
    world = World.of(rank=0, world_size=1, workers=workers, seed=0, micro_batch=batch)
    if train:
        return train_loader(shards, world, check_sha256=check_sha256)
    return eval_loader(shards, split, world, check_sha256=check_sha256)


def summary(run: Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())


def records(run: Path, rank: int, event: str | None = None) -> list[dict]:
    """Telemetry records of one rank (``event``: only those); none while the file does not exist yet."""
    f = Path(run) / "telemetry" / f"rank{rank}.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return [r for r in recs if event is None or r.get("event") == event]


def final_weights(run: Path) -> dict:
    import torch

    return torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), k


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


def recorded_samples(run: Path, epoch: int) -> dict[int, list[str]]:
    """--record-samples: rank -> the keys it trained on in ``epoch``, every part of the run in order."""
    out: dict[int, list[str]] = {}
    for f in sorted((Path(run) / "samples").glob(f"epoch{epoch:03d}-rank*-part*.txt")):
        rank = int(f.name.split("-rank")[1][:3])
        out.setdefault(rank, []).extend(f.read_text().split())
    return out


def recorded_batches(run: Path, epoch: int, gb: int) -> list[set[str]]:
    """The epoch's global batches of ``gb`` samples as key sets: each rank trains gb / ranks per step, in order."""
    per_rank = recorded_samples(run, epoch)
    share = gb // len(per_rank)
    steps = {len(keys) // share for keys in per_rank.values()}
    assert len(steps) == 1, "every rank trains the same number of steps"
    return [set().union(*(keys[s * share : (s + 1) * share] for keys in per_rank.values())) for s in range(steps.pop())]
