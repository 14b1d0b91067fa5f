"""One data path, end to end (issue 20): the same global batches on any number of ranks and workers, a
preempted run resumed on another number of ranks with every sample of the epoch trained once, and the shard
set opened once per process. The audit trail is the run's own: --record-samples (RUN/samples/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runs import TINY, in_process, preempted, recorded_batches, recorded_samples, summary
from servers import http_server

pytestmark = pytest.mark.slow

GB = 16  # the global batch every geometry below keeps
COMMON = [*TINY, "--global-batch-size", str(GB), "--record-samples", "--no-test", "--log-every", "1"]


def global_batches(run: Path, epoch: int) -> list[set[str]]:
    return recorded_batches(run, epoch, GB)


def test_the_same_global_batches_for_any_ranks_and_workers_and_the_manifest_read_once_per_process(
    tiny_shards, tmp_path
):
    """(1 rank, 0 workers), (2 ranks, 1 worker) read from an HTTP server, (2 ranks, 2 workers): the first two
    epochs' global batches are the same key sets; the 2-rank HTTP run fetched manifest.json once per process
    (the --nproc launcher and its two ranks)."""
    folder = tmp_path / "www" / "shards"
    shutil.copytree(tiny_shards["shards"], folder)
    runs = {}
    with http_server(tmp_path / "www") as (base, faults, _):
        for name, shards, extra in (
            ("1x0", folder, ["--backend", "single", "--workers", "0"]),
            ("2x1-http", f"{base}/shards", ["--backend", "ddp", "--nproc", "2", "--workers", "1"]),
            ("2x2", folder, ["--backend", "ddp", "--nproc", "2", "--workers", "2"]),
        ):
            runs[name] = tmp_path / name
            in_process("train", "--shards", shards, "--out", runs[name], "--epochs", "2", *COMMON, *extra, check=True)
        manifests = sum(1 for name, _ in faults.requests if name == "manifest.json")
    assert manifests <= 3, f"manifest.json fetched {manifests} times by 3 processes"
    for epoch in (0, 1):
        want = global_batches(runs["1x0"], epoch)
        assert len(want) == tiny_shards_steps(tiny_shards) and all(len(b) == GB for b in want)
        for name in ("2x1-http", "2x2"):
            assert global_batches(runs[name], epoch) == want, (name, epoch)
    assert global_batches(runs["1x0"], 0) != global_batches(runs["1x0"], 1)  # a new shuffle each epoch
    assert summary(runs["1x0"])["config"]["optim"]["accumulate"] == 2  # 1 rank x 8 x 2 = 16


def tiny_shards_steps(tiny_shards) -> int:
    manifest = json.loads((tiny_shards["shards"] / "manifest.json").read_text())
    return manifest["splits"]["train"]["samples"] // GB


@pytest.mark.parametrize("before, after", [("2", "1"), ("1", "2")])
def test_a_run_preempted_on_some_ranks_resumes_on_others_and_trains_each_sample_once(
    tiny_shards, tmp_path, before, after
):
    args = ["--shards", tiny_shards["shards"], "--backend", "ddp", "--epochs", "1", *COMMON, "--workers", "1"]
    run = tmp_path / "run"
    first, err = preempted([*args, "--nproc", before], run, after_lines=5)
    assert first["status"] == "preempted" and 0 < first["global_step"] < first["steps_per_epoch"], err[-2000:]
    in_process("train", *args, "--nproc", after, "--out", run, "--resume", check=True)
    final = summary(run)
    assert final["status"] == "completed" and final["restarts"] == 1 and final["world_size"] == int(after)
    assert final["global_step"] == final["steps_per_epoch"] == tiny_shards_steps(tiny_shards)  # as uninterrupted
    parts = sorted(p.name for p in (run / "samples").iterdir())
    assert any("part00" in p for p in parts) and any("part01" in p for p in parts)  # nothing overwritten
    trained = [k for keys in recorded_samples(run, 0).values() for k in keys]
    assert len(trained) == len(set(trained)) == final["steps_per_epoch"] * GB  # every sample of the epoch once
    assert final["config"]["optim"]["accumulate"] == (2 if after == "1" else 1)
