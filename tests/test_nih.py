"""NIH ChestX-ray14 in its real layout: the reader (hand-written rows, archive folders and flat), the official
lists, --labels across sets, a 112,120-row CSV planned in seconds, and NIH shards trained, evaluated and
predicted end to end; a CheXpert model scored on NIH shards over the shared findings, and the refusals when
label sets disagree."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT, NIH
from cxrdist.shards.pack import pack
from cxrdist.sources import build_table
from cxrdist.synth import NIH_HEADER, NIH_PREVALENCE

from runs import TINY, in_process, summary


def nih_row(name, findings="No Finding", fu=0, pid=1, age="58", sex="M", view="PA") -> list:
    return [name, findings, fu, pid, age, sex, view, 2500, 2048, 0.143, 0.143]


def write_nih(root: Path, rows: list[list], csv="Data_Entry_2017_v2020.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = ",".join(NIH_HEADER) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    (root / csv).write_text(text)
    return root


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), 100).save(path)


def test_reader_labels_paths_views_and_bad_rows(tmp_path):
    root = write_nih(
        tmp_path / "nih",
        [
            nih_row("00000001_000.png", "Cardiomegaly|Effusion", pid=1),
            nih_row("00000001_001.png", "No Finding", fu=1, pid=1, view="AP"),
            nih_row("00000002_000.png", "Efusion", pid=2),  # line 4: a typo
            nih_row("00000003_000.png", "", pid=3),  # line 5: empty
            nih_row("00000004_000.png", "No Finding|Mass", pid=4),  # line 6: contradictory
            nih_row("00000005_000.png", "Hernia|Pleural_Thickening", pid=5, age="061Y", sex="F"),
        ],
    )
    png(root / "images_001/images/00000001_000.png")
    png(root / "images_002/images/00000001_001.png")
    png(root / "images/00000005_000.png")  # a flat unpack beside the archive folders
    t = build_table("nih", root, views="all")
    df = t.df.set_index("key")
    assert list(df.index) == ["00000001_000", "00000001_001", "00000005_000"]
    assert df.loc["00000001_000", "path"] == "images_001/images/00000001_000.png"
    assert df.loc["00000001_001", "path"] == "images_002/images/00000001_001.png"
    assert df.loc["00000005_000", "path"] == "images/00000005_000.png"
    assert df.loc["00000001_000", ["Cardiomegaly", "Effusion", "Mass"]].tolist() == [1.0, 1.0, 0.0]
    assert df.loc["00000001_001", list(NIH)].sum() == 0 and df.loc["00000001_001", "view"] == "AP"
    assert df.loc["00000005_000", ["Hernia", "Pleural_Thickening"]].tolist() == [1.0, 1.0]
    assert (df.loc["00000005_000", "sex"], df.loc["00000005_000", "age"]) == ("F", 61.0)  # 2017's '061Y'
    assert df["patient_id"].tolist() == ["1", "1", "5"] and t.label_names == NIH
    reasons = {s["source"]: s["reason"] for s in t.skipped}
    assert reasons["Data_Entry_2017_v2020.csv:4"] == "unknown finding 'Efusion' in Finding Labels 'Efusion'"
    assert reasons["Data_Entry_2017_v2020.csv:5"] == "empty Finding Labels"
    assert "together with findings" in reasons["Data_Entry_2017_v2020.csv:6"]
    assert (t.df[[f"mask:{n}" for n in NIH]] == 1).all().all()  # NIH labels are explicit: nothing masked


def test_official_lists_and_their_absence(tmp_path):
    rows = [nih_row(f"{p:08d}_{fu:03d}.png", pid=p, fu=fu) for p in range(1, 41) for fu in range(2)]
    root = write_nih(tmp_path / "nih", rows)
    with pytest.raises(UserError, match=r"--split official needs train_val_list\.txt and test_list\.txt"):
        build_table("nih", root, split="official")
    test = [r[0] for r in rows if r[3] > 30]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[3] <= 30) + "\n")
    t = build_table("nih", root, split="official")
    split = dict(zip(t.df["key"] + ".png", t.df["split"]))
    assert {split[n] for n in test} == {"test"}
    assert {split[r[0]] for r in rows if r[3] <= 30} == {"train", "val"}  # train_val -> train/val, no test
    assert t.df.groupby("patient_id")["split"].nunique().max() == 1


def test_labels_across_sets_and_a_labels_file(tmp_path, nih_shards):
    root = nih_shards["root"]
    t = build_table("nih", root, labels="chexpert")
    assert t.label_names == CHEXPERT
    assert set(t.labels_missing) == {
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Lung Opacity",
        "Lung Lesion",
        "Pleural Other",
        "Fracture",
        "Support Devices",
    }
    native = build_table("nih", root).df.set_index("key")
    mapped = t.df.set_index("key")
    assert (mapped["Pleural Effusion"] == native.loc[mapped.index, "Effusion"]).all()
    assert (mapped["mask:Fracture"] == 0).all() and (mapped["mask:Pleural Effusion"] == 1).all()
    f = tmp_path / "labels.txt"
    f.write_text("Pleural Effusion\nCardiomegaly\n")
    assert build_table("nih", root, labels=str(f)).label_names == ("Pleural Effusion", "Cardiomegaly")
    f.write_text("Efusion\n")
    with pytest.raises(UserError, match=r"--labels: nih has no label 'Efusion'; it has Atelectasis, Cardiomegaly"):
        build_table("nih", root, labels=str(f))


def generate_nih_csv(root: Path, n: int = 112_120, patients: int = 30_805, seed: int = 0) -> Path:
    """A full-size Data_Entry_2017_v2020.csv: per-patient follow-ups, NIH's prevalences, real combinations."""
    rng = np.random.default_rng(seed)
    pid = np.sort(np.concatenate([np.arange(1, patients + 1), rng.integers(1, patients + 1, n - patients)]))
    fu = pd.Series(pid).groupby(pid).cumcount().to_numpy()
    found = np.stack([rng.random(n) < NIH_PREVALENCE[name][0] for name in NIH], 1)
    names = np.asarray(NIH, dtype=object)
    labels = ["|".join(names[row]) or "No Finding" for row in found]
    df = pd.DataFrame(
        {
            "Image Index": [f"{p:08d}_{f:03d}.png" for p, f in zip(pid, fu)],
            "Finding Labels": labels,
            "Follow-up #": fu,
            "Patient ID": pid,
            "Patient Age": rng.integers(1, 95, n),
            "Patient Gender": np.where(rng.random(n) < 0.56, "M", "F"),
            "View Position": np.where(rng.random(n) < 0.6, "PA", "AP"),
            "w": 2500,
            "h": 2048,
            "x": 0.143,
            "y": 0.143,
        }
    )
    root.mkdir(parents=True)
    (root / "Data_Entry_2017_v2020.csv").write_text(",".join(NIH_HEADER) + "\n" + df.to_csv(index=False, header=False))
    return root


def test_the_real_sized_csv_plans_in_seconds(tmp_path):
    root = generate_nih_csv(tmp_path / "nih")
    # this thread's CPU time: OpenMP threads that an earlier in-process training left spinning do not count
    wall, cpu = time.perf_counter(), time.thread_time()
    m = pack("nih", root, tmp_path / "shards", dry_run=True, quiet=True)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    print(f"112,120-row NIH plan (table + split + shard plan + manifest): {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert m["counts"][0] == ["rows in Data_Entry_2017_v2020.csv", 112_120]
    assert sum(s["patients"] for s in m["splits"].values()) == 30_805
    assert sum(s["samples"] for s in m["splits"].values()) == 112_120 and m["labels"] == list(NIH)
    assert any("not found under images" in n for n in m["notes"])  # no PNGs here: said, not guessed silently
    assert cpu < 5.0, f"planning took {cpu:.1f} s CPU ({wall:.1f} s wall) for 112,120 rows"


cli = in_process  # eval / predict in this process


@pytest.mark.slow
def test_nih_shards_train_evaluate_and_predict(nih_shards, nih_run):
    manifest = json.loads((nih_shards["shards"] / "manifest.json").read_text())
    assert manifest["labels"] == list(NIH) and manifest["label_set"] == "nih" and manifest["labels_missing"] == []
    s = summary(nih_run)
    assert s["status"] == "completed" and s["labels"] == "nih"
    assert set(s["test"]["auc"]) == set(NIH) and s["test"]["n"] == manifest["splits"]["test"]["samples"]
    ev = cli("eval", "--run", nih_run, "--split", "test", "--checkpoint", "last")
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluated = json.loads((nih_run / "eval" / "test" / "metrics.json").read_text())
    assert list(evaluated["labels"]) == list(NIH)
    assert evaluated["competition5_labels"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"]
    image = next(nih_shards["root"].glob("images_001/images/*.png"))
    pr = cli("predict", "--checkpoint", nih_run, "--json", image)
    assert pr.returncode == 0, pr.stderr[-2000:]
    assert list(json.loads(pr.stdout)[0]["probabilities"]) == list(NIH)


@pytest.mark.slow
def test_eval_cam_scores_grad_cam_against_the_boxes_with_intervals_and_overlays(nih_shards, nih_run):
    """The synthetic NIH set boxes every drawn finding (BBox_List_2017.csv, 1024 frame); `eval --cam` scores
    each boxed label of the test split beside random maps, in metrics.json and report.md, with overlays."""
    ev = cli("eval", "--run", nih_run, "--split", "test", "--cam", "--bootstrap", "50")
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = nih_run / "eval" / "test"
    loc = json.loads((out / "metrics.json").read_text())["localization"]
    assert loc["labels"] and loc["threshold"] == 0.5
    for label, r in loc["labels"].items():
        assert label in NIH and r["n"] > 0
        for who in ("cam", "random"):
            for k in ("pointing", "mass_ratio", "iou"):
                point, low, high = r[who][k]
                assert low <= point <= high, (label, who, k, r[who][k])
    assert "## Grad-CAM against the radiologists' boxes" in (out / "report.md").read_text()
    assert list((out / "cam").glob("*.png"))


@pytest.mark.slow
def test_a_chexpert_model_on_nih_shards_maps_labels_or_refuses(tiny_shards, nih_shards, tmp_path):
    run = tmp_path / "chexpert"
    in_process("train", "--shards", tiny_shards["shards"], "--out", run, "--backend", "single", "--max-steps", "2",
               *TINY, check=True)  # fmt: skip
    refused = cli("eval", "--run", run, "--shards", nih_shards["shards"])
    assert refused.returncode == 2
    assert "has labels nih (14 labels), but the checkpoint has chexpert (14 labels)" in refused.stderr
    mapped = cli("eval", "--run", run, "--shards", nih_shards["shards"], "--map-labels")
    assert mapped.returncode == 0, mapped.stderr[-2000:]
    result = json.loads((run / "eval" / f"test@{nih_shards['shards'].name}" / "metrics.json").read_text())
    assert result["label_map"]["Pleural Effusion"] == "Effusion" and len(result["label_map"]) == 7
    assert list(result["labels"]) == list(result["label_map"].values())
    assert result["protocol"].startswith("nih/")
    # resuming a run on shards with another label set: refused, naming both
    resumed = in_process("train", "--shards", nih_shards["shards"], "--out", run, "--resume", "--backend", "single",
                         *TINY)  # fmt: skip
    assert resumed.returncode == 2
    assert "nih (14 labels)" in resumed.stderr and "chexpert (14 labels)" in resumed.stderr
