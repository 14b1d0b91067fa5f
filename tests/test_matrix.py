"""Research across datasets (issue 22): the cross-dataset AUROC matrix of two trained runs, and the run's test
numbers beside published figures (the poster's Table 5 shape)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from cxrdist.errors import UserError
from cxrdist.published import comparison, dataset_of, read_published

from runs import in_process

REPO_TABLE5 = Path(__file__).resolve().parents[1] / "docs" / "published" / "poster_table5.csv"


@pytest.mark.slow
def test_a_two_by_two_matrix_has_intervals_per_label_columns_and_a_plot(tiny_run, nih_run, tiny_shards, nih_shards,
                                                                         tmp_path):  # fmt: skip
    """Train CheXpert, train NIH (the session's reference runs) x test CheXpert, test NIH (`eval --map-labels`)."""
    runs = []
    for name, run, other in (("on-chexpert", tiny_run, nih_shards), ("on-nih", nih_run, tiny_shards)):
        dst = tmp_path / name
        shutil.copytree(run, dst, ignore=shutil.ignore_patterns("eval"))
        in_process("eval", "--run", dst, "--bootstrap", "50", check=True)
        in_process("eval", "--run", dst, "--shards", other["shards"], "--map-labels", "--bootstrap", "50", check=True)
        runs.append(dst)
    out = tmp_path / "matrix"
    in_process("report", "--matrix", *runs, "--out", out, check=True)
    rows = {r["run"]: r for r in csv.DictReader((out / "matrix.csv").open())}
    assert {r["train_source"] for r in rows.values()} == {"chexpert", "nih"}
    for r in rows.values():
        for test in ("chexpert", "nih"):
            low, mean, high = (float(r[f"{test} {k}"]) for k in ("low", "mean", "high"))
            assert 0 <= low <= mean <= high <= 1, (r["run"], test)
    assert rows["on-chexpert"]["nih:Effusion"] and rows["on-nih"]["chexpert:Pleural Effusion"]  # mapped findings
    assert rows["on-chexpert"]["nih:Hernia"] == ""  # NIH-only: CheXpert's model does not score it
    text = (out / "matrix.md").read_text()
    assert "in-distribution" in text and text.count("| **") == 2  # the two diagonal cells, bold
    assert (out / "matrix.png").stat().st_size > 5000


def test_the_matrix_refuses_a_run_without_its_own_evaluation(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=r"no eval/test/metrics\.json: run `cxrdist eval --run"):
        from cxrdist.matrix import build_matrix

        build_matrix([tmp_path / "run"], tmp_path / "out")


def test_the_poster_table5_ships_and_reads_and_a_bad_file_names_its_line(tmp_path):
    rows = read_published(REPO_TABLE5)
    assert [(r["model"], r["dataset"], r["accuracy"], r["auc"]) for r in rows][2] == (
        "Xclassifier (DenseNetblur-121d)", "CheXpert", 89.61, 83.89
    )  # fmt: skip
    assert rows[0]["accuracy"] is None and all(r["kind"] == "published" for r in rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("model,dataset,accuracy,auc,source\nX,CheXpert,,8o.5,paper\n")
    with pytest.raises(UserError, match=r"bad\.csv:2: auc '8o\.5' is not a number"):
        read_published(bad)
    bad.write_text("model,dataset,auc\nX,CheXpert,80\n")
    with pytest.raises(UserError, match=r"missing columns? accuracy, source"):
        read_published(bad)


def test_runs_sit_beside_the_published_rows_of_their_dataset():
    published = read_published(REPO_TABLE5)
    run = {"run": "r1", "model_description": "DenseNetblur-121d", "protocol": "mimic/official", "labels": "chexpert",
           "test_acc_pct": 91.0, "test_auc_pct": 80.0, "status": "completed"}  # fmt: skip
    rows = comparison(published, [run])
    mimic = [r for r in rows if r["dataset"] == "MIMIC-CXR"]
    assert [r["kind"] for r in mimic] == ["published"] * 3 + ["this run"] and mimic[-1]["auc"] == 80.0
    assert dataset_of("", "nih") == "NIH ChestX-ray14" and dataset_of("chexpert/official", "x") == "CheXpert"


@pytest.mark.slow
def test_report_shows_a_run_beside_the_poster_table5(tiny_run, tmp_path):
    done = in_process("report", tiny_run, "--out", tmp_path / "r", "--published", REPO_TABLE5)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Beside published figures (not rerun)" in text and "not a controlled comparison" in text
    assert "| **" in text and "Gyawali" in text
    assert "this run" in (tmp_path / "r" / "published.csv").read_text()
