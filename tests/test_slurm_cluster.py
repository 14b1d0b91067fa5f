"""The throw-away SLURM cluster itself: batch jobs across both nodes, submitit on it, cancel, requeue."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# the job processes cannot import this test module: ship its functions and classes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _node_and_rank() -> tuple[str, int]:
    import os

    return os.environ.get("SLURMD_NODENAME", ""), int(os.environ.get("SLURM_PROCID", "-1"))


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


class _Resumable(submitit.helpers.Checkpointable):
    """Sleeps on the first run; once requeued (checkpoint() hands back resumed=True) returns at once."""

    def __call__(self, marker: str, resumed: bool = False) -> str:
        import os

        Path(marker).open("a").write(f"start restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        if resumed:
            return "resumed"
        time.sleep(120)
        return "never requeued"

    def checkpoint(self, marker: str, resumed: bool = False) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(), marker, resumed=True)


def _executor(folder: Path, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=60, slurm_partition="debug", **params)
    return ex


@pytest.mark.timeout(60)
def test_sbatch_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={out}",
        "--wrap",
        "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID'",
    ).stdout.strip()
    assert slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED"
    lines = sorted(out.read_text().split("\n"))
    assert [ln for ln in lines if ln] == ["node1 0", "node2 1"]


@pytest.mark.timeout(60)
def test_sinfo_shows_two_idle_debug_nodes(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %P %G").stdout.split("\n")
    assert sorted(ln.split()[0] for ln in out if ln) == ["node1", "node2"]
    assert all("debug*" in ln and "(null)" in ln for ln in out if ln)  # default partition, no GPUs


@pytest.mark.timeout(90)
def test_submitit_runs_a_function_on_both_nodes(slurm_cluster, tmp_path):
    job = _executor(tmp_path, nodes=2, tasks_per_node=1).submit(_node_and_rank)
    assert isinstance(job, submitit.SlurmJob)
    assert sorted(job.results()) == [("node1", 0), ("node2", 1)]


@pytest.mark.timeout(60)
def test_cancelled_submitit_job_raises_promptly(slurm_cluster, tmp_path):
    job = _executor(tmp_path).submit(_sleep, 300)
    slurm_cluster.wait_state(job.job_id, "RUNNING", timeout=30)
    t0 = time.monotonic()
    job.cancel()
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    # submitit waits up to 15 s for a result file that will never come; then the sacct shim's CANCELLED
    assert time.monotonic() - t0 < 40
    assert job.state == "CANCELLED"


@pytest.mark.timeout(90)
def test_requeue_released_with_starttime_now_restarts_quickly(slurm_cluster, tmp_path):
    marker = tmp_path / "marker.txt"
    job = _executor(tmp_path, slurm_signal_delay_s=30).submit(_Resumable(), str(marker))
    slurm_cluster.wait_state(job.job_id, "RUNNING", timeout=30)
    while not marker.exists():
        time.sleep(0.1)
    time.sleep(1.0)  # let the job install submitit's signal handlers
    t0 = time.monotonic()
    job._interrupt()  # SIGTERM then USR2 to the steps: checkpoint() + scontrol requeue
    slurm_cluster.release(job.job_id)
    assert job.result() == "resumed"
    assert time.monotonic() - t0 < 30, "the released requeue should not wait for the ~120 s requeue delay"
    assert marker.read_text().split("\n")[:2] == ["start restart=0", "start restart=1"]
