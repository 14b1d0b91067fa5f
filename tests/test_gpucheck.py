"""`make gpu-check-dry`: the GPU harness on this CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run_passes_every_check(tmp_path):
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "gpu-check-dry", f"GPU_REPORT={tmp_path / 'gpu'}"],
        capture_output=True,
        text=True,
        timeout=880,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-dry" / "gpucheck.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["dry"] and report["passed"] and len(lines) == len(checks) + 1
    assert set(checks) == {
        "device",
        "augmentation",
        "conv dtypes",
        "channels_last",
        "ddp",
        "deepspeed",
        "end to end",
        "throughput",
    }
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
    e2e = checks["end to end"]["details"]["single bf16 channels_last, preempted + resumed"]
    assert 0 < e2e["preempted_at_step"] < e2e["final_steps"]
    assert (tmp_path / "gpu-dry" / "gpucheck.md").read_text().startswith("# cxrdist gpu-check (dry run on CPU)")
