"""CPU layout of this process: cores, ranks on this node, threads per rank, loader workers, OpenMP waiting.

Torch-free on purpose: ``OMP_WAIT_POLICY`` is read once, when torch loads libgomp, so the choice has to be
made before ``import torch`` (``cxrdist/__init__.py`` calls :func:`apply_wait_policy`; the submitit job calls
it again after it has set the rank variables, still before torch is imported).

Why the policy is chosen per run (densenetblur121d bf16 + channels_last, 64 px, batch 32, 2 threads, one
rank on a 2-core box): a bare loop ran 106 img/s ACTIVE, 100 with libgomp's default and 62 PASSIVE; the
trainer 65 ACTIVE vs 47 PASSIVE. Spinning pays when a rank's threads own their cores, and collapses a
step to seconds when ranks x threads oversubscribe them. On a GPU node the ranks' own threads are mostly
idle between kernel launches, and spinning would take the loader workers' cores.
"""

from __future__ import annotations

import glob
import os
import re
import sys

# loader workers per rank when --workers is auto: enough to feed one GPU at 224 px (gpu-check measures
# 2 vs 12), never more than the rank's CPUs leave for them
MAX_AUTO_WORKERS = 12


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask: SLURM's cgroup / cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _first_int(text: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


def ranks_on_node(env: dict | None = None) -> int:
    """Processes of this job on this node: torchrun/--nproc/the submitit job (LOCAL_WORLD_SIZE), submitit's
    local executor, or SLURM's tasks per node (``2(x3)`` -> 2)."""
    env = os.environ if env is None else env
    for name in (
        "LOCAL_WORLD_SIZE",
        "SUBMITIT_LOCAL_NTASKS",
        "SLURM_STEP_TASKS_PER_NODE",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
    ):
        n = _first_int(env.get(name))
        if n:
            return n
    return 1


def threads_per_rank(env: dict | None = None, ranks: int | None = None, cores: int | None = None) -> int:
    """Torch threads for one rank: ``CXRDIST_THREADS``, else SLURM's CPUs per task, else this machine's CPUs
    shared by the ranks on it (oversubscribed CPU ranks waste the machine)."""
    env = os.environ if env is None else env
    for name in ("CXRDIST_THREADS", "SLURM_CPUS_PER_TASK"):
        n = _first_int(env.get(name))
        if n:
            return max(1, n)
    ranks = ranks or ranks_on_node(env)
    return max(1, (cores or cpu_count()) // max(1, ranks))


def auto_workers(cpus_per_rank: int, gpu: bool) -> int:
    """Loader workers per rank for ``--workers auto``.

    GPU ranks: the rank's CPUs minus the one that drives the GPU (capped at MAX_AUTO_WORKERS). CPU ranks:
    one worker: the model's threads need the cores, and decoding 64-256 px JPEGs is cheap next to a CPU step.
    """
    if gpu:
        return max(1, min(MAX_AUTO_WORKERS, cpus_per_rank - 1))
    return 1


def gpu_node(env: dict | None = None) -> bool:
    """NVIDIA devices exist and are not hidden (no CUDA import: this runs before torch loads)."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES", None) is not None and env["CUDA_VISIBLE_DEVICES"].strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def wait_policy(ranks: int, threads: int, cores: int, gpu: bool) -> tuple[str, str]:
    """(OMP_WAIT_POLICY, why) for a rank layout."""
    if gpu:
        return "PASSIVE", "GPU ranks: idle OpenMP threads must not spin on the loader workers' cores"
    if ranks * threads > cores:
        return "PASSIVE", f"{ranks} rank(s) x {threads} thread(s) oversubscribe {cores} core(s)"
    return "ACTIVE", f"{ranks} rank(s) x {threads} thread(s) fit {cores} core(s)"


USER_SET = "set by the user"


def apply_wait_policy(env: dict | None = None) -> None:
    """Set OMP_WAIT_POLICY for this process unless the user set it; remember why in CXRDIST_OMP_WAIT.

    Called again (e.g. by the submitit job once the rank variables are known, or in a rank that inherited
    its launcher's choice) it re-decides, unless the user chose or torch has already loaded OpenMP.
    """
    env = os.environ if env is None else env
    record = env.get("CXRDIST_OMP_WAIT", "")
    if record.endswith(USER_SET) or ("OMP_WAIT_POLICY" in env and not record):
        env["CXRDIST_OMP_WAIT"] = f"{env['OMP_WAIT_POLICY']}: {USER_SET}"
        return
    if "torch" in sys.modules:  # libgomp has read the variable already: record what it got
        if not record:
            env["CXRDIST_OMP_WAIT"] = "default: torch was imported before cxrdist"
        return
    ranks, cores = ranks_on_node(env), cpu_count()
    policy, why = wait_policy(ranks, threads_per_rank(env, ranks, cores), cores, gpu_node(env))
    env["OMP_WAIT_POLICY"] = policy
    env["CXRDIST_OMP_WAIT"] = f"{policy}: {why}"


def wait_policy_record(env: dict | None = None) -> dict:
    """What telemetry writes: the policy this process runs with and why."""
    env = os.environ if env is None else env
    policy, _, why = env.get("CXRDIST_OMP_WAIT", "default: ").partition(": ")
    return {"omp_wait_policy": policy, "omp_wait_reason": why}
