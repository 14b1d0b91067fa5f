"""Submit training to SLURM (or to this machine) through submitit, one task per GPU.

``submit(launch_args, cfg)`` checks the request against the target (partition, GPUs, time, backend
shape), then submits ``TrainJob(cfg)``: a thin submitit ``Checkpointable`` whose ``__call__`` turns
``submitit.JobEnvironment()`` into RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR /
MASTER_PORT and calls ``cxrdist.engine.trainer.train(cfg)`` for its one rank. Preemption: the trainer
catches SIGUSR2 on every rank, stops all ranks at the same step, checkpoints, and hands the signal to
submitit's handler on rank 0, which calls ``TrainJob.checkpoint()`` (the same config with ``--resume``) and
requeues the job. No training logic lives here.

``--cluster auto`` picks SLURM only when a controller answers (``scontrol ping``), not merely because
``srun`` is installed (submitit's own rule); otherwise submitit's LocalExecutor runs the tasks here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import submitit

from cxrdist.config import TrainConfig
from cxrdist.cpus import cpu_count
from cxrdist.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO_SHARDS = REPO / "shards" / "demo"
DEMO_RAW = REPO / "demo" / "chexpert"
DEMO_N, DEMO_RAW_SIZE, DEMO_PACK_SIZE = 2400, 128, 64
DEFAULT_LOG_DIR = "runs/_submitit/%j"
CLUSTERS = ("auto", "slurm", "local")
# SLURM states after which the job will not run again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class LaunchError(UserError):
    """A request that cannot run on the target; reported before anything is submitted."""


# --------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/submit.py",
        add_help=add_help,
        allow_abbrev=False,
        description="Submit `cxrdist train` to SLURM (or run it here) through submitit: one task per GPU.",
        epilog="Everything after `--` is a `cxrdist train` option (e.g. -- --shards shards/x --epochs 3). "
        "Without --shards the embedded demo data is used (synthesised and packed on first use).",
    )
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    g.add_argument("--gpus", type=int, default=1, help="GPUs per node; one task per GPU (0: CPU ranks)")
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="tasks per node (default: --gpus; with --gpus 0 the number of CPU ranks per node)",
    )
    g.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPUs per task (default: a node's CPUs / tasks per node)"
    )
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB")
    g.add_argument("--time", type=int, default=60, help="time limit in minutes (default: 60)")
    g = p.add_argument_group("scheduler")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--exclude", default=None, help="nodes to exclude")
    g.add_argument("--name", default=None, help="job name and run-folder prefix (default: cxrdist-<backend>)")
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which SLURM sends USR2 (checkpoint + requeue)",
    )
    g = p.add_argument_group("launcher")
    from cxrdist.engine.backends import names  # the submitting process only: the job never builds a parser

    g.add_argument(
        "--backend", choices=names(), default="ddp", metavar="NAME", help=f"one of {', '.join(names())} (default: ddp)"
    )
    g.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default="auto",
        help="slurm, local (submitit's LocalExecutor), or auto: SLURM when a controller answers",
    )
    g.add_argument("--wait", action="store_true", help="block, stream the status, exit with the job's outcome")
    g.add_argument(
        "--log-dir",
        default=DEFAULT_LOG_DIR,
        help="submitit logs, one folder per job: %%j is the job id (default: runs/_submitit/%%j)",
    )
    return p


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------
class TrainJob(submitit.helpers.Checkpointable):
    """One rank of a training run inside a submitit task (SLURM or local)."""

    def __init__(self, cfg: TrainConfig, threads: int | None = None):
        self.cfg = cfg
        self.threads = threads  # torch threads per rank (None: SLURM's cpus-per-task)

    def __call__(self) -> dict:
        from cxrdist import dist  # torch-free: the wait policy below is still chosen before torch loads

        env = submitit.JobEnvironment()
        num_nodes = max(1, env.num_nodes)
        local_world = max(1, env.num_tasks // num_nodes)
        master = "127.0.0.1" if env.cluster == "local" else env.hostnames[0]
        dist.export_env(
            dist.DistEnv(
                rank=env.global_rank,
                world_size=env.num_tasks,
                local_rank=env.local_rank,
                local_world_size=local_world,
                node_rank=env.node,
                num_nodes=num_nodes,
                master_addr=master,
                master_port=dist.port_for_job(env.job_id),
            )
        )
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
        if threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["CXRDIST_THREADS"] = str(threads)
        from cxrdist.cpus import apply_wait_policy

        apply_wait_policy()  # now that this task's layout is known, before torch loads OpenMP

        from cxrdist.engine.trainer import train

        summary = train(self.cfg)
        status = summary.get("status")
        if status == "completed" or (status == "preempted" and env.global_rank != 0):
            return summary  # other ranks of a preempted run: rank 0 requeues the job
        raise RuntimeError(
            f"rank {env.global_rank}: training ended with status {status!r}"
            + (f": {summary['error']}" if summary.get("error") else "")
        )

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 when preempted / timed out: the same run, resumed from its checkpoint."""
        cfg = replace(self.cfg, run=replace(self.cfg.run, resume=True))
        return submitit.helpers.DelayedSubmission(type(self)(cfg, self.threads))


# --------------------------------------------------------------------------------------------------
# the target
# --------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 5.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


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
    r = _run(["scontrol", "ping"], timeout)
    answers = bool(r and r.returncode == 0 and "UP" in r.stdout)
    _PING_CACHE[key] = (time.monotonic(), answers)
    return answers


def resolve_cluster(args: argparse.Namespace) -> str:
    cluster = getattr(args, "cluster", "auto") or "auto"
    if cluster == "auto":
        return "slurm" if controller_answers() else "local"
    if cluster == "slurm" and not controller_answers():
        raise LaunchError(
            "--cluster slurm: no SLURM controller answers `scontrol ping` "
            "(check SLURM_CONF; for this machine use --cluster local)"
        )
    return cluster


@dataclass
class Partition:
    name: str
    nodes: int
    cpus: int  # per node (the smallest)
    gpus: int  # per node (the smallest; 0: none)
    max_time_min: int | None  # None: no limit
    default: bool = False


def _gres_gpus(gres: str) -> int:
    """`gpu:4`, `gpu:a100:8(S:0-1)`, `(null)` -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _minutes(limit: str) -> int | None:
    """sinfo time limits: infinite, 30, 1:00:00, 2-00:00:00 -> minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    h, m, s = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def slurm_partitions() -> dict[str, Partition]:
    r = _run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%l"], 10)
    if r is None or r.returncode:
        raise LaunchError(f"sinfo failed: {(r.stderr.strip() if r else 'timed out')}")
    parts: dict[str, Partition] = {}
    for line in r.stdout.splitlines():
        name, nodes, cpus, gres, limit = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        cpus_n = int("".join(c for c in cpus.split("/")[0] if c.isdigit()) or 0)
        p = Partition(name, int(nodes), cpus_n, _gres_gpus(gres), _minutes(limit), default)
        if name in parts:  # one line per node configuration: sum nodes, keep the smallest
            q = parts[name]
            p = Partition(
                name,
                q.nodes + p.nodes,
                min(q.cpus, p.cpus),
                min(q.gpus, p.gpus),
                q.max_time_min,
                q.default or p.default,
            )
        parts[name] = p
    return parts


def local_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not shutil.which("nvidia-smi"):
        return 0
    r = _run(["nvidia-smi", "-L"], 10)
    n = sum(1 for ln in (r.stdout.splitlines() if r and r.returncode == 0 else []) if ln.startswith("GPU "))
    if visible:
        n = min(n, len([x for x in visible.split(",") if x.strip()]))
    return n


@dataclass
class Plan:
    """What is asked of the scheduler for one run."""

    cluster: str
    backend: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    partition: str | None = None
    target_gpus: int = 0  # GPUs per node the target has (partition gres / this machine)
    threads: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def plan(args: argparse.Namespace, cfg: TrainConfig, cluster: str | None = None) -> Plan:
    """Resolve the request into tasks/GPUs/CPUs, raising LaunchError for what cannot run on the target."""
    from cxrdist.engine.backends import backend_class  # lazily: the submitit job must not load torch early

    cluster = cluster or resolve_cluster(args)
    backend = args.backend
    nodes, gpus = args.nodes, args.gpus
    if nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, not {nodes}")
    if gpus < 0:
        raise LaunchError(f"--gpus must be >= 0, not {gpus}")
    if args.tasks_per_node is not None and args.tasks_per_node < 1:
        raise LaunchError(f"--tasks-per-node must be >= 1, not {args.tasks_per_node}")
    if args.time < 1:
        raise LaunchError(f"--time must be >= 1 minute, not {args.time}")
    if args.signal_delay < 0:
        raise LaunchError("--signal-delay must be >= 0")
    if args.time * 60 <= args.signal_delay:
        raise LaunchError(
            f"--time {args.time} min ({args.time * 60} s) is not longer than --signal-delay "
            f"{args.signal_delay} s: the job would be told to checkpoint before it starts"
        )
    if cfg.dist.nproc != 1:
        raise LaunchError(
            "--nproc is `cxrdist train`'s own local launcher; under launchers/submit.py use "
            "--gpus (one task per GPU) or --gpus 0 --tasks-per-node K"
        )

    partition, notes = None, []
    if cluster == "slurm":
        parts = slurm_partitions()
        if not parts:
            raise LaunchError("sinfo lists no partitions")
        if args.partition:
            if args.partition not in parts:
                raise LaunchError(f"unknown partition {args.partition!r}; this cluster has: {', '.join(sorted(parts))}")
            partition = parts[args.partition]
        else:
            defaults = [p for p in parts.values() if p.default]
            partition = defaults[0] if defaults else None
            if partition is None:
                raise LaunchError(
                    f"this cluster has no default partition: pass --partition ({', '.join(sorted(parts))})"
                )
        target_gpus = partition.gpus
        if gpus > 0 and target_gpus == 0:
            raise LaunchError(
                f"--gpus {gpus}: partition {partition.name!r} has no GPUs (sinfo Gres); "
                f"use --gpus 0 --tasks-per-node K for CPU ranks, or a GPU partition"
            )
        if gpus > target_gpus > 0:
            raise LaunchError(f"--gpus {gpus}: the nodes of partition {partition.name!r} have {target_gpus} GPUs")
        if nodes > partition.nodes:
            raise LaunchError(f"--nodes {nodes}: partition {partition.name!r} has {partition.nodes} node(s)")
        if partition.max_time_min is not None and args.time > partition.max_time_min:
            raise LaunchError(
                f"--time {args.time} min exceeds partition {partition.name!r}'s limit of {partition.max_time_min} min"
            )
    else:
        if nodes > 1:
            raise LaunchError(
                f"--nodes {nodes}: the local executor runs on this machine only (one node); "
                "multi-node runs need SLURM (--cluster slurm)"
            )
        target_gpus = local_gpu_count()
        if gpus > 0 and target_gpus == 0:
            k = (args.tasks_per_node or gpus) if backend_class(backend).layout.per_gpu else 1
            notes.append(
                f"warning: no SLURM controller and no GPU here: running {k} CPU rank(s) locally "
                f"instead of {gpus} GPU(s)"
            )
        elif gpus > target_gpus:
            raise LaunchError(f"--gpus {gpus}: this machine has {target_gpus} GPU(s)")

    cls = backend_class(backend)
    tasks, gpn, note = layout_tasks(
        backend, cls.layout, nodes, gpus, args.tasks_per_node, cpu_only=gpus == 0 or target_gpus == 0
    )
    notes += [note] if note else []
    try:
        cls.check_launch(cfg, nodes * tasks)
    except UserError as e:
        raise LaunchError(str(e)) from None

    cpus, threads = size_cpus(
        args.cpus_per_task,
        tasks,
        partition.cpus if partition else cpu_count(),
        cluster,
        gpus_used=gpn,
        node_gpus=target_gpus,
    )
    if cluster == "slurm" and partition and partition.cpus and tasks * cpus > partition.cpus:
        raise LaunchError(
            f"{tasks} task(s) x {cpus} CPUs per task exceed the {partition.cpus} CPUs of a "
            f"node in partition {partition.name!r} (lower --cpus-per-task)"
        )
    return Plan(
        cluster=cluster,
        backend=backend,
        nodes=nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpn,
        cpus_per_task=cpus,
        partition=partition.name if partition else None,
        target_gpus=target_gpus,
        threads=threads,
        notes=notes,
    )


def layout_tasks(
    backend: str, layout, nodes: int, gpus: int, tasks_per_node: int | None, cpu_only: bool
) -> tuple[int, int, str | None]:
    """(tasks per node, GPUs per node, a note) for a backend's ``Layout``; LaunchError where it cannot run."""
    if nodes != 1 and not layout.multi_node:
        raise LaunchError(
            f"{backend} is one process on one {'node' if layout.all_gpus else 'device'}: use "
            "--nodes 1 (or a backend with one process per GPU for several nodes)"
        )
    if layout.per_gpu:
        if cpu_only:
            return tasks_per_node or max(1, gpus), 0, None
        if tasks_per_node not in (None, gpus):
            raise LaunchError(
                f"{backend} runs one task per GPU: --tasks-per-node {tasks_per_node} does not match --gpus {gpus}"
            )
        return gpus, gpus, None
    if tasks_per_node not in (None, 1):
        raise LaunchError(f"{backend} runs one task: drop --tasks-per-node")
    if layout.all_gpus:
        if cpu_only or gpus < layout.min_gpus:
            raise LaunchError(
                f"{backend} needs >= {layout.min_gpus} GPUs per node; "
                + ("the target has 0" if cpu_only else f"--gpus {gpus} asks for {gpus}")
            )
        return 1, gpus, None
    note = f"note: --backend {backend} uses 1 of the {gpus} GPUs asked for" if gpus > 1 and not cpu_only else None
    return 1, (0 if cpu_only else 1), note


def size_cpus(
    asked: int | None, tasks: int, node_cpus: int, cluster: str, gpus_used: int = 0, node_gpus: int = 0
) -> tuple[int, int | None]:
    """(CPUs per task, torch threads per local rank or None for SLURM's own) for ``tasks`` per node.

    Unless asked, a task gets its share of the node's CPUs (sinfo's, or this machine's for the local
    executor), in proportion to the GPUs the job takes on it: a 64-core 8-GPU node gives each of 8 ranks 8
    CPUs, and a 1-GPU job 8 too, not the whole node; a 2-CPU node without GPUs gives its one rank both.
    Loader workers (``--workers auto``) and threads are sized from that.
    """
    share = node_cpus * gpus_used // node_gpus if gpus_used and node_gpus else node_cpus
    cpus = asked or max(1, share // max(1, tasks))
    if cluster == "slurm":
        return cpus, None
    return cpus, max(1, min(cpus, cpu_count() // max(1, tasks)))


def preflight(launch_args: argparse.Namespace, cfg: TrainConfig) -> str | None:
    """Why this backend cannot run on the target (one line), or None when it can."""
    args = argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **vars(launch_args)})
    try:
        plan(args, _with_backend(cfg, args.backend))
    except UserError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------------------------------
# demo data
# --------------------------------------------------------------------------------------------------
def ensure_demo_shards(out: Path = DEMO_SHARDS, log: TextIO | None = None) -> Path:
    """The embedded demo data: a synthetic CheXpert-layout set, packed once into shards/demo/."""
    log = log or sys.stderr
    if (out / "manifest.json").is_file():
        return out
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two launchers at once: one packs, the other waits
        if (out / "manifest.json").is_file():
            return out
        from cxrdist.shards.pack import pack
        from cxrdist.synth import synthesize

        t0 = time.monotonic()
        print(
            f"demo data: synthesising {DEMO_N} CheXpert-layout images and packing them into {out} (first use only)",
            file=log,
        )
        root = DEMO_RAW / "CheXpert-v1.0-small"
        if not (root / "train.csv").is_file():
            root = Path(synthesize(layout="chexpert", out=DEMO_RAW, n=DEMO_N, size=DEMO_RAW_SIZE, seed=0))
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        manifest = pack(
            source="chexpert",
            root=root,
            out=tmp,
            size=DEMO_PACK_SIZE,
            encoding="jpg",
            views="frontal",
            policy="u-zeros",
            split="patient",
            workers=2,
            samples_per_shard=250,
            dry_run=False,
            strict=False,
            seed=0,
            quiet=True,
        )
        if manifest is None:
            raise LaunchError(f"packing the demo data into {tmp} failed")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        counts = {k: v["samples"] for k, v in manifest["splits"].items()}
        print(f"demo data ready in {time.monotonic() - t0:.0f} s: {counts} at {DEMO_PACK_SIZE} px", file=log)
    return out


# --------------------------------------------------------------------------------------------------
# submit / wait
# --------------------------------------------------------------------------------------------------
@dataclass
class Submission:
    job: Any  # submitit Job
    job_id: str
    run_dir: Path
    log_dir: Path  # submitit folder with %j filled in
    backend: str
    executor: str  # "slurm" | "local"
    plan: Plan | None = None
    log_pattern: str = ""  # the submitit folder as given, with %j
    _error_seen: float | None = field(default=None, repr=False)  # local: when a rank's error first showed

    def task_paths(self):
        from submitit.core.utils import JobPaths

        n = self.plan.world_size if self.plan else 1
        return [JobPaths(self.log_dir, job_id=self.job_id, task_id=t) for t in range(n)]


def _with_backend(cfg: TrainConfig, backend: str) -> TrainConfig:
    return replace(cfg, dist=replace(cfg.dist, backend=backend))


def prepare_config(args: argparse.Namespace, cfg: TrainConfig, log: TextIO | None = None) -> TrainConfig:
    """The train config the job will run: backend, absolute paths, a run folder, the demo data if needed."""
    log = log or sys.stderr
    cfg = _with_backend(cfg, args.backend)
    name = args.name or f"cxrdist-{args.backend}"
    out = cfg.run.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    data = cfg.data
    if not data.shards:
        data = replace(data, shards=str(DEMO_SHARDS))
    data = replace(
        data,
        shards=str(Path(data.shards).absolute()),
        **({"source_root": str(Path(data.source_root).absolute())} if data.source_root else {}),
    )
    run = replace(cfg.run, out=str(Path(out).absolute()))
    model = cfg.model
    if model.pretrained:
        model = replace(model, pretrained=str(Path(model.pretrained).absolute()))
    cfg = replace(cfg, data=data, run=run, model=model)
    from cxrdist.engine.backends import validate_config

    cfg.validate()
    validate_config(cfg)
    ckpts = Path(cfg.run.out) / "checkpoints"
    if not cfg.run.resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise LaunchError(
            f"{cfg.run.out} already holds checkpoints: pass --resume (after `--`) to continue "
            "it, or choose another --out"
        )
    return cfg


def make_executor(args: argparse.Namespace, p: Plan, log_dir: str):
    name = args.name or f"cxrdist-{args.backend}"
    if p.cluster == "slurm":
        ex = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=3)
        params: dict[str, Any] = dict(
            job_name=name,
            time=args.time,
            nodes=p.nodes,
            ntasks_per_node=p.tasks_per_node,
            cpus_per_task=p.cpus_per_task,
            signal_delay_s=args.signal_delay,
            # one failing rank ends the job instead of hanging it; SLURM 22.05-23.02 binds a task to one core
            # unless srun itself is told --cpus-per-task
            srun_args=["--kill-on-bad-exit=1", f"--cpus-per-task={p.cpus_per_task}"],
            additional_parameters={"requeue": True},
        )
        if p.gpus_per_node:
            params["gpus_per_node"] = p.gpus_per_node
        for key, value in (
            ("partition", args.partition),
            ("account", args.account),
            ("qos", args.qos),
            ("constraint", args.constraint),
            ("exclude", args.exclude),
        ):
            if value:
                params[key] = value
        if args.mem_gb:
            params["mem"] = f"{int(args.mem_gb * 1024)}MB"
        ex.update_parameters(**params)
    else:
        ex = submitit.LocalExecutor(folder=log_dir, max_num_timeout=3)
        ex.update_parameters(
            timeout_min=args.time,
            tasks_per_node=p.tasks_per_node,
            nodes=1,
            gpus_per_node=p.gpus_per_node,
            signal_delay_s=args.signal_delay,
            **visible_gpu_parameters(os.environ.get("CUDA_VISIBLE_DEVICES"), p.gpus_per_node),
        )
    return ex


def visible_gpu_parameters(visible: str | None, gpus: int) -> dict:
    """LocalExecutor parameters that keep the user's CUDA_VISIBLE_DEVICES (submitit would set 0..N-1):
    indices through its ``visible_gpus``, UUIDs / MIG names through a setup line."""
    ids = [x.strip() for x in (visible or "").split(",") if x.strip()]
    if not gpus or not ids:
        return {}
    if all(x.isdigit() for x in ids):
        return {"visible_gpus": tuple(int(x) for x in ids)}
    return {"setup": [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(ids[:gpus]))}"]}


def submit(launch_args: argparse.Namespace, cfg: TrainConfig, log: TextIO | None = None) -> Submission:
    """Check, then submit one training run. Raises LaunchError (a UserError) for requests that cannot run."""
    log = log or sys.stderr
    args = argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **vars(launch_args)})
    cluster = resolve_cluster(args)
    cfg = _with_backend(cfg, args.backend)
    p = plan(args, cfg, cluster)
    for note in p.notes:
        print(note, file=log)
    cfg = prepare_config(args, cfg, log)
    if cfg.run.device == "auto":  # CPU ranks even where the nodes have GPUs; GPUs asked for: CUDA or an error
        cfg = replace(cfg, run=replace(cfg.run, device="cuda" if p.gpus_per_node else "cpu"))
    if Path(cfg.data.shards) == DEMO_SHARDS.absolute():
        ensure_demo_shards(log=log)
    if not (Path(cfg.data.shards) / "manifest.json").is_file():
        raise LaunchError(f"--shards {cfg.data.shards}: no manifest.json there (a folder written by `cxrdist shard`)")

    log_dir = str(Path(args.log_dir).absolute())
    if "%j" not in log_dir:
        log_dir = os.path.join(log_dir, "%j")
    ex = make_executor(args, p, log_dir)
    try:
        job = ex.submit(TrainJob(cfg, p.threads))
    except Exception as e:  # sbatch's own refusal (account, qos, constraint...): one line
        msg = str(e).strip().splitlines()
        raise LaunchError(f"submission failed: {msg[-1] if msg else e!r}") from None
    job_id = str(job.job_id)
    return Submission(
        job=job,
        job_id=job_id,
        run_dir=Path(cfg.run.out),
        log_dir=Path(log_dir.replace("%j", job_id)),
        backend=args.backend,
        executor=p.cluster,
        plan=p,
        log_pattern=log_dir,
    )


def job_state(sub: Submission) -> tuple[str, str]:
    """(state, nodes) now; SLURM's state names; the local executor's RUNNING / FINISHED / INTERRUPTED."""
    if sub.executor == "slurm":
        info = sub.job.get_info(mode="force") or {}
        return (info.get("State") or "UNKNOWN").split()[0], info.get("NodeList", "")
    return sub.job.state, "localhost"


def _last_step(run_dir: Path) -> dict | None:
    f = run_dir / "telemetry" / "rank0.jsonl"
    try:
        with open(f, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in ("step", "epoch", "resume", "preempted"):
            return rec
    return None


def _describe(rec: dict, epochs: int) -> str:
    ev, ep = rec.get("event"), rec.get("epoch", 0)
    if ev == "step":
        loss = rec.get("loss")
        return (
            f"epoch {ep + 1}/{epochs} step {rec.get('step', 0) + 1}"
            + (f" loss {loss:.4f}" if isinstance(loss, float) else "")
            + (f" {rec['images_per_s']:.0f} img/s/rank" if rec.get("images_per_s") else "")
        )
    if ev == "epoch":
        return f"epoch {ep + 1}/{epochs} done in {rec.get('epoch_time_s', 0):.1f} s"
    if ev == "resume":
        return f"resumed at epoch {ep + 1}, step {rec.get('step_in_epoch', 0)} (restart {rec.get('restarts')})"
    return f"preempted at epoch {ep + 1}, step {rec.get('step_in_epoch', 0)}: checkpointed"


def _task_outcomes(sub: Submission) -> list[tuple[int, str, Any]]:
    """(task, 'success'|'error'|'missing', result or traceback) from submitit's result pickles."""
    from submitit.core.utils import pickle_load

    out = []
    for t, paths in enumerate(sub.task_paths()):
        try:
            outcome, value = pickle_load(paths.result_pickle)
        except (OSError, EOFError, ValueError):
            outcome, value = "missing", None
        out.append((t, outcome, value))
    return out


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if "\r" not in ln]  # drop progress-bar redraws
    return "\n".join(lines[-n:])


def failure_report(sub: Submission, state: str) -> str:
    """The failing rank's error: its exception (submitit's result pickle), else the tail of its stderr."""
    outcomes = _task_outcomes(sub)
    errors = [(t, v) for t, o, v in outcomes if o == "error"]
    if errors:
        t, trace = errors[0]
        lines = [ln for ln in str(trace).strip().splitlines() if ln.strip()]
        return f"rank {t} raised: {lines[-1] if lines else '?'}\n" + "\n".join("    " + ln for ln in lines[-12:])
    paths = sub.task_paths()
    for marker in ("Traceback", "rror", ""):
        for t, p in enumerate(paths):
            tail = _tail(p.stderr)
            if tail and marker in tail:
                return f"rank {t} stderr ({p.stderr}):\n" + "\n".join("    " + ln for ln in tail.splitlines())
    return f"no error output; see {sub.log_dir}"


def wait(
    sub: Submission, stream: bool = True, out: TextIO | None = None, poll_s: float = 2.0, timeout_s: float | None = None
) -> int:
    """Block until the job ends; stream state changes and progress; 0 when every rank completed."""
    out = out or sys.stdout
    epochs = None
    try:
        import yaml

        epochs = (yaml.safe_load((sub.run_dir / "config.yaml").read_text()) or {}).get("optim", {}).get("epochs")
    except Exception:
        pass

    def say(msg: str) -> None:
        if stream:
            print(f"[{time.strftime('%H:%M:%S')}] job {sub.job_id}: {msg}", file=out, flush=True)

    last_state, last_progress, t0, ran = None, None, time.monotonic(), False
    state = "UNKNOWN"
    while True:
        state, nodes = job_state(sub)
        if state != last_state:
            requeued = ran and state in ("PENDING", "REQUEUED", "REQUEUE_HOLD")
            say(
                f"{state}"
                + (f" on {nodes}" if nodes and state == "RUNNING" else "")
                + (" (requeued: waiting to restart)" if requeued else "")
            )
            last_state = state
            ran = ran or state == "RUNNING"
        rec = _last_step(sub.run_dir)
        if rec is not None:
            if epochs is None:
                try:
                    epochs = TrainConfig.load(sub.run_dir / "config.yaml").optim.epochs
                except Exception:
                    epochs = 0
            text = _describe(rec, epochs or 0)
            if text != last_progress:
                say(text)
                last_progress = text
        if _finished(sub, state):
            break
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            say(f"still {state} after {timeout_s:.0f} s; not waiting longer")
            return 124
        time.sleep(poll_s)

    if sub.executor == "local" and "%" in sub.log_pattern:
        # submitit's local controller also makes the unformatted folder (".../%j"); it stays empty
        try:
            Path(sub.log_pattern).rmdir()
        except OSError:
            pass
    outcomes = _task_outcomes(sub)
    summary = _read_summary(sub.run_dir)
    errors = [t for t, o, _ in outcomes if o == "error"]
    if not errors and all(o == "success" for _, o, _ in outcomes) and state not in FINAL_STATES - {"COMPLETED"}:
        extra = ""
        if summary:
            epochs = summary.get("epochs") or []
            test = summary.get("test") or {}
            scores = ""
            if epochs and epochs[-1].get("val_auc_mean") is not None:
                scores += f", val AUC {100 * epochs[-1]['val_auc_mean']:.2f}"
            if test.get("auc_mean") is not None:
                scores += f", test AUC {100 * test['auc_mean']:.2f} / accuracy {100 * test['accuracy_mean']:.2f}"
            extra = f" ({summary.get('status')}, {len(epochs)} epoch(s), restarts {summary.get('restarts', 0)}{scores})"
        say(f"done{extra}; run folder {sub.run_dir}")
        return 0
    if stream:
        label = state if state in FINAL_STATES - {"COMPLETED"} else "FAILED"
        say(f"{label}; logs in {sub.log_dir}")
        print(failure_report(sub, state), file=out, flush=True)
    return 1


def _finished(sub: Submission, state: str, grace_s: float = 10.0) -> bool:
    if sub.executor == "local":
        if state != "RUNNING":
            return True
        # submitit's local controller waits for every task: ranks left in a collective after another rank
        # raised would sit there until the collective timeout. Give them a moment, then end the job.
        if any(o == "error" for _, o, _ in _task_outcomes(sub)):
            sub._error_seen = sub._error_seen or time.monotonic()
            if time.monotonic() - sub._error_seen > grace_s:
                sub.job.cancel()
                return True
        return False
    if state in FINAL_STATES:
        return True
    outcomes = _task_outcomes(sub)
    if any(o == "error" for _, o, _ in outcomes):
        return True  # a rank raised: report it now (the others are being killed: srun --kill-on-bad-exit)
    # every rank reported success but the accounting has no final state (yet, or ever: no sacct)
    return all(o == "success" for _, o, _ in outcomes) and state not in (
        "PENDING",
        "REQUEUED",
        "RUNNING",
        "COMPLETING",
        "REQUEUE_HOLD",
    )


def _read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def describe(sub: Submission) -> str:
    p = sub.plan
    shape = (
        (
            f"{p.nodes} node(s) x {p.tasks_per_node} task(s), {p.gpus_per_node} GPU(s)/node"
            + (f", partition {p.partition}" if p.partition else "")
        )
        if p
        else ""
    )
    return (
        f"submitted job {sub.job_id} ({sub.executor}, {sub.backend}{', ' + shape if shape else ''})\n"
        f"  run folder: {sub.run_dir}\n"
        f"  logs:       {sub.log_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    """`launchers/submit.py`: launcher flags, then `--` and the `cxrdist train` flags."""
    from cxrdist.config import parse_train_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        launcher_argv, train_argv = argv[:i], argv[i + 1 :]
    else:
        launcher_argv, train_argv = argv, []
    args = get_args_parser().parse_args(launcher_argv)
    try:
        if "--backend" in train_argv:
            raise LaunchError("--backend goes before `--` (it decides how the job is laid out)")
        cfg = parse_train_argv(train_argv)
        sub = submit(args, cfg)
    except UserError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    print(describe(sub), flush=True)
    if not args.wait:
        return 0
    try:
        return wait(sub, stream=True)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {sub.job_id} keeps running (scancel {sub.job_id} to stop it)", file=sys.stderr)
        return 130
