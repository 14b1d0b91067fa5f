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
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR2, signal.SIGTERM)}
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                print(
                    f"cxrdist train: rank {bad[0]} exited with code {procs[bad[0]].returncode}; "
                    f"stopping the other ranks",
                    file=sys.stderr,
                )
            sig = stop_signal(None if failed_at is None else time.monotonic() - failed_at, grace_s)
            if sig is not None:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(sig)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    found = RunFolder(cfg.run.out).read_summary()
    summary = found.to_dict() if found else {}
    if any(codes):
        if failed_at is None:  # every rank ended between two polls
            print(f"cxrdist train: rank(s) exited with code(s) {codes}", file=sys.stderr)
        summary = {**summary, "status": "failed", "exit_codes": codes}
    return summary
