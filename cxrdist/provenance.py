"""What ran: versions, hardware, the SLURM job. A Table 3 row compared across clusters is only as good as the
record of what produced it (``summary.json`` -> ``provenance``; the report prints it).

Each value is read without failing: a missing package, driver or checkout reads as ``None``. torch is
imported inside the functions (the launcher reads SLURM's variables without loading it).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path

SLURM_VARS = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "partition": "SLURM_JOB_PARTITION",
    "nodelist": "SLURM_JOB_NODELIST",
    "cluster": "SLURM_CLUSTER_NAME",
    "account": "SLURM_JOB_ACCOUNT",
    "restart_count": "SLURM_RESTART_COUNT",
}


def package_version(name: str) -> str | None:
    """An installed distribution's version, without importing it (DeepSpeed's import costs seconds)."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout cxrdist runs from (``+dirty`` with local changes); None from a wheel."""
    where = where or Path(__file__).resolve().parents[1]
    if not (where / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    """cxrdist (and its commit in a checkout), Python, torch with its CUDA, cuDNN and NCCL, DeepSpeed, timm."""
    import torch

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError):
            nccl = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cxrdist": package_version("cxrdist"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "nccl": nccl,
        "deepspeed": package_version("deepspeed"),
        "timm": package_version("timm"),
        "platform": f"{sys.platform} {platform.machine()}",
    }


def hardware(device_type: str) -> dict:
    """This process's view: its GPUs (name, compute capability, memory) and the driver, or the CPU model."""
    import torch

    from cxrdist.dist import device_name, driver_version

    out = {"cpu": device_name(torch.device("cpu")), "cpus": os.cpu_count()}
    if device_type == "cuda" and torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1)}
            )
        out |= {"gpus": gpus, "driver": driver_version()}
    return out


def slurm(env: dict | None = None) -> dict | None:
    """The SLURM job this process runs in (id, partition, nodes, array task, restarts), or None."""
    env = os.environ if env is None else env
    found = {k: env[v] for k, v in SLURM_VARS.items() if env.get(v)}
    return found or None
