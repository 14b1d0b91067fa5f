"""`cxrdist train` end to end on synthetic shards: run folder contract, backends, resume, failures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import psutil
import pytest
import torch

from cxrdist.engine import checkpoint as ckpt
from cxrdist.labels import OBSERVATIONS

from runs import DENSE, TINY, assert_same_weights, final_weights, in_process, preempted, records, train

TINY_W1 = [*TINY, "--workers", "1"]  # each rank with a loader process of its own


@pytest.mark.slow
def test_single_run_writes_the_run_folder_contract(tiny_shards, tmp_path):
    """The one contract run of the poster's model, DenseNet-121 (in this process, as `cxrdist train`)."""
    run = tmp_path / "single"
    args = ["--shards", tiny_shards["shards"], "--out", run, "--backend", "single", "--epochs", "2"]
    in_process("train", *args, *DENSE, check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["backend"] == "single" and summary["world_size"] == 1
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    for e in summary["epochs"]:
        assert e["time_s"] > 0 and e["images_per_s"] > 0 and set(e["mem_peak_mb"]) == {"0"}
        assert e["val_auc_mean"] is None or 0 <= e["val_auc_mean"] <= 1
    test = summary["test"]
    manifest = json.loads((tiny_shards["shards"] / "manifest.json").read_text())
    assert test["n"] == manifest["splits"]["test"]["samples"]
    assert set(test["auc"]) == set(OBSERVATIONS) and "subgroups" in test
    # labels with one class in the split are undefined (None), never 0.5; the others are defined
    import tarfile

    seen = {}
    for tar in sorted(tiny_shards["shards"].glob("test-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = json.load(tf.extractfile(m))
                    for name, y, keep in zip(OBSERVATIONS, meta["labels"], meta["mask"]):
                        if keep:
                            seen.setdefault(name, set()).add(y)
    for name in OBSERVATIONS:
        assert (test["auc"][name] is None) == (len(seen.get(name, ())) < 2), name
    steps = records(run, 0, "step")
    assert steps and {
        "rank",
        "local_rank",
        "host",
        "device",
        "epoch",
        "step",
        "images_per_s",
        "step_time_s",
        "data_time_s",
        "loss",
        "lr",
        "mem_peak_mb",
    } <= set(steps[0])
    assert len(records(run, 0, "epoch")) == 2
    assert (run / "config.yaml").is_file()
    for tag in ("last", "best"):
        state = torch.load(run / "checkpoints" / f"{tag}.pt", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "rng", "config"} <= set(state)
    # evaluation from the checkpoint agrees with what the run reported
    ev = in_process("eval", "--run", run, "--split", "test", "--checkpoint", "last")
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluated = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert evaluated["n"] == test["n"]
    assert evaluated["mean"]["all"][0] == pytest.approx(test["auc_mean"], abs=0.02)


@pytest.mark.slow
def test_ddp_two_ranks_equal_batches_and_exact_once_eval(tiny_shards, tmp_path):
    run = tmp_path / "ddp"
    in_process(
        "train", "--shards", tiny_shards["shards"], "--out", run, "--backend", "ddp", "--nproc", "2", "--epochs", "1",
        *TINY_W1, check=True,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert set(summary["epochs"][0]["mem_peak_mb"]) == {"0", "1"}
    steps0, steps1 = records(run, 0, "step"), records(run, 1, "step")
    assert [r["step"] for r in steps0] == [r["step"] for r in steps1]  # the same number of batches per rank
    manifest = json.loads((tiny_shards["shards"] / "manifest.json").read_text())
    assert summary["test"]["n"] == manifest["splits"]["test"]["samples"]  # each test sample exactly once
    # identical initial weights, then each rank its own random stream (dropout), all kept for a resume
    rng = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # TensorBoard: one event file per rank in RUN/tb, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "images_per_s/rank0", "images_per_s/rank1", "mem_peak_mb/rank1"} <= tags
    assert {"val/auc_mean", "epoch/time_s", "epoch/epoch_time_s/rank1", "val/auc/Edema"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in steps0], rel=1e-6)
    assert events.Scalars("val/auc_mean")[0].value == pytest.approx(summary["epochs"][0]["val_auc_mean"], rel=1e-6)


@pytest.mark.slow
def test_deepspeed_zero1_run_and_resume(tiny_shards, tmp_path):
    run = tmp_path / "ds"
    in_process(
        "train",
        "--shards",
        tiny_shards["shards"],
        "--out",
        run,
        "--backend",
        "deepspeed",
        "--zero-stage",
        "1",
        "--nproc",
        "2",
        "--epochs",
        "1",
        *TINY_W1,
        check=True,
    )
    ckdir = run / "checkpoints"
    assert (ckdir / "latest").is_file() and (ckdir / (ckdir / "latest").read_text().strip()).is_dir()
    in_process(
        "train",
        "--shards",
        tiny_shards["shards"],
        "--out",
        run,
        "--backend",
        "deepspeed",
        "--zero-stage",
        "1",
        "--nproc",
        "2",
        "--epochs",
        "2",
        "--resume",
        *TINY_W1,
        check=True,
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == 1 and [e["epoch"] for e in summary["epochs"]] == [1, 2]


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_resume_matches_uninterrupted(tiny_shards, straight_run, tmp_path):
    from fixtures_runs import STRAIGHT

    args = ["--shards", tiny_shards["shards"], *STRAIGHT]
    run = tmp_path / "preempted"
    summary, err = preempted(args, run, after_lines=3)
    assert summary["status"] == "preempted", err[-2000:]
    stopped_at = summary["global_step"]
    assert 0 < stopped_at < 2 * summary["steps_per_epoch"]
    in_process("train", *args, "--out", run, "--resume", check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert len(records(run, 0, "epoch")) == 2  # every epoch recorded once
    # ... and whole: the interrupted epoch's record counts the images from before the preemption too
    assert all(r["images"] == summary["steps_per_epoch"] * 8 for r in records(run, 0, "epoch"))
    assert_same_weights(final_weights(straight_run), final_weights(run))


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.atomic_torch_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import torch, sys; from cxrdist.engine.checkpoint import atomic_torch_save\n"
                "atomic_torch_save({'model': {'w': torch.zeros(400_000_000 // 4)}, 'epoch': 2}, sys.argv[1])"
            ),
            str(path),
        ]
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".last.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    child.kill()
    child.wait()
    assert list(tmp_path.glob(".last.pt.*.tmp")), "the kill should land mid-save"
    state = ckpt.load(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))


@pytest.mark.slow
def test_bad_inputs_fail_before_any_worker_starts(tiny_shards, tmp_path):
    proc = train(
        "--shards", tmp_path / "nope", "--out", tmp_path / "r", "--backend", "ddp", "--nproc", "2", *TINY, check=False
    )
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    # the same checks without --nproc: in this process (exit code and message from cxrdist.cli.main)
    fp16 = ["--out", tmp_path / "r", "--backend", "single", "--precision", "fp16"]
    proc = in_process("train", "--shards", tiny_shards["shards"], *fp16, *TINY)
    assert proc.returncode == 2 and "fp16" in proc.stderr
    proc = in_process("train", "--shards", tiny_shards["shards"], "--out", tmp_path / "r", "--backend", "dp", *TINY)
    if torch.cuda.device_count() < 2:
        assert proc.returncode == 2 and "dp needs >= 2 visible GPUs" in proc.stderr
    # a manifest that disagrees with the shards
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards["shards"], bad)
    victim = sorted(bad.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = in_process("train", "--shards", bad, "--out", tmp_path / "r2", "--backend", "single", *TINY)
    assert proc.returncode == 2 and victim.name in proc.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_a_crashing_rank_ends_the_job(tiny_shards, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cxrdist.cli",
            "train",
            "--shards",
            str(tiny_shards["shards"]),
            "--out",
            str(tmp_path / "crash"),
            "--backend",
            "ddp",
            "--nproc",
            "2",
            "--epochs",
            "50",
            "--timeout",
            "60",
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    telemetry = tmp_path / "crash" / "telemetry" / "rank1.jsonl"
    deadline = time.monotonic() + 300
    while not (telemetry.exists() and telemetry.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    rank1 = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1"]
    assert rank1, "rank 1 should be running"
    t0 = time.monotonic()
    rank1[0].kill()
    _, err = proc.communicate(timeout=120)
    # whichever rank notices first (the killed one, or its peer losing the connection) ends the job
    assert proc.returncode != 0 and re.search(r"exited with code", err), err[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path):
    run = tmp_path / "nan"
    args = ["--shards", tiny_shards["shards"], "--out", run, "--backend", "single", *TINY, "--epochs", "1"]
    proc = in_process("train", *args, "--lr", "1e30", "--log-every", "1", "--checkpoint-every", "1")
    assert proc.returncode != 0 and "non-finite" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    last = run / "checkpoints" / "last.pt"
    if last.exists():  # whatever was kept is loadable and finite: no NaN state overwrote it
        state = torch.load(last, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# measured on 2026-12-03 (2 ranks, 2 epochs of cxrtiny at 32 px, batch 32): best val mean AUC 0.783 at lr 1e-3
# (0.779 at 3e-3, 0.788 at 1e-2); a model that learns nothing scores 0.5, a broken label or augmentation path
# about that. DenseNet-blur at 64 px reaches ~0.95 (`make demo`, which fails below 0.85).
LEARN_FLOOR = 0.70


@pytest.mark.slow
def test_ddp_two_cpu_ranks_learn_the_synthetic_findings(learnable_shards, tmp_path):
    """The learning check, cheap: 2 epochs of DDP on 2 CPU ranks at 32 px reach val mean AUC >= LEARN_FLOOR on
    the demo-sized synthetic set. (DenseNet-blur learning the same findings is `make demo`'s own gate.)"""
    run = tmp_path / "learn"
    args = ["--shards", learnable_shards["shards"], "--out", run, "--backend", "ddp", "--nproc", "2", "--epochs", "2"]
    args += ["--timeout", "60"]  # a rank stuck anywhere ends the test in a minute, its stack in the output
    in_process("train", *args, *TINY, "--batch-size", "32", "--workers", "1", "--log-every", "10", check=True)
    summary = json.loads((run / "summary.json").read_text())
    aucs = [e["val_auc_mean"] for e in summary["epochs"]]
    print("val mean AUC per epoch:", aucs, "test:", summary["test"]["auc_mean"])
    assert max(aucs) >= LEARN_FLOOR, aucs
