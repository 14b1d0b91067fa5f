"""launchers/compare.py end to end on CPU ranks with the local executor, and its skipped-only path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARE = REPO / "launchers" / "compare.py"


def _run(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # its own session: on a timeout the local executor's jobs (same process group) go down with it
    proc = subprocess.Popen(
        [sys.executable, str(COMPARE), *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"compare.py timed out after {timeout} s:\n{(out + err)[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_only_skipped_backends_still_report(tmp_path):
    """dp on CPU ranks cannot run: recorded as skipped with the reason, the report says so, rc 1."""
    sweep = tmp_path / "sweep"
    proc = _run(
        [
            "--nodes",
            "1",
            "--gpus",
            "0",
            "--backends",
            "dp",
            "--cluster",
            "local",
            "--wait",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "--out",
            str(sweep),
            "--epochs",
            "1",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((sweep / "sweep.json").read_text())
    assert data["runs"] == [] and len(data["skipped"]) == 1
    assert data["skipped"][0]["backend"] == "dp" and "dp needs >= 2 GPUs" in data["skipped"][0]["reason"]
    csv = pd.read_csv(sweep / "report" / "report.csv")
    assert csv["status"].tolist() == ["skipped"] and "dp needs" in csv["reason"][0]
    assert "skipped" in (sweep / "report" / "report.md").read_text()


def test_bad_sweep_options(tmp_path):
    proc = _run(["--backends", "single", "--cluster", "local", "--", "--backend", "ddp"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--backends" in proc.stderr
    proc = _run(["--backends", "single,tpu"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--backends must be a comma list" in proc.stderr


@pytest.mark.slow
def test_compare_cpu_ranks_end_to_end(tiny_shards, tmp_path):
    """single, dp, ddp, deepspeed on 2 CPU ranks (tests/fixtures_data.py's tiny shards): dp is skipped."""
    sweep = tmp_path / "sweep"
    proc = _run(
        [
            "--nodes",
            "1",
            "--gpus",
            "0",
            "--tasks-per-node",
            "2",
            "--backends",
            "single,dp,ddp,deepspeed",
            "--cluster",
            "local",
            "--wait",
            "--time",
            "10",
            "--cpus-per-task",
            "1",
            "--log-dir",
            str(tmp_path / "logs"),
            "--",
            "--shards",
            str(tiny_shards["shards"]),
            "--model",
            "cxrtiny",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--max-steps",
            "3",
            "--log-every",
            "1",  # a shared 2-core box: a few steps per run
            "--out",
            str(sweep),
        ],
        cwd=tmp_path,
        timeout=540,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    data = json.loads((sweep / "sweep.json").read_text())
    assert [r["backend"] for r in data["runs"]] == ["single", "ddp", "deepspeed"]
    assert all(r["rc"] == 0 for r in data["runs"])
    assert [s["backend"] for s in data["skipped"]] == ["dp"]

    report = sweep / "report"
    csv = pd.read_csv(report / "report.csv").set_index("backend")
    assert csv.loc["dp", "status"] == "skipped" and "dp needs" in csv.loc["dp", "reason"]
    for b in ("single", "ddp", "deepspeed"):
        row = csv.loc[b]
        assert row["status"] == "completed", (b, row["reason"])
        assert row["format"] == "shards" and row["batch_per_rank"] == 8
        assert row["epoch_time_s"] > 0 and row["images_per_s"] > 0 and 0 <= row["data_wait_pct"] <= 100
        assert 0 <= row["test_auc_pct"] <= 100 or pd.isna(row["test_auc_pct"])
    assert csv.loc["single", "layout"] == "1 CPU rank" and csv.loc["ddp", "layout"] == "2 CPU ranks"
    assert csv.loc["single", "speedup"] == pytest.approx(1.0)
    assert csv.loc["ddp", "speedup"] > 0 and csv.loc["ddp", "efficiency_pct"] == pytest.approx(
        100 * csv.loc["ddp", "speedup"] / 2, abs=0.2
    )
    for name in ("report.md", "throughput.png", "epoch_time.png", "memory.png"):
        assert (report / name).stat().st_size > 0, name
    # the sweep folder can be reported again later
    from cxrdist.cli import main

    assert main(["report", str(sweep), "--out", str(tmp_path / "again")]) == 0
    assert len(pd.read_csv(tmp_path / "again" / "report.csv")) == 4


@pytest.mark.slow
def test_compare_sweeps_models_into_the_table_2_columns(tiny_shards, tmp_path):
    """--models: one run per model with the same data, backend, seed and schedule; the report carries the
    model, its description and parameter count beside accuracy, AUROC with its interval and speed."""
    sweep = tmp_path / "models"
    args = ["--nodes", "1", "--gpus", "0", "--backends", "single", "--models", "densenet121,resnet18"]
    args += ["--cluster", "local", "--wait", "--time", "10", "--cpus-per-task", "1", "--log-dir", str(tmp_path / "l")]
    args += ["--", "--shards", str(tiny_shards["shards"]), "--image-size", "32", "--batch-size", "8"]
    args += ["--epochs", "1", "--workers", "0", "--device", "cpu", "--max-steps", "3", "--out", str(sweep)]
    proc = _run(args, cwd=tmp_path, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    data = json.loads((sweep / "sweep.json").read_text())
    assert [(r["model"], r["run_dir"]) for r in data["runs"]] == [
        ("densenet121", "densenet121-single-shards"),
        ("resnet18", "resnet18-single-shards"),
    ]
    csv = pd.read_csv(sweep / "report" / "report.csv").set_index("model")
    assert csv.loc["densenet121", "params_m"] == pytest.approx(6.96, abs=0.05)  # DenseNet-121, 14-way head
    assert csv.loc["resnet18", "params_m"] == pytest.approx(11.18, abs=0.05)
    assert csv.loc["resnet18", "model_description"] == "timm resnet18"
    for m in ("densenet121", "resnet18"):
        assert csv.loc[m, "status"] == "completed" and csv.loc[m, "speedup"] == pytest.approx(1.0)
        assert "(" in csv.loc[m, "test_auc_ci"]  # the test AUROC with its interval
    md = (sweep / "report" / "report.md").read_text()
    table2 = md[md.index("## Models (the poster's Table 2)") :].split("\n## ")[0]
    rows = [ln for ln in table2.splitlines() if ln.startswith("| densenet121 |") or ln.startswith("| resnet18 |")]
    assert len(rows) == 2 and "| timm resnet18 |" in rows[1] and "| DenseNet-121: 7x7 stem" in rows[0]
    assert "Table 2" in proc.stdout + proc.stderr  # the terminal shows it too
    bad = _run(["--models", "resnet5", "--", "--model", "x"], cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "closest" in bad.stderr


@pytest.mark.slow
def test_compare_seeds_aggregate_to_mean_and_sd_with_pooled_intervals(tiny_shards, tmp_path):
    """--seeds 0,1,2: the arm once per seed; after `cxrdist eval` of each, the report's seeds section gives
    mean ± sd over the three and the pooled interval."""
    from runs import in_process

    sweep = tmp_path / "seeds"
    args = ["--nodes", "1", "--gpus", "0", "--backends", "single", "--seeds", "0,1,2", "--cluster", "local"]
    args += ["--wait", "--time", "10", "--cpus-per-task", "1", "--log-dir", str(tmp_path / "l"), "--"]
    args += ["--shards", str(tiny_shards["shards"]), "--model", "cxrtiny", "--image-size", "32", "--batch-size", "8"]
    args += ["--epochs", "1", "--workers", "0", "--device", "cpu", "--max-steps", "3", "--out", str(sweep)]
    proc = _run(args, cwd=tmp_path, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    data = json.loads((sweep / "sweep.json").read_text())
    assert [(r["run_dir"], r["seed"]) for r in data["runs"]] == [(f"single-shards-s{s}", s) for s in (0, 1, 2)]
    for r in data["runs"]:
        in_process("eval", "--run", sweep / r["run_dir"], "--bootstrap", "50", check=True)
    in_process("report", sweep, "--out", tmp_path / "report", check=True)
    csv = pd.read_csv(tmp_path / "report" / "report.csv")
    assert sorted(csv["seed"]) == [0, 1, 2] and csv["test_auc_pct"].nunique() > 1  # three different models
    text = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| cxrtiny-single-shards | 0,1,2 |"))
    assert " ± " in row and "(" in row.split("|")[-2], row  # mean ± sd, and the pooled interval
