"""Rank, world size, local rank, host and device, read in one place.

Sources, first match wins:
  1. torchrun / ``cxrdist train --nproc`` / the submitit job: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
  2. ``srun`` (a SLURM job *step*): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``
  3. MPI (Open MPI, MPICH/PMI): ``OMPI_COMM_WORLD_*``, ``PMI_*``
  4. nothing: a single process.
``host`` is the SLURM node name when there is one (``SLURMD_NODENAME``), so telemetry names nodes the way
``squeue`` does; with several emulated nodes on one machine the hostname alone would not tell them apart.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    host: str = ""
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"           # torchrun | slurm | mpi | single

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def _int(env, *names, default=None):
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return default


def expand_hostlist(spec: str) -> list[str]:
    """SLURM hostlist -> names: ``node[1-3,7],gpu01`` -> node1 node2 node3 node7 gpu01 (zero padding kept)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def port_for_job(job_id: str | int | None, base: int = 20000, span: int = 20000) -> int:
    """A rendezvous port derived from the job id, so two jobs sharing a node do not collide."""
    digits = re.sub(r"\D", "", str(job_id or ""))
    return base + (int(digits) % span if digits else 9500)


def read_env(env: dict | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    host = env.get("SLURMD_NODENAME") or socket.gethostname()
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
        return DistEnv(
            rank=int(env["RANK"]), world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=0), local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", "NODE_RANK", default=int(env["RANK"]) // max(local_world, 1)),
            num_nodes=_int(env, "NUM_NODES", default=max(1, world // max(local_world, 1))),
            host=host, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500), source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", host))
        world = int(env["SLURM_STEP_NUM_TASKS"])
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", default=len(nodes))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=max(1, world // max(num_nodes, 1)),
            node_rank=_int(env, "SLURM_NODEID", default=0), num_nodes=num_nodes, host=host,
            master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=port_for_job(env.get("SLURM_JOB_ID"))),
            source="slurm",
        )
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if rank is not None:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
        return DistEnv(
            rank=rank, world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
            local_world_size=local_world, node_rank=rank // max(local_world, 1),
            num_nodes=max(1, world // max(local_world, 1)), host=host,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500), source="mpi",
        )
    return DistEnv(host=host)


def export_env(d: DistEnv) -> None:
    """Write the torchrun-style variables, which DeepSpeed and torch.distributed's env:// read."""
    os.environ.update({
        "RANK": str(d.rank), "WORLD_SIZE": str(d.world_size), "LOCAL_RANK": str(d.local_rank),
        "LOCAL_WORLD_SIZE": str(d.local_world_size), "GROUP_RANK": str(d.node_rank),
        "NUM_NODES": str(d.num_nodes), "MASTER_ADDR": d.master_addr, "MASTER_PORT": str(d.master_port),
    })


def cpu_count() -> int:
    """CPUs of this machine that this process may use (the affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def threads_per_rank(d: DistEnv) -> int:
    """Torch threads for this rank: ``CXRDIST_THREADS`` if set, else SLURM's per-task CPUs, else this
    machine's CPUs shared by the ranks on it (oversubscribed CPU ranks waste the machine)."""
    for name in ("CXRDIST_THREADS", "SLURM_CPUS_PER_TASK"):
        if os.environ.get(name):
            return max(1, int(os.environ[name]))
    return max(1, cpu_count() // max(1, d.local_world_size))


def select_device(d: DistEnv, requested: str = "auto") -> torch.device:
    """The visible GPU for this local rank (submitit/SLURM may leave one visible per task), or the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    index = d.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_process_group(d: DistEnv, device: torch.device, timeout_s: int = 300) -> None:
    """NCCL on GPUs, gloo on CPU, with a timeout so a dead rank ends the job instead of hanging it."""
    if not d.distributed or torch.distributed.is_initialized():
        return
    export_env(d)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend=backend, init_method=f"tcp://{d.master_addr}:{d.master_port}",
        rank=d.rank, world_size=d.world_size, timeout=_dt.timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
