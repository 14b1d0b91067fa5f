"""From a request (launcher flags + the train config) to a ``Plan``: tasks, GPUs and CPUs per node, or a
``LaunchError`` saying why it cannot run on the target. Each rule is a small function with its own tests;
``plan`` only strings them together. The backend's process layout comes from its registry entry.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from cxrdist.config import TrainConfig
from cxrdist.cpus import cpu_count
from cxrdist.errors import UserError
from cxrdist.launch import cluster as probe
from cxrdist.launch.args import LaunchError, with_defaults
from cxrdist.launch.cluster import Partition


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


def check_request(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """The numbers themselves: positive counts, a time limit longer than the preemption warning."""
    for flag, value, least in (("--nodes", args.nodes, 1), ("--gpus", args.gpus, 0), ("--time", args.time, 1)):
        if value < least:
            raise LaunchError(f"{flag} must be >= {least}, not {value}")
    if args.tasks_per_node is not None and args.tasks_per_node < 1:
        raise LaunchError(f"--tasks-per-node must be >= 1, not {args.tasks_per_node}")
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


def pick_partition(parts: dict[str, Partition], name: str | None) -> Partition:
    """``--partition`` by name, else the cluster's default (sinfo's ``*``)."""
    if not parts:
        raise LaunchError("sinfo lists no partitions")
    if name:
        if name not in parts:
            raise LaunchError(f"unknown partition {name!r}; this cluster has: {', '.join(sorted(parts))}")
        return parts[name]
    defaults = [p for p in parts.values() if p.default]
    if not defaults:
        raise LaunchError(f"this cluster has no default partition: pass --partition ({', '.join(sorted(parts))})")
    return defaults[0]


def check_partition(p: Partition, nodes: int, gpus: int, time_min: int) -> None:
    """The request fits the partition: its GPUs (gres), node count and time limit."""
    if gpus > 0 and p.gpus == 0:
        raise LaunchError(
            f"--gpus {gpus}: partition {p.name!r} has no GPUs (sinfo Gres); "
            f"use --gpus 0 --tasks-per-node K for CPU ranks, or a GPU partition"
        )
    if gpus > p.gpus > 0:
        raise LaunchError(f"--gpus {gpus}: the nodes of partition {p.name!r} have {p.gpus} GPUs")
    if nodes > p.nodes:
        raise LaunchError(f"--nodes {nodes}: partition {p.name!r} has {p.nodes} node(s)")
    if p.max_time_min is not None and time_min > p.max_time_min:
        raise LaunchError(f"--time {time_min} min exceeds the {p.max_time_min} min limit of partition {p.name!r}")


def check_local(nodes: int, gpus: int, have_gpus: int, cpu_ranks: int) -> list[str]:
    """The local executor: one node; GPUs asked for but none here -> CPU ranks, with a warning."""
    if nodes > 1:
        raise LaunchError(
            f"--nodes {nodes}: the local executor runs on this machine only (one node); "
            "multi-node runs need SLURM (--cluster slurm)"
        )
    if gpus > 0 and have_gpus == 0:
        return [
            f"warning: no SLURM controller and no GPU here: running {cpu_ranks} CPU rank(s) locally "
            f"instead of {gpus} GPU(s)"
        ]
    if gpus > have_gpus:
        raise LaunchError(f"--gpus {gpus}: this machine has {have_gpus} GPU(s)")
    return []


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


def check_node_cpus(tasks: int, cpus: int, p: Partition | None) -> None:
    if p and p.cpus and tasks * cpus > p.cpus:
        raise LaunchError(
            f"{tasks} task(s) x {cpus} CPUs per task exceed the {p.cpus} CPUs of a "
            f"node in partition {p.name!r} (lower --cpus-per-task)"
        )


def plan(args: argparse.Namespace, cfg: TrainConfig, cluster: str | None = None) -> Plan:
    """Resolve the request into tasks/GPUs/CPUs, raising LaunchError for what cannot run on the target."""
    from cxrdist.engine.backends import backend_class  # lazily: the submitit job must not load torch early

    cluster = cluster or probe.resolve_cluster(args)
    check_request(args, cfg)
    cls = backend_class(args.backend)
    problems = cls.validate(with_backend(cfg, args.backend))  # its own hardware-free rules (fsdp: no fp16)
    if problems:
        raise LaunchError("; ".join(problems))
    partition, notes = None, []
    if cluster == "slurm":
        partition = pick_partition(probe.slurm_partitions(), args.partition)
        check_partition(partition, args.nodes, args.gpus, args.time)
        target_gpus = partition.gpus
    else:
        target_gpus = probe.local_gpu_count()
        cpu_ranks = (args.tasks_per_node or args.gpus) if cls.layout.per_gpu else 1
        notes += check_local(args.nodes, args.gpus, target_gpus, cpu_ranks)
    cpu_only = args.gpus == 0 or target_gpus == 0
    tasks, gpn, note = layout_tasks(args.backend, cls.layout, args.nodes, args.gpus, args.tasks_per_node, cpu_only)
    notes += [note] if note else []
    try:
        cls.check_launch(cfg, args.nodes * tasks)
    except UserError as e:
        raise LaunchError(str(e)) from None
    node_cpus = partition.cpus if partition else cpu_count()
    cpus, threads = size_cpus(args.cpus_per_task, tasks, node_cpus, cluster, gpus_used=gpn, node_gpus=target_gpus)
    if cluster == "slurm":
        check_node_cpus(tasks, cpus, partition)
    return Plan(
        cluster=cluster,
        backend=args.backend,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpn,
        cpus_per_task=cpus,
        partition=partition.name if partition else None,
        target_gpus=target_gpus,
        threads=threads,
        notes=notes,
    )


def with_backend(cfg: TrainConfig, backend: str) -> TrainConfig:
    return replace(cfg, dist=replace(cfg.dist, backend=backend))


def preflight(launch_args: argparse.Namespace, cfg: TrainConfig) -> str | None:
    """Why this backend cannot run on the target (one line), or None when it can."""
    args = with_defaults(launch_args)
    try:
        plan(args, with_backend(cfg, args.backend))
    except UserError as e:
        return str(e)
    return None
