"""The launcher's own flags (resources, scheduler, launcher) and its one error type."""

from __future__ import annotations

import argparse

from cxrdist.errors import UserError

DEFAULT_LOG_DIR = "runs/_submitit/%j"
CLUSTERS = ("auto", "slurm", "local")


class LaunchError(UserError):
    """A request that cannot run on the target; reported before anything is submitted."""


def get_args_parser(add_help: bool = True, backend_flag: bool = True) -> argparse.ArgumentParser:
    """``backend_flag=False``: without ``--backend``, for a parent parser that sets the backend per run
    (``launchers/compare.py``)."""
    p = argparse.ArgumentParser(
        prog="launchers/submit.py",
        add_help=add_help,
        allow_abbrev=False,
        description="Submit `cxrdist train` to SLURM (or run it here) through submitit: one task per GPU.",
        epilog="Everything after `--` is a `cxrdist train` option (e.g. -- --shards shards/x --epochs 3). "
        "Without --shards the demo data is used (synthesised and packed into shards/demo on first use).",
    )
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    g.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs per node; one task per GPU (0: CPU ranks)")
    g.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        metavar="N",
        help="tasks per node (default: --gpus; with --gpus 0 the number of CPU ranks per node)",
    )
    g.add_argument(
        "--cpus-per-task",
        type=int,
        default=None,
        metavar="N",
        help="CPUs per task (default: the task's share of a node's CPUs, by the GPUs it takes)",
    )
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="memory per node in GB")
    g.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit in minutes (default: 60)")
    g = p.add_argument_group("scheduler")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--exclude", default=None, metavar="NODES", help="nodes to exclude")
    g.add_argument("--name", default=None, help="job name and run-folder prefix (default: cxrdist-<backend>)")
    g.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="S",
        help="seconds before the time limit at which SLURM sends USR2 (checkpoint + requeue)",
    )
    g = p.add_argument_group("launcher")
    from cxrdist.engine.backends import names  # the submitting process only: the job never builds a parser

    if backend_flag:
        g.add_argument(
            "--backend",
            choices=names(),
            default="ddp",
            metavar="NAME",
            help=f"one of {', '.join(names())} (default: ddp)",
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
        metavar="DIR",
        help="submitit logs, one folder per job: %%j is the job id (default: runs/_submitit/%%j)",
    )
    return p


def with_defaults(launch_args: argparse.Namespace) -> argparse.Namespace:
    """A namespace from a caller that set only some flags (compare.py, tests), completed with the defaults."""
    return argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **vars(launch_args)})
