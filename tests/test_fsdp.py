"""FSDP2 (fully_shard) end to end on two CPU ranks: the proof that a backend is one module plus the registry.

The loss-curve agreement with single/DDP is in tests/test_backends.py; here: training with FSDP's mixed
precision and channels_last, the sharded checkpoint, a preemption mid-epoch and --resume to the same
weights as an uninterrupted run, `cxrdist eval` reading the sharded checkpoint without a process group, and
the backend's own description reaching the summary that `cxrdist report` reads.
"""

from __future__ import annotations

import json

import pytest
import torch

from cxrdist.engine.backends import read_weights

from runs import TINY, in_process, preempted, summary


@pytest.mark.slow
def test_fsdp_trains_in_bf16_and_eval_reads_its_sharded_checkpoint(tiny_shards, tmp_path):
    run = tmp_path / "fsdp"
    in_process(
        "train",
        "--shards",
        tiny_shards["shards"],
        "--out",
        run,
        "--backend",
        "fsdp",
        "--nproc",
        "2",
        "--epochs",
        "1",
        "--precision",
        "bf16",
        "--channels-last",
        *TINY,
        check=True,
    )
    s = summary(run)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["channels_last"] == "activations"
    assert s["backend_info"]["name"] == "fsdp" and s["backend_info"]["per_gpu"]
    folder = run / "checkpoints" / (run / "checkpoints" / "best").read_text().strip()
    assert (folder / ".metadata").is_file() and (folder / "client.pt").is_file()  # a DCP folder
    weights, client = read_weights(run, "best", backend="fsdp")  # one process, no group
    assert client["config"]["dist"]["backend"] == "fsdp" and all(not hasattr(v, "to_local") for v in weights.values())
    ev = in_process("eval", "--run", run, "--split", "test")  # one process, no group
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout[ev.stdout.index("{") :])["n"] == s["test"]["n"]


@pytest.mark.slow
def test_fsdp_preempted_mid_epoch_resumes_to_the_uninterrupted_weights(tiny_shards, tmp_path):
    args = [
        "--shards",
        tiny_shards["shards"],
        "--backend",
        "fsdp",
        "--nproc",
        "2",
        "--epochs",
        "2",
        "--seed",
        "3",
        *TINY,
        "--log-every",
        "1",
    ]
    in_process("train", *args, "--out", tmp_path / "straight", check=True)
    run = tmp_path / "preempted"
    first, err = preempted(args, run, after_lines=4)
    assert first["status"] == "preempted", err[-2000:]
    assert 0 < first["global_step"] < 2 * first["steps_per_epoch"]
    in_process("train", *args, "--out", run, "--resume", check=True)
    final = summary(run)
    assert final["status"] == "completed" and final["restarts"] == 1 and [e["epoch"] for e in final["epochs"]] == [1, 2]
    a, _ = read_weights(tmp_path / "straight", "last", backend="fsdp")
    b, _ = read_weights(run, "last", backend="fsdp")
    # weights: the same data and optimizer steps; BatchNorm statistics are averaged over the ranks at each
    # checkpoint (FSDP does not sync them), so a resumed run matches them only approximately
    for k in a:
        if a[k].is_floating_point():
            tol = dict(rtol=1e-2, atol=1e-2) if "running" in k else dict(rtol=1e-4, atol=1e-5)
            assert torch.allclose(a[k], b[k], **tol), k
