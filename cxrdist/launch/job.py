"""The thin submitit ``Checkpointable``: one rank of a training run inside a submitit task (SLURM or local).

``__call__`` turns ``submitit.JobEnvironment()`` into RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT and calls ``cxrdist.engine.trainer.train(cfg)`` for its rank. Preemption: the
trainer catches SIGUSR2 on every rank, stops all ranks at the same step, checkpoints, and hands the signal to
submitit's handler on rank 0, which calls ``checkpoint()`` (the same config with ``--resume``) and requeues
the job. No training logic lives here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import submitit

from cxrdist.config import TrainConfig


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, cfg: TrainConfig, threads: int | None = None):
        self.cfg = cfg
        self.threads = threads  # torch threads per rank (None: SLURM's cpus-per-task)

    def __call__(self) -> dict:
        from cxrdist import dist  # torch-free: the wait policy below is still chosen before torch loads

        env = submitit.JobEnvironment()
        num_nodes = max(1, env.num_nodes)
        dist.export_env(
            dist.DistEnv(
                rank=env.global_rank,
                world_size=env.num_tasks,
                local_rank=env.local_rank,
                local_world_size=max(1, env.num_tasks // num_nodes),
                node_rank=env.node,
                num_nodes=num_nodes,
                master_addr="127.0.0.1" if env.cluster == "local" else env.hostnames[0],
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
