"""`make gpu-check-dry`: the GPU harness on this CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, only: str) -> tuple[dict, dict]:
    """`make gpu-check-dry` with GPU_ONLY=``only`` (the checks in two tests, so that two test workers share
    them): (the report, its checks by name)."""
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "gpu-check-dry", f"GPU_REPORT={tmp_path / 'gpu'}", f"GPU_ONLY={only}"],
        capture_output=True,
        text=True,
        timeout=880,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-dry" / "gpucheck.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["dry"] and report["passed"] and len(lines) == len(checks) + 1
    assert set(checks) == {x.strip() for x in only.split(",")}
    assert (tmp_path / "gpu-dry" / "gpucheck.md").read_text().startswith("# cxrdist gpu-check (dry run on CPU)")
    return report, checks


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_passes_its_device_precision_backend_and_throughput_checks(tmp_path):
    _, checks = dry_run(tmp_path, "device,augmentation,conv dtypes,channels_last,ddp,deepspeed,throughput")
    dtypes = checks["conv dtypes"]["details"]
    # under a simulated CUDA autocast the old DeepSpeed recipe falls back to fp32; the current one is bf16
    assert dtypes["deepspeed bf16, old recipe, simulated CUDA autocast"] == ["float32"]
    assert (
        dtypes["deepspeed bf16"] == dtypes["single bf16"] == dtypes["ddp bf16"] == dtypes["fsdp bf16"] == ["bfloat16"]
    )
    modes = {k: v["mode"] for k, v in checks["channels_last"]["details"].items()}
    assert modes == {
        "single": "model",
        "ddp": "model",
        "deepspeed zero-0": "model",
        "deepspeed zero-1": "activations",
        "deepspeed zero-2": "activations",
        "fsdp": "activations",
    }
    thr = checks["throughput"]["details"]
    assert not [k for k, v in thr["arms"].items() if "error" in v], thr["arms"]
    assert {
        "fp32",
        "bf16 channels_last",
        "ddp world 1 bf16 channels_last",
        "fsdp bf16 channels_last (activations)",
    } <= set(thr["arms"])
    assert thr["trainer_vs_bare"]["trainer_ips"] > 0 and thr["trainer_vs_bare"]["bare_loop_ips"] > 0
    versions = checks["device"]["details"]["versions"]
    assert versions["timm"] and versions["deepspeed"] and "nccl" in versions


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_passes_its_end_to_end_check(tmp_path):
    _, checks = dry_run(tmp_path, "end to end")
    details = checks["end to end"]["details"]
    e2e = details[f"single {details['precision']} channels_last, preempted + resumed"]
    assert 0 < e2e["preempted_at_step"] < e2e["final_steps"]
    fsdp = details["fsdp save + resume + eval"]
    # the same weights; bf16 convolutions in the trainer's channels_last replica and eval's plain model round
    # differently (as in tests/test_train.py's contract run)
    assert fsdp["restarts"] == 1 and fsdp["eval"]["all"][0] == pytest.approx(fsdp["train_test_auc"], abs=0.02)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_spent_budget_leaves_skip_lines_and_a_valid_report(tmp_path):
    """--budget-s 0.05: the first check runs (the budget counts from the first check on), every later one is
    SKIP with the reason; the JSON, rewritten after every check, stays whole. (A budget of seconds would let
    the bf16 convolution check run too: a minute of emulated bf16 on a CPU without bf16 units.)"""
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "cxrdist.gpucheck", "--dry", "--budget-s", "0.05"],
        capture_output=True,
        text=True,
        timeout=280,
        env={**__import__("os").environ, "GPU_REPORT": str(tmp_path / "r")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skips = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIP ")]
    report = json.loads((tmp_path / "r" / "gpucheck.json").read_text())  # GPU_REPORT names the folder
    assert report["budget_s"] == 0.05 and report["checks"][0]["status"] == "PASS"
    assert len(skips) == len([c for c in report["checks"] if c["status"] == "SKIP"]) >= 5
    assert all("--budget-s 0.05 spent" in c["summary"] for c in report["checks"] if c["status"] == "SKIP")
