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
from typing import TYPE_CHECKING

from cxrdist import cpus

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: reading the rank layout must stay cheap and must
# not load OpenMP before the submitit job has chosen its wait policy (cxrdist/cpus.py)


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
    source: str = "single"  # torchrun | slurm | mpi | single

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
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", "NODE_RANK", default=int(env["RANK"]) // max(local_world, 1)),
            num_nodes=_int(env, "NUM_NODES", default=max(1, world // max(local_world, 1))),
            host=host,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", host))
        world = int(env["SLURM_STEP_NUM_TASKS"])
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", default=len(nodes))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=max(1, world // max(num_nodes, 1)),
            node_rank=_int(env, "SLURM_NODEID", default=0),
            num_nodes=num_nodes,
            host=host,
            master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=port_for_job(env.get("SLURM_JOB_ID"))),
            source="slurm",
        )
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if rank is not None:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
        return DistEnv(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
            local_world_size=local_world,
            node_rank=rank // max(local_world, 1),
            num_nodes=max(1, world // max(local_world, 1)),
            host=host,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500),
            source="mpi",
        )
    return DistEnv(host=host)


def torchrun_env(d: DistEnv) -> dict[str, str]:
    """The torchrun-style variables of a rank: what every launcher of cxrdist ranks sets (``--nproc``, the
    submitit job, ``bench step``), and what DeepSpeed and torch.distributed's env:// read."""
    return {
        "RANK": str(d.rank),
        "WORLD_SIZE": str(d.world_size),
        "LOCAL_RANK": str(d.local_rank),
        "LOCAL_WORLD_SIZE": str(d.local_world_size),
        "GROUP_RANK": str(d.node_rank),
        "NUM_NODES": str(d.num_nodes),
        "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(d.master_port),
    }


def local_rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun_env for rank ``rank`` of ``world`` ranks on this machine (one node, rendezvous on loopback)."""
    return torchrun_env(DistEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, master_port=port))


def export_env(d: DistEnv) -> None:
    os.environ.update(torchrun_env(d))


def cpu_count() -> int:
    return cpus.cpu_count()


def threads_per_rank(d: DistEnv) -> int:
    """Torch threads for this rank (see cxrdist.cpus.threads_per_rank)."""
    return cpus.threads_per_rank(ranks=d.local_world_size)


def cuda_unavailable_reason() -> str:
    """Why torch sees no GPU, in terms a user can act on: the wheel's CUDA vs the driver, or no device."""
    import torch

    built = torch.version.cuda
    if not built:
        return f"this torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    driver = driver_version()
    if driver is None:
        return (
            f"no NVIDIA driver answers (nvidia-smi missing or failing); torch {torch.__version__} needs one "
            f"for CUDA {built}"
        )
    return (
        f"torch {torch.__version__} is built for CUDA {built}, and driver {driver} cannot run it (CUDA 13 "
        "wheels need driver >= 580, CUDA 12 >= 525): install a torch wheel for this driver's CUDA, or a newer driver"
    )


def driver_version() -> str | None:
    import subprocess

    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = r.stdout.strip().splitlines() if r.returncode == 0 else []
    return lines[0].strip() if lines else None


def gpu_index(
    local_rank: int, local_world: int, visible: int, gpus_on_node: int | None = None, same_view: bool = False
) -> int:
    """Which visible GPU this local rank takes: ``local_rank % visible``.

    Every local rank sees the same GPUs (``--nproc``; SLURM gres with all GPUs visible to each task, 4 tasks
    on 4 GPUs): rank r takes GPU r. Each task sees a subset of its own (``srun --gpus-per-task=1``, or
    ``--gpu-bind=closest``/``map_gpu``: 8 tasks on a 2-socket, 8-GPU node see 4 each): rank r takes GPU
    ``r % visible`` of its view, a different physical GPU per task. Counts alone cannot tell a shared GPU
    from per-task views, so what is refused here is only what is certain: ``same_view`` with fewer GPUs than
    ranks, or more ranks than SLURM gave the node GPUs. Real sharing is caught after ``set_device`` by
    comparing the devices' UUIDs across the ranks of a host (``check_distinct_gpus``).
    """
    from cxrdist.config import ConfigError

    if visible < 1:
        raise ConfigError("no GPU is visible to this rank (CUDA_VISIBLE_DEVICES?)")
    if same_view and local_world > visible:
        raise ConfigError(
            f"{local_world} ranks on this node but {visible} visible GPU(s): two ranks would share "
            "a GPU; start one rank per GPU (--nproc / --gpus / --ntasks-per-node)"
        )
    if gpus_on_node is not None and local_world > gpus_on_node:
        raise ConfigError(
            f"{local_world} ranks on this node but SLURM gave it {gpus_on_node} GPU(s): two ranks "
            "would share a GPU; ask for one task per GPU"
        )
    return local_rank % visible


def visible_gpus_text() -> str:
    """CUDA_VISIBLE_DEVICES as the messages name it (indices, GPU-/MIG- UUIDs, or unset)."""
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if v is None else f"CUDA_VISIBLE_DEVICES={v}"


def shared_gpus(devices: list[tuple[str, str]]) -> list[tuple[str, str, list[int]]]:
    """``devices[rank] = (host, gpu uuid)`` -> ``(host, uuid, ranks)`` for every GPU that two ranks use."""
    seen: dict[tuple[str, str], list[int]] = {}
    for rank, key in enumerate(devices):
        seen.setdefault(tuple(key), []).append(rank)
    return [(h, u, ranks) for (h, u), ranks in seen.items() if len(ranks) > 1]


def check_distinct_gpus(device: torch.device, group=None) -> None:
    """One all-gather of (host, GPU UUID) after ``set_device``: two ranks on one physical GPU are refused,
    naming them (NCCL would fail later with "Duplicate GPU detected", or the two would share its memory)."""
    import torch

    if device.type != "cuda" or not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return
    from cxrdist.config import ConfigError

    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine, group=group)
    shared = shared_gpus(everyone)
    if shared:
        host, uuid, ranks = shared[0]
        raise ConfigError(
            f"ranks {', '.join(map(str, ranks))} on {host} use the same GPU {uuid} ({visible_gpus_text()} on "
            "this rank): give each task its own GPU (srun --gpus-per-task=1, or --ntasks-per-node = GPUs)"
        )


# torch wheels and the GPU families they carry kernels for: what to install when this one has none
WHEEL_FOR_OLD_GPUS = (
    "a torch wheel that still carries them, e.g. pip install 'torch<2.10' --index-url "
    "https://download.pytorch.org/whl/cu126 (CUDA 12.6 builds: sm_50 to sm_90)"
)


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with ``arch_list`` (``torch.cuda.get_arch_list()``: ``sm_80``, ``sm_90a``,
    ``compute_90``) runs on a GPU of ``capability``: a cubin of the same major version and no higher minor
    (sm_80 runs on 8.6), or PTX (``compute_XY``) of a lower or equal version, which the driver compiles."""
    major, minor = capability
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+?)(\d)[a-z]?", arch)
        if not m:
            continue
        kind, a_major, a_minor = m.group(1), int(m.group(2)), int(m.group(3))
        if kind == "sm" and a_major == major and a_minor <= minor and not arch[-1].isalpha():
            return True
        if kind == "sm" and arch[-1].isalpha() and (a_major, a_minor) == (major, minor):
            return True  # sm_90a: arch-specific, that exact GPU only
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_arch(index: int = 0) -> None:
    """Refuse a GPU this torch has no kernels for (a V100 under a sm_75+ wheel passes is_available() and then
    dies at the first kernel with "no kernel image is available", after every rank has started)."""
    import torch

    from cxrdist.config import ConfigError

    cap, archs = torch.cuda.get_device_capability(index), torch.cuda.get_arch_list()
    if archs and not arch_supported(cap, archs):
        raise ConfigError(
            f"GPU {index} ({torch.cuda.get_device_name(index)}) is sm_{cap[0]}{cap[1]}, and this torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) has kernels for {', '.join(archs)} only: install "
            f"{WHEEL_FOR_OLD_GPUS}"
        )


def select_device(d: DistEnv, requested: str = "auto", same_view: bool = False) -> torch.device:
    """The visible GPU for this local rank (``gpu_index``), or the CPU.

    ``auto`` falls back to the CPU only where no GPU exists at all; where NVIDIA devices are present but
    CUDA does not start (a wheel too new for the driver), it raises instead of training on the CPU, and a
    GPU the wheel has no kernels for is refused here, before any rank starts (``check_arch``).
    """
    import torch

    from cxrdist.config import ConfigError

    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "auto" and not cpus.gpu_node():
            return torch.device("cpu")
        what = "--device cuda was asked for" if requested == "cuda" else "this node has NVIDIA devices"
        raise ConfigError(
            f"{what} but CUDA is unavailable: {cuda_unavailable_reason()} (--device cpu to train on the CPU on purpose)"
        )
    gpus_on_node = cpus._first_int(os.environ.get("SLURM_GPUS_ON_NODE"))
    index = gpu_index(d.local_rank, d.local_world_size, torch.cuda.device_count(), gpus_on_node, same_view)
    check_arch(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """``NVIDIA H200`` / the CPU model, for logs and summaries."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def tf32_convolutions(device: torch.device) -> bool:
    """fp32 convolutions really run in TF32: cuDNN allows it (torch's default) on an Ampere or newer GPU."""
    import torch

    return (
        device.type == "cuda" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(device)[0] >= 8
    )


def nccl_ifname_to_gloo(spec: str, interfaces: list[str]) -> str | None:
    """The interface gloo should bind to for a job that names only ``NCCL_SOCKET_IFNAME``: NCCL's syntax
    resolved against this host's ``interfaces`` (names with an IPv4 address, in the host's order).

    gloo takes exact interface names; NCCL takes a comma list of *prefixes* (``eth`` selects eth0, eth1),
    exact names after ``=``, and exclusions after ``^`` (``^docker0,lo``: anything but those; ``^=`` exact).
    Copying the text over makes gloo look for an interface literally named ``^docker0,lo`` or ``eth``.
    Loopback is picked only when the spec names it, as NCCL does. None: nothing matches (gloo then picks
    the interface of the host name itself, and NCCL would fail on the same spec anyway).
    """
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    names = [n.strip() for n in (spec[1:] if exact else spec).split(",") if n.strip()]

    def named(iface: str) -> bool:
        return any(iface == n if exact else iface.startswith(n) for n in names)

    if exclude:
        chosen = [i for i in interfaces if not named(i) and not i.startswith("lo")]
    else:
        chosen = [i for i in interfaces if named(i)]
    return chosen[0] if chosen else None


def ipv4_interfaces() -> list[str]:
    """This host's interface names that carry an IPv4 address, in the kernel's order."""
    import psutil

    addrs = psutil.net_if_addrs()
    order = [name for _, name in socket.if_nameindex()]
    return [n for n in order if any(a.family == socket.AF_INET for a in addrs.get(n, ()))]


def gloo_interface() -> None:
    """Multi-node gloo (the control group, CPU ranks) needs a routable interface like NCCL does: a job that
    names only NCCL_SOCKET_IFNAME gets the interface NCCL's rule selects (``nccl_ifname_to_gloo``);
    GLOO_SOCKET_IFNAME, when set, is kept."""
    spec = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if not spec or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    interfaces = ipv4_interfaces()
    chosen = nccl_ifname_to_gloo(spec, interfaces)
    if chosen is None:
        import logging

        logging.getLogger(__name__).warning(
            "NCCL_SOCKET_IFNAME=%s selects none of this host's interfaces (%s): gloo picks its own",
            spec,
            ", ".join(interfaces) or "none with IPv4",
        )
        return
    os.environ["GLOO_SOCKET_IFNAME"] = chosen


def init_process_group(d: DistEnv, device: torch.device, timeout_s: int = 300, always: bool = False) -> None:
    """NCCL on GPUs, gloo on CPU, with a timeout so a dead rank ends the job instead of hanging it.

    ``always``: a group even for one rank (DeepSpeed needs one): an in-process store, no port.
    """
    import torch

    global _PEERS
    if torch.distributed.is_initialized() or not (d.distributed or always):
        return
    _PEERS = _PEERS or d.distributed
    export_env(d)
    gloo_interface()
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = (
        {"init_method": f"tcp://{d.master_addr}:{d.master_port}"}
        if d.distributed
        else {"store": torch.distributed.HashStore()}
    )
    torch.distributed.init_process_group(
        backend=backend,
        rank=d.rank,
        world_size=d.world_size,
        timeout=_dt.timedelta(seconds=timeout_s),
        # device_id (eager NCCL init) only with peers: DeepSpeed's own one-rank groups fail on a bound device
        # (deepspeed/comm/torch.py, #8248)
        **where,
        **({"device_id": device} if device.type == "cuda" and d.distributed else {}),
    )


def control_group(timeout_s: int, separate: bool):
    """The group for control messages (stop flags, host names, epoch records). ``separate`` (NCCL data path):
    a gloo group of its own, so they never wait on the GPU, with the run's --timeout instead of gloo's
    30-minute default; otherwise the world group (gloo already, with the same timeout)."""
    import torch

    if not separate:
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))


def barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


_PEERS = False  # this process made a group with other processes (see leave)


def destroy(sync: bool = False) -> None:
    """Tear the process groups down. ``sync``: meet the other ranks in a barrier first, for callers that know
    every rank gets here (a finished run, not a failed one, where a barrier would wait for a dead peer until
    the timeout). Without it, 2-rank gloo exits on torch 2.14 abort now and then ("terminate called without
    an active exception"; a plain DDP script: 2 of 74 exits without the barrier, 0 of 90 with it)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sync and torch.distributed.get_world_size() > 1:
            try:
                torch.distributed.barrier()
            except RuntimeError:  # a peer already gone: nothing left to settle with it
                pass
        torch.distributed.destroy_process_group()


def leave(code: int) -> int:
    """End a process that was a rank with peers: flush, then ``os._exit(code)``, skipping the interpreter's
    finalization. There, gloo's worker threads can abort the process after a clean finish (SIGABRT,
    "terminate called without an active exception", now and then on torch 2.14): groups that FSDP's mesh or
    DeepSpeed still reference outlive ``destroy_process_group`` and are freed during teardown with tensors
    of their last works (pytorch/pytorch#179291). Any other process gets ``code`` back."""
    if not _PEERS:
        return code
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)
