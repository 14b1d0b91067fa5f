"""What the target has: a SLURM controller that answers, its partitions (``sinfo``), this machine's GPUs.

The parsers (``parse_sinfo``, ``gres_gpus``, ``minutes``, ``ping_up``) are pure functions of the tools'
text, unit-tested against real output; the probes around them only run the tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cxrdist.launch.args import LaunchError

SINFO_FORMAT = "%P|%D|%c|%G|%l"  # partition (default marked *), nodes, CPUs per node, gres, time limit


def run_tool(cmd: list[str], timeout: float = 5.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def ping_up(stdout: str) -> bool:
    """`scontrol ping`: 'Slurmctld(primary) at node1 is UP' (and a backup line, perhaps)."""
    return " is UP" in stdout or stdout.strip().endswith("UP")


_PING_CACHE: dict[tuple, tuple[float, bool]] = {}


def controller_answers(timeout: float = 3.0, max_age_s: float = 30.0) -> bool:
    """A SLURM controller answers `scontrol ping` (installed client tools alone are not enough).

    Remembered for ``max_age_s`` per (SLURM_CONF, PATH): a sweep asks once per run, and a missing controller
    costs up to ``timeout`` seconds (scontrol retries a SLURM_CONF naming a missing file for ~60 s).
    """
    conf = os.environ.get("SLURM_CONF")
    if not shutil.which("scontrol") or not shutil.which("sbatch") or (conf and not Path(conf).is_file()):
        return False
    key = (conf, os.environ.get("PATH"))
    hit = _PING_CACHE.get(key)
    if hit and time.monotonic() - hit[0] < max_age_s:
        return hit[1]
    r = run_tool(["scontrol", "ping"], timeout)
    answers = bool(r and r.returncode == 0 and ping_up(r.stdout))
    _PING_CACHE[key] = (time.monotonic(), answers)
    return answers


def resolve_cluster(args) -> str:
    """``--cluster auto`` is SLURM only when a controller answers (not merely because ``srun`` is installed,
    submitit's own rule); otherwise submitit's LocalExecutor runs the tasks here."""
    cluster = getattr(args, "cluster", "auto") or "auto"
    if cluster == "auto":
        return "slurm" if controller_answers() else "local"
    if cluster == "slurm" and not controller_answers():
        raise LaunchError(
            "--cluster slurm: no SLURM controller answers `scontrol ping` "
            "(check SLURM_CONF; for this machine use --cluster local)"
        )
    return cluster


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    cpus: int  # per node (the smallest)
    gpus: int  # per node (the smallest; 0: none)
    max_time_min: int | None  # None: no limit
    default: bool = False


def gres_gpus(gres: str) -> int:
    """`gpu:4`, `gpu:a100:8(S:0-1)`, `gpu:a100:4,gpu:v100:2`, `(null)` -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def minutes(limit: str) -> int | None:
    """sinfo time limits: infinite, 30, 1:00:00, 2-00:00:00 -> minutes (seconds round up); None: no limit."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def parse_sinfo(text: str) -> dict[str, Partition]:
    """`sinfo -h -o SINFO_FORMAT` -> partitions. One line per node configuration of a partition: nodes are
    summed and the smallest CPUs and GPUs kept, so a plan that fits fits every node."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, gres, limit = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_n = int("".join(c for c in cpus.split("/")[0] if c.isdigit()) or 0)
        p = Partition(name, int(nodes), cpus_n, gres_gpus(gres), minutes(limit), default)
        if name in parts:
            q = parts[name]
            p = replace(
                q,
                nodes=q.nodes + p.nodes,
                cpus=min(q.cpus, p.cpus),
                gpus=min(q.gpus, p.gpus),
                default=q.default or p.default,
            )
        parts[name] = p
    return parts


def slurm_partitions() -> dict[str, Partition]:
    r = run_tool(["sinfo", "-h", "-o", SINFO_FORMAT], 10)
    if r is None or r.returncode:
        raise LaunchError(f"sinfo failed: {(r.stderr.strip() if r else 'timed out')}")
    return parse_sinfo(r.stdout)


def visible_count(visible: str | None, listed: int) -> int:
    """GPUs usable here: ``nvidia-smi -L``'s count, limited by CUDA_VISIBLE_DEVICES ('' or -1: none)."""
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if visible:
        return min(listed, len([x for x in visible.split(",") if x.strip()]))
    return listed


def local_gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    r = run_tool(["nvidia-smi", "-L"], 10)
    listed = sum(1 for ln in (r.stdout.splitlines() if r and r.returncode == 0 else []) if ln.startswith("GPU "))
    return visible_count(os.environ.get("CUDA_VISIBLE_DEVICES"), listed)
