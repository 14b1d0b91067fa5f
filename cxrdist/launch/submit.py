"""Check a request, then hand ``TrainJob(cfg)`` to a submitit executor (SLURM or local). Returns a
``Submission`` for ``monitor``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import submitit

from cxrdist.config import PRETRAINED_WORDS, TrainConfig
from cxrdist.demo import demo_shards, ensure_demo_shards
from cxrdist.errors import UserError
from cxrdist.launch.args import LaunchError, with_defaults
from cxrdist.launch.cluster import resolve_cluster
from cxrdist.launch.job import TrainJob
from cxrdist.launch.plan import Plan, plan, with_backend
from cxrdist.runfolder import RunFolder
from cxrdist.shards import location, mix
from cxrdist.shards.manifest import read_manifest


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


def _absolute(path: str) -> str:
    """A local path made absolute (the job runs elsewhere); a URL location as it is."""
    return str(Path(path).absolute()) if path and not location.is_remote(path) else path


def prepare_config(args: argparse.Namespace, cfg: TrainConfig) -> TrainConfig:
    """The train config the job will run: backend, absolute paths, a run folder, the demo data if needed."""
    cfg = with_backend(cfg, args.backend)
    name = args.name or f"cxrdist-{args.backend}"
    out = cfg.run.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    d = cfg.data
    if mix.is_mix(d.shards):  # a mix: each of its locations
        shards = ",".join(_absolute(x.strip()) for x in d.shards.split(","))
    else:
        shards = _absolute(d.shards) or ("" if d.mix else str(demo_shards()))
    data = replace(d, shards=shards, mix=_absolute(d.mix), source_root=_absolute(d.source_root))
    keep = cfg.model.pretrained.lower() in PRETRAINED_WORDS  # timm's weights by name, not a file
    model = replace(cfg.model, pretrained=cfg.model.pretrained if keep else _absolute(cfg.model.pretrained))
    cfg = replace(cfg, data=data, run=replace(cfg.run, out=_absolute(out)), model=model)
    from cxrdist.engine.backends import validate_config

    cfg.validate()
    validate_config(cfg)
    if not cfg.run.resume and RunFolder(cfg.run.out).has_checkpoints():
        raise LaunchError(
            f"{cfg.run.out} already holds checkpoints: pass --resume (after `--`) to continue "
            "it, or choose another --out"
        )
    return cfg


def slurm_parameters(args: argparse.Namespace, p: Plan) -> dict[str, Any]:
    params: dict[str, Any] = dict(
        job_name=args.name or f"cxrdist-{args.backend}",
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
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.mem_gb:
        params["mem"] = f"{int(args.mem_gb * 1024)}MB"
    return params


def visible_gpu_parameters(visible: str | None, gpus: int) -> dict:
    """LocalExecutor parameters that keep the user's CUDA_VISIBLE_DEVICES (submitit would set 0..N-1):
    indices through its ``visible_gpus``, UUIDs / MIG names through a setup line."""
    ids = [x.strip() for x in (visible or "").split(",") if x.strip()]
    if not gpus or not ids:
        return {}
    if all(x.isdigit() for x in ids):
        return {"visible_gpus": tuple(int(x) for x in ids)}
    return {"setup": [f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(ids[:gpus]))}"]}


def make_executor(args: argparse.Namespace, p: Plan, log_dir: str):
    if p.cluster == "slurm":
        ex = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=3)
        ex.update_parameters(**slurm_parameters(args, p))
        return ex
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


def submit(launch_args: argparse.Namespace, cfg: TrainConfig, log: TextIO | None = None) -> Submission:
    """Check, then submit one training run. Raises LaunchError (a UserError) for requests that cannot run."""
    log = log or sys.stderr
    args = with_defaults(launch_args)
    cluster = resolve_cluster(args)
    p = plan(args, with_backend(cfg, args.backend), cluster)
    for note in p.notes:
        print(note, file=log)
    cfg = prepare_config(args, cfg)
    if cfg.run.device == "auto":  # CPU ranks even where the nodes have GPUs; GPUs asked for: CUDA or an error
        cfg = replace(cfg, run=replace(cfg.run, device="cuda" if p.gpus_per_node else "cpu"))
    if Path(cfg.data.shards) == demo_shards():
        ensure_demo_shards(log=log)
    d = cfg.data
    try:  # here, before anything is submitted (a URL: fetched once); a mix: each of its sources
        sources = [e.location for e in mix.entries_of(d.shards, d.mix)] if mix.is_mix(d.shards, d.mix) else [d.shards]
        for where in sources:
            read_manifest(where)
    except UserError as e:  # it names the location
        raise LaunchError(f"--shards: {e}") from None
    log_dir = str(Path(args.log_dir).absolute())
    if "%j" not in log_dir:
        log_dir = os.path.join(log_dir, "%j")
    try:
        job = make_executor(args, p, log_dir).submit(TrainJob(cfg, p.threads))
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


def describe(sub: Submission) -> str:
    p = sub.plan
    shape = ""
    if p:
        shape = f"{p.nodes} node(s) x {p.tasks_per_node} task(s), {p.gpus_per_node} GPU(s)/node"
        shape += f", partition {p.partition}" if p.partition else ""
    return (
        f"submitted job {sub.job_id} ({sub.executor}, {sub.backend}{', ' + shape if shape else ''})\n"
        f"  run folder: {sub.run_dir}\n"
        f"  logs:       {sub.log_dir}"
    )
