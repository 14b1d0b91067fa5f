"""The trainer's pure rules, tested directly: which saved geometry an elastic resume can continue, and how a
preemption hand-over treats a requeue that SLURM ends with its own SIGTERM."""

from __future__ import annotations

import signal
import subprocess

import pytest

from cxrdist.engine.trainer import StopFlag, geometry_problem, requeue_ended_by_itself

NOW = {"global_batch": 16, "steps_per_epoch": 12}


@pytest.mark.parametrize(
    "saved, problem",
    [
        (None, None),
        ({"global_batch": 16, "steps_per_epoch": 12}, None),
        # before global batches a checkpoint recorded ranks x batch size: 2 x 8 is the same global batch
        ({"world_size": 2, "batch_size": 8, "steps_per_epoch": 12}, None),
        ({"world_size": 1, "batch_size": 8, "steps_per_epoch": 24}, "--global-batch-size 8"),
        ({"global_batch": 32, "steps_per_epoch": 6}, "--global-batch-size 32"),
        ({"global_batch": 16, "steps_per_epoch": 11}, "the training split changed"),
    ],
)
def test_geometry_problem_refuses_only_what_cannot_be_continued(saved, problem):
    got = geometry_problem(saved, NOW)
    assert got == problem if problem is None else problem in got


def kill(cmd: list[str], returncode: int) -> subprocess.CalledProcessError:
    return subprocess.CalledProcessError(returncode, cmd)


def test_a_requeue_ended_by_its_own_sigterm_counts_as_requeued():
    assert requeue_ended_by_itself(kill(["scontrol", "requeue", "42"], -signal.SIGTERM))
    assert not requeue_ended_by_itself(kill(["scontrol", "requeue", "42"], 1))  # refused by slurmctld
    assert not requeue_ended_by_itself(kill(["scontrol", "hold", "42"], -signal.SIGTERM))


@pytest.mark.parametrize("code, exits", [(-signal.SIGTERM, True), (1, False)])
def test_hand_over_exits_after_a_requeue_killed_by_slurm_and_raises_a_real_failure(code, exits):
    def submitit_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue raises in that race
        raise kill(["scontrol", "requeue", "42"], code)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        flag = StopFlag()
        with pytest.raises(SystemExit if exits else subprocess.CalledProcessError):
            flag.hand_over()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)
