"""Session fixtures: reference runs of the plumbing recipe, trained once and compared against by many tests.

Registered in conftest.py (``pytest_plugins``). Trained in this process (``runs.in_process``); a test that
writes into one (``cxrdist eval`` does) only adds files the others do not read.
"""

from __future__ import annotations

import pytest

from runs import TINY, in_process

# one epoch, the plumbing recipe: what eval/predict/export and the location-equality tests start from
ONE_EPOCH = ["--backend", "single", "--epochs", "1", *TINY]
# uninterrupted, 2 epochs, every step logged: what a preempted + resumed run must end equal to
STRAIGHT = ["--backend", "single", "--epochs", "2", "--seed", "3", *TINY, "--log-every", "1"]


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory):
    """``train --shards tiny ONE_EPOCH``: a completed run folder with best/last checkpoints and test numbers."""
    run = tmp_path_factory.mktemp("tiny-run") / "run"
    in_process("train", "--shards", tiny_shards["shards"], "--out", run, *ONE_EPOCH, check=True)
    return run


@pytest.fixture(scope="session")
def straight_run(tiny_shards, tmp_path_factory):
    """``train --shards tiny STRAIGHT``: the uninterrupted reference of the preemption tests."""
    run = tmp_path_factory.mktemp("straight") / "run"
    in_process("train", "--shards", tiny_shards["shards"], "--out", run, *STRAIGHT, check=True)
    return run


@pytest.fixture(scope="session")
def nih_run(nih_shards, tmp_path_factory):
    """``train --shards nih ONE_EPOCH``: the NIH reference (NIH's tests, the cross-dataset matrix)."""
    run = tmp_path_factory.mktemp("nih-run") / "run"
    in_process("train", "--shards", nih_shards["shards"], "--out", run, *ONE_EPOCH, check=True)
    return run
