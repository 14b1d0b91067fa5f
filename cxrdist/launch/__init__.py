"""Submit training to SLURM (or to this machine) through submitit, one task per GPU.

One module per job: ``args`` (the launcher's flags, ``LaunchError``), ``cluster`` (what the target has:
``scontrol ping``, ``sinfo``, local GPUs), ``plan`` (the request -> tasks / GPUs / CPUs, or why not: small
pure rules), ``job`` (``TrainJob``, the thin submitit ``Checkpointable``), ``submit`` (config + executor ->
a ``Submission``), ``monitor`` (``wait``: state, progress, every rank's outcome) and ``cli`` (``main``).
No training logic lives here, and no path of the checkout: it runs from a wheel install.
"""

from cxrdist.launch.args import CLUSTERS, DEFAULT_LOG_DIR, LaunchError, get_args_parser, with_defaults
from cxrdist.launch.cli import main
from cxrdist.launch.cluster import Partition, controller_answers, parse_sinfo, resolve_cluster
from cxrdist.launch.job import TrainJob
from cxrdist.launch.monitor import FINAL_STATES, failure_report, job_state, wait
from cxrdist.launch.plan import Plan, layout_tasks, preflight, size_cpus  # plan(): cxrdist.launch.plan.plan
from cxrdist.launch.submit import Submission, describe, prepare_config, submit, visible_gpu_parameters

__all__ = [
    "CLUSTERS",
    "DEFAULT_LOG_DIR",
    "FINAL_STATES",
    "LaunchError",
    "Partition",
    "Plan",
    "Submission",
    "TrainJob",
    "controller_answers",
    "describe",
    "failure_report",
    "get_args_parser",
    "job_state",
    "layout_tasks",
    "main",
    "parse_sinfo",
    "preflight",
    "prepare_config",
    "resolve_cluster",
    "size_cpus",
    "submit",
    "visible_gpu_parameters",
    "wait",
    "with_defaults",
]
