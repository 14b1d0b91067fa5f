"""cxrdist.report on hand-written run folders (the run-folder contract in docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrdist.engine.backends import backend_class
from cxrdist.report import build_report, load_run
from cxrdist.runfolder import RunSummary

T0 = 1_700_000_000.0


def _config(backend: str, fmt: str = "shards", nproc: int = 1) -> dict:
    return {
        "data": {"shards": "/data/shards", "format": fmt, "image_size": 224, "workers": 2},
        "model": {"name": "densenet121"},
        "optim": {"epochs": 2, "batch_size": 64},
        "dist": {"backend": backend, "nproc": nproc},
        "run": {"out": "", "seed": 0, "precision": "bf16", "device": "cuda"},
    }


def _steps(
    rank: int,
    host: str,
    step_times: list[float],
    data_times: list[float],
    epochs: int = 2,
    batch: int = 64,
    mem: float = 1000.0,
) -> list[dict]:
    recs, t = [], T0
    for epoch in range(epochs):
        for i, (st, dt) in enumerate(zip(step_times, data_times)):
            t += st
            recs.append(
                {
                    "event": "step",
                    "time": t,
                    "rank": rank,
                    "local_rank": rank,
                    "host": host,
                    "device": f"cuda:{rank}",
                    "epoch": epoch,
                    "step": i,
                    "images_per_s": batch / st,
                    "step_time_s": st,
                    "data_time_s": dt,
                    "loss": 0.5,
                    "lr": 1e-3,
                    "mem_peak_mb": mem,
                    "mem_reserved_mb": mem * 1.2,
                }
            )
    return recs


def _epochs(rank: int, host: str, epoch_time: float, ips: float, mem: float, epochs: int = 2) -> list[dict]:
    return [
        {
            "event": "epoch",
            "time": T0 + (e + 1) * epoch_time,
            "rank": rank,
            "host": host,
            "epoch": e,
            "epoch_time_s": epoch_time,
            "images_per_s": ips,
            "mem_peak_mb": mem,
        }
        for e in range(epochs)
    ]


def _write_run(
    root: Path,
    name: str,
    backend: str,
    *,
    world: int,
    nodes: int = 1,
    status: str = "completed",
    epoch_time: float | None = None,
    ranks: dict[int, list[dict]] | None = None,
    mem: dict[int, float] | None = None,
    ips: float | None = None,
    val_auc: float = 0.80,
    test_auc: float | None = 0.8196,
    test_acc: float | None = 0.8512,
    restarts: int = 0,
    device: str = "cuda",
    fmt: str = "shards",
) -> Path:
    run = root / name
    (run / "telemetry").mkdir(parents=True)
    cfg = _config(backend, fmt, world if backend in ("ddp", "deepspeed") else 1)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for rank, recs in (ranks or {}).items():
        (run / "telemetry" / f"rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    epochs = []
    if epoch_time is not None:
        epochs = [
            {
                "epoch": e,
                "time_s": epoch_time,
                "images_per_s": ips,
                "train_loss": 0.4,
                "val_auc_mean": val_auc - 0.01 * (1 - e),
                "val_accuracy_mean": 0.84,
                "mem_peak_mb": {str(r): m for r, m in (mem or {}).items()},
            }
            for e in range(2)
        ]
    test = (
        {}
        if test_auc is None
        else {
            "auc": {},
            "auc_mean": test_auc,
            "auc_mean_ci": [test_auc, test_auc - 0.02, test_auc + 0.02],
            "competition5": [test_auc + 0.03, test_auc + 0.01, test_auc + 0.05],
            "accuracy": {},
            "accuracy_mean": test_acc,
            "n": 100,
            "subgroups": {},
        }
    )
    summary = {
        "backend": backend,
        "backend_info": backend_class(backend).info(),
        "world_size": world,
        "nodes": nodes,
        "hosts": [f"node{i + 1}" for i in range(nodes)],
        "device": device,
        "format": fmt,
        "config": cfg,
        "restarts": restarts,
        "status": status,
        "epochs": epochs,
        "test": test,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# data-wait: ratio of the sums, which differs from the mean of the per-step ratios with these numbers
SINGLE_ST, SINGLE_DT = [0.5, 0.7, 0.6], [0.05, 0.02, 0.08]
DDP_ST0, DDP_DT = [0.5, 0.5, 0.5], [0.04, 0.06, 0.05]
DDP_ST1 = [0.65, 0.65, 0.65]  # rank 1: 30% slower than rank 0
DS_ST, DS_DT0, DS_DT1 = [0.5, 0.5, 0.5], [0.2, 0.25, 0.15], [0.22, 0.18, 0.2]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    single = _write_run(
        root,
        "single-shards",
        "single",
        world=1,
        epoch_time=100.0,
        ips=64.0,
        mem={0: 5000.0},
        ranks={0: _steps(0, "node1", SINGLE_ST, SINGLE_DT, mem=4900.0) + _epochs(0, "node1", 100.0, 64.0, 5000.0)},
    )
    ddp = _write_run(
        root,
        "ddp-shards",
        "ddp",
        world=2,
        nodes=2,
        epoch_time=55.0,
        ips=170.0,
        mem={0: 5100.0, 1: 5400.0},
        test_auc=0.8150,
        restarts=1,
        ranks={
            0: _steps(0, "node1", DDP_ST0, DDP_DT, mem=5100.0) + _epochs(0, "node1", 55.0, 90.0, 5100.0),
            1: _steps(1, "node2", DDP_ST1, DDP_DT, mem=5400.0) + _epochs(1, "node2", 55.0, 80.0, 5400.0),
        },
    )
    ds = _write_run(
        root,
        "deepspeed-shards",
        "deepspeed",
        world=2,
        epoch_time=62.5,
        ips=150.0,
        mem={0: 4000.0, 1: 4100.0},
        ranks={
            0: _steps(0, "node1", DS_ST, DS_DT0, mem=4000.0) + _epochs(0, "node1", 62.5, 76.0, 4000.0),
            1: _steps(1, "node1", DS_ST, DS_DT1, mem=4100.0) + _epochs(1, "node1", 62.5, 74.0, 4100.0),
        },
    )
    failed = _write_run(root, "ddp-jpeg", "ddp", world=2, status="failed", test_auc=None, fmt="jpeg")
    return [single, ddp, ds, failed]


SKIPPED = [
    {
        "backend": "dp",
        "format": "shards",
        "reason": "dp needs >= 2 GPUs on one node; the target has 0",
        "backend_info": backend_class("dp").info(),
    }
]  # as launchers/compare.py records a skipped backend


def _row(df: pd.DataFrame, run: str) -> pd.Series:
    rows = df[df["run"] == run]
    assert len(rows) == 1, df["run"].tolist()
    return rows.iloc[0]


def test_csv_columns_and_values(runs, tmp_path):
    out = tmp_path / "report"
    df = build_report(runs, out=out, skipped=SKIPPED)
    csv = pd.read_csv(out / "report.csv")
    assert list(csv.columns) == list(df.columns)
    for col in (
        "run",
        "backend",
        "format",
        "layout",
        "precision",
        "batch_per_rank",
        "epoch_time_s",
        "epoch_time_min",
        "images_per_s",
        "images_per_s_per_rank",
        "speedup",
        "efficiency_pct",
        "mem_peak_mb_max",
        "mem_peak_mb_spread",
        "data_wait_pct",
        "val_auc_pct",
        "val_acc_pct",
        "test_auc_pct",
        "test_acc_pct",
        "status",
        "restarts",
        "reason",
    ):
        assert col in csv.columns, col
    assert len(csv) == 5

    single, ddp, ds = _row(csv, "single-shards"), _row(csv, "ddp-shards"), _row(csv, "deepspeed-shards")
    assert single["layout"] == "1×1 GPU" and ddp["layout"] == "2×1 GPU" and ds["layout"] == "1×2 GPU"
    assert single["precision"] == "bf16" and ddp["batch_per_rank"] == 64
    assert single["epoch_time_s"] == pytest.approx(100.0) and single["epoch_time_min"] == pytest.approx(1.667, abs=1e-3)
    assert single["speedup"] == pytest.approx(1.0)
    assert ddp["speedup"] == pytest.approx(100 / 55, abs=1e-3)
    assert ddp["efficiency_pct"] == pytest.approx(100 * (100 / 55) / 2, abs=0.1)
    assert ds["speedup"] == pytest.approx(1.6, abs=1e-3) and ds["efficiency_pct"] == pytest.approx(80.0, abs=0.1)
    # images/s from the epoch records: sum over ranks per epoch, averaged; per rank = mean of rank-epochs
    assert ddp["images_per_s"] == pytest.approx(170.0) and ddp["images_per_s_per_rank"] == pytest.approx(85.0)
    # peak memory: max over ranks and the spread between ranks
    assert ddp["mem_peak_mb_max"] == pytest.approx(5400.0) and ddp["mem_peak_mb_spread"] == pytest.approx(300.0)
    # data-wait share: sum(data_time_s) / sum(step_time_s) over every step record of every rank
    assert single["data_wait_pct"] == pytest.approx(100 * sum(SINGLE_DT) / sum(SINGLE_ST), abs=0.01)
    assert ddp["data_wait_pct"] == pytest.approx(100 * 2 * sum(DDP_DT) / (sum(DDP_ST0) + sum(DDP_ST1)), abs=0.01)
    assert ds["data_wait_pct"] == pytest.approx(100 * (sum(DS_DT0) + sum(DS_DT1)) / (2 * sum(DS_ST)), abs=0.01)
    # AUC / accuracy in percent like the poster (val: last epoch)
    assert single["test_auc_pct"] == pytest.approx(81.96) and single["test_acc_pct"] == pytest.approx(85.12)
    assert single["val_auc_pct"] == pytest.approx(80.0) and single["val_acc_pct"] == pytest.approx(84.0)
    # the trainer's test means carry patient-bootstrap intervals; `cxrdist eval`'s metrics.json wins where present
    assert single["test_auc_ci"] == "82.0 (80.0–84.0)" and single["test_comp5_ci"] == "85.0 (83.0–87.0)"
    assert ddp["test_auc_ci"] == "81.5 (79.5–83.5)"
    assert ddp["status"] == "completed" and ddp["restarts"] == 1

    failed = _row(csv, "ddp-jpeg")
    assert failed["status"] == "failed" and "telemetry" in failed["reason"]
    assert math.isnan(failed["epoch_time_s"]) and math.isnan(failed["speedup"])

    skipped = _row(csv, "dp-shards")
    assert skipped["status"] == "skipped" and "2 GPUs" in skipped["reason"] and skipped["backend"] == "dp"
    # rows ordered like the poster: by format, then single, dp, ddp, deepspeed
    assert csv["run"].tolist() == ["single-shards", "dp-shards", "ddp-shards", "deepspeed-shards", "ddp-jpeg"]


def test_eval_metrics_are_the_reference_with_their_protocol(runs, tmp_path):
    single = runs[0]
    (single / "eval" / "test").mkdir(parents=True)
    mean = {"all": [0.7, 0.65, 0.75], "competition5": [0.8, 0.7, 0.9]}
    (single / "eval" / "test" / "metrics.json").write_text(json.dumps({"protocol": "chexpert/official", "mean": mean}))
    csv = build_report(runs, tmp_path / "r", print_table=False)
    row = _row(csv, "single-shards")
    assert row["test_auc_ci"] == "70.0 (65.0–75.0)" and row["test_comp5_ci"] == "80.0 (70.0–90.0)"
    assert row["protocol"] == "chexpert/official"
    assert "Comp-5 AUC (95% CI)" in (tmp_path / "r" / "report.md").read_text()


def test_markdown_flags_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "report"
    build_report(runs, out=out, skipped=SKIPPED)
    md = (out / "report.md").read_text()
    term = capsys.readouterr().out
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 5  # header + one row per run, the skipped one included
    assert "Table 2" not in md  # one model: no model comparison
    single_line = next(line for line in table if "single-shards" in line)
    assert "1.67" in single_line and "82.0 (80.0–84.0)" in single_line and "85.12" in single_line
    assert "1.82×" in next(line for line in table if "| ddp-shards" in line)
    assert "skipped" in next(line for line in table if "dp-shards" in line and "| dp |" in line)

    flags = md.split("## Flags", 1)[1]
    assert "straggler: rank 1 on node2 is 30% slower than the median" in flags
    assert "deepspeed-shards: loader-bound" in flags and "40%" in flags
    assert "single-shards: loader-bound" not in flags and "ddp-shards: loader-bound" not in flags
    assert "straggler" not in flags.split("deepspeed-shards", 1)[1].split("\n")[0]
    assert "ddp-jpeg: status failed" in flags
    assert "dp-shards: skipped: dp needs >= 2 GPUs" in md
    for text in ("straggler: rank 1 on node2", "loader-bound", "skipped"):
        assert text in term

    import matplotlib.image as mpimg

    for name in ("throughput.png", "epoch_time.png", "memory.png"):
        png = out / name
        assert png.stat().st_size > 10_000, name
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img.std() > 0.01  # something was drawn


def test_load_run_marks_incomplete_and_missing(tmp_path):
    run = tmp_path / "half"
    (run / "telemetry").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config("ddp", nproc=3)))
    recs = _steps(0, "node1", [0.5, 0.5], [0.1, 0.1], epochs=1)
    (run / "telemetry" / "rank0.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + '{"event": "step", "ti'
    )  # killed mid-write
    (run / "telemetry" / "rank1.jsonl").write_text("")
    loaded = load_run(run)
    assert loaded["status"] == "incomplete" and loaded["summary"] == RunSummary()
    assert loaded["world_size"] == 3 and len(loaded["steps"]) == 2
    problems = " ".join(loaded["problems"])
    assert "no summary.json" in problems and "1 unreadable line" in problems
    assert "rank(s) 1, 2 wrote no telemetry" in problems


def test_report_survives_empty_and_missing_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    zero = _write_run(tmp_path, "zero", "single", world=1, epoch_time=None)  # summary, no epochs, no records
    out = tmp_path / "report"
    df = build_report([empty, tmp_path / "does-not-exist", zero], out=out, print_table=False)
    assert df["run"].tolist() == ["zero", "empty", "does-not-exist"]
    assert df["status"].tolist() == ["completed", "incomplete", "incomplete"]
    assert df["speedup"].isna().all()
    md = (out / "report.md").read_text()
    assert "does not exist" in md and "no telemetry" in md
    for name in ("throughput.png", "epoch_time.png", "memory.png", "report.csv"):
        assert (out / name).stat().st_size > 0


def test_sweep_folder_expands(runs, tmp_path):
    sweep = runs[0].parent
    (sweep / "sweep.json").write_text(
        json.dumps(
            {
                "runs": [
                    {"backend": "single", "format": "shards", "run_dir": "single-shards"},
                    {"backend": "ddp", "format": "shards", "run_dir": str(runs[1])},
                ],
                "skipped": SKIPPED,
            }
        )
    )
    df = build_report([sweep], out=tmp_path / "r", print_table=False)
    assert df["run"].tolist() == ["single-shards", "dp-shards", "ddp-shards"]
    assert df.loc[df["run"] == "dp-shards", "status"].item() == "skipped"


def test_cli_report(runs, tmp_path):
    from cxrdist.cli import main

    assert main(["report", *map(str, runs), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.csv").exists()
