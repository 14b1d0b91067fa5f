"""`cxrdist train --nproc N`: start N local ranks, like torchrun, and end them all if one fails.

Each rank gets its share of the cores as torch threads (oversubscribed CPU ranks waste the machine). If a
rank exits non-zero, the others are given a short grace period and then terminated, so a crashing rank
ends the job instead of leaving the rest blocked in a collective.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from cxrdist import dist
from cxrdist.config import TrainConfig, config_to_argv
from cxrdist.runfolder import RunFolder

SPAWNED = "CXRDIST_SPAWNED"  # set in the ranks this launcher starts: they train instead of spawning again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_signal(since_failure_s: float | None, grace_s: float) -> int | None:
    """What the other ranks get once one rank has failed: nothing during ``grace_s`` (they may be writing
    their summary), then SIGTERM, and SIGKILL after a second grace period (a stopped or wedged rank ignores
    SIGTERM: without the kill the launcher would wait forever)."""
    if since_failure_s is None or since_failure_s <= grace_s:
        return None
    return signal.SIGTERM if since_failure_s <= 2 * grace_s else signal.SIGKILL


def supervise(procs: list[subprocess.Popen], grace_s: float, poll_s: float = 0.2) -> list[int]:
    """Wait for every rank; once one exits non-zero, ask the others for their stacks (SIGUSR1, see
    ``trainer.dump_stacks_on``: where a rank is stuck is the one thing its log cannot say), then stop them
    (``stop_signal``). Every rank is polled each round: a failed rank 1 behind a rank 0 that is stuck outside
    any collective (so never errors) must still end the job. Returns the exit codes, by rank."""
    failed_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                print(
                    f"cxrdist train: rank {bad[0]} exited with code {codes[bad[0]]}; stopping the other ranks "
                    f"(their stacks follow)",
                    file=sys.stderr,
                )
                send(procs, signal.SIGUSR1)
            sig = stop_signal(None if failed_at is None else time.monotonic() - failed_at, grace_s)
            if sig is not None:
                send(procs, sig)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        send(procs, signal.SIGTERM)
        raise
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if any(codes) and failed_at is None:  # every rank ended between two polls
        print(f"cxrdist train: rank(s) exited with code(s) {codes}", file=sys.stderr)
    return codes


def send(procs: list[subprocess.Popen], sig: int) -> None:
    """``sig`` to every rank still running."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def spawn_local(cfg: TrainConfig, grace_s: float = 10.0) -> dict:
    n = cfg.dist.nproc
    threads = max(1, dist.cpu_count() // n)
    port = free_port()
    argv = [sys.executable, "-m", "cxrdist.cli", "train", *config_to_argv(cfg)]
    procs = []
    for rank in range(n):
        env = dict(
            os.environ,
            **dist.local_rank_env(rank, n, port),
            OMP_NUM_THREADS=str(threads),
            CXRDIST_THREADS=str(threads),
            **{SPAWNED: "1"},
        )
        procs.append(subprocess.Popen(argv, env=env))

    def forward(signum, frame):  # preemption (USR2) or termination sent to this launcher reaches every rank
        send(procs, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        codes = supervise(procs, grace_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    found = RunFolder(cfg.run.out).read_summary()
    summary = found.to_dict() if found else {}
    if any(codes):
        summary = {**summary, "status": "failed", "exit_codes": codes}
    return summary
