"""RSNA Pneumonia Detection in its real layout: the reader (boxes per image, Target conflicts and bad boxes
listed, view/sex/age from DICOM headers, an absent DICOM kept as frontal by curation), the label set against
CheXpert and NIH, the synthetic layout, a 30,227-row CSV planned in seconds, and RSNA shards (with their
boxes) trained and evaluated end to end."""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdist import labels
from cxrdist.errors import UserError
from cxrdist.shards.pack import pack, synth_shards
from cxrdist.sources import build_table
from cxrdist.synth import synthesize, write_dicom
from cxrdist.synth.rsna import RSNA_HEADER, write_rsna_dicom

from runs import TINY, in_process, summary

CSV, IMAGES = "stage_2_train_labels.csv", "stage_2_train_images"


def write_rsna(root: Path, rows: list[list]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = ",".join(RSNA_HEADER) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    (root / CSV).write_text(text)
    return root


def dicom(root: Path, pid: str, size: int = 64, **header) -> None:
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    write_rsna_dicom(root / IMAGES / f"{pid}.dcm", np.full((size, size), 0.4, np.float32), pid, **header)


def test_reader_boxes_headers_and_bad_rows(tmp_path):
    root = write_rsna(
        tmp_path / "rsna",
        [
            ["pos2", 10.0, 12.0, 20.0, 30.0, 1],  # line 2: two boxes, DICOM present (64 px)
            ["pos2", 40.0, 12.0, 18.5, 30.0, 1],
            ["neg", "", "", "", "", 0],  # line 4: no DICOM: kept, view unknown
            ["conflict", 100.0, 100.0, 50.0, 50.0, 1],  # line 5
            ["conflict", "", "", "", "", 0],  # line 6: disagrees with line 5
            ["zero", 100.0, 100.0, 0.0, 50.0, 1],  # line 7: empty box
            ["outside", 50.0, 10.0, 30.0, 10.0, 1],  # line 8: past the right edge of its 64 px DICOM
            ["nobox", "", "", "", "", 1],  # line 9
            ["negbox", 1.0, 1.0, 5.0, 5.0, 0],  # line 10
            ["two", "", "", "", "", 2],  # line 11
            ["half", 1.0, "", 5.0, 5.0, 1],  # line 12
            ["neg1024", "", "", "", "", 0],  # line 13: a DICOM written by write_dicom (sex 'O', no age)
            ["pos1024", 700.0, 600.0, 300.0, 400.0, 1],  # line 14: inside RSNA's 1024 frame, no DICOM
        ],
    )
    dicom(root, "pos2", view="AP", sex="F", age=51)
    dicom(root, "outside", view="PA", sex="M", age=30)
    write_dicom(root / IMAGES / "neg1024.dcm", np.full((32, 32), 0.5), view="PA")
    t = build_table("rsna", root)  # --views frontal: every RSNA image is frontal by curation
    df = t.df.set_index("key")
    assert list(df.index) == ["pos2", "neg", "neg1024", "pos1024"]
    opacity = "Lung Opacity"
    assert df.loc["pos2", "boxes"] == ((opacity, 10.0, 12.0, 20.0, 30.0), (opacity, 40.0, 12.0, 18.5, 30.0))
    assert df.loc["neg", "boxes"] == () and df.loc["pos1024", "boxes"] == ((opacity, 700.0, 600.0, 300.0, 400.0),)
    assert df["Lung Opacity"].tolist() == [1.0, 0.0, 0.0, 1.0] and t.label_names == ("Lung Opacity",)
    assert (df.loc["pos2", "view"], df.loc["pos2", "sex"], df.loc["pos2", "age"]) == ("AP", "F", 51.0)  # bare '51'
    assert (df.loc["neg", "view"], df.loc["neg", "sex"], np.isnan(df.loc["neg", "age"])) == ("", "U", True)
    assert (df.loc["neg1024", "view"], df.loc["neg1024", "sex"]) == ("PA", "U")
    assert t.unparseable == {"PatientSex": 1}  # write_dicom's 'O': read as U, counted
    assert df.loc["pos2", "path"] == f"{IMAGES}/pos2.dcm"
    assert (df["patient_id"] == df.index).all() and (df["study_id"] == df.index).all()
    reasons = {s["source"]: s["reason"] for s in t.skipped}
    assert reasons == {
        f"{CSV}:6": f"Target 0 disagrees with Target 1 at {CSV}:5 (same patientId)",
        f"{CSV}:7": "box with a non-positive width or height",
        f"{CSV}:8": "box outside the 64 x 64 image",
        f"{CSV}:9": "Target 1 without a box",
        f"{CSV}:10": "Target 0 with a box",
        f"{CSV}:11": "Target '2' is not 0 or 1",
        f"{CSV}:12": "incomplete box (x, y, width and height are all needed)",
    }
    assert t.counts[:3] == [(f"rows in {CSV}", 13), ("images (patientIds)", 11), ("valid rows", 4)]
    assert t.notes[0] == (
        f"view, sex and age from 3 DICOM headers under {IMAGES}/; 2 images absent, 0 unreadable: view '', sex U, "
        "age NaN (packing lists them)"
    )


def test_official_split_is_refused_and_the_root_explained(tmp_path):
    root = write_rsna(tmp_path / "rsna", [["a", "", "", "", "", 0]])
    with pytest.raises(UserError, match="never released the labels of its stage 2 test images"):
        build_table("rsna", root, split="official")
    (root / CSV).unlink()
    with pytest.raises(UserError, match=f"no {CSV}: the RSNA root is the folder holding it and {IMAGES}/"):
        build_table("rsna", root)


def test_label_set_matches_chexpert_by_name_and_nih_by_its_nearest_only():
    assert labels.resolve("rsna") == ("Lung Opacity",) and labels.set_name(("Lung Opacity",)) == "rsna"
    assert labels.overlap(labels.RSNA, labels.CHEXPERT) == [("Lung Opacity", "Lung Opacity")]
    assert labels.overlap(labels.RSNA, labels.NIH) == [("Lung Opacity", "Pneumonia")]
    assert labels.overlap(labels.NIH, labels.RSNA) == [("Pneumonia", "Lung Opacity")]
    assert len(labels.overlap(labels.CHEXPERT, labels.NIH)) == 7  # no Lung Opacity <-> Pneumonia there
    assert ("Lung Opacity", "Pneumonia") not in labels.overlap(labels.CHEXPERT, labels.NIH)
    assert labels.counterpart("Lung Opacity", labels.NIH) is None  # --labels never takes the nearest


def test_synthetic_layout_is_the_real_format_and_deterministic(tmp_path):
    import pydicom

    a = synthesize("rsna", tmp_path / "a", 40, size=32, seed=3)
    b = synthesize("rsna", tmp_path / "b", 40, size=32, seed=3)
    assert (a / CSV).read_bytes() == (b / CSV).read_bytes()
    rows = pd.read_csv(a / CSV, dtype={"patientId": str})
    assert list(rows.columns) == RSNA_HEADER
    first = sorted((a / IMAGES).iterdir())[0]
    assert first.read_bytes() == (b / IMAGES / first.name).read_bytes()
    assert all(len(str(uuid.UUID(p))) == 36 for p in rows["patientId"].unique())
    pos = rows[rows["Target"] == 1]
    assert pos[["x", "y", "width", "height"]].notna().all().all() and (pos["width"] > 0).all()
    assert (pos["x"] + pos["width"] <= 32).all() and (pos["y"] + pos["height"] <= 32).all()
    assert rows[rows["Target"] == 0][["x", "y", "width", "height"]].isna().all().all()
    assert set(pos.groupby("patientId").size()) <= {1, 2}
    classes = pd.read_csv(a / "stage_2_detailed_class_info.csv")
    assert len(classes) == len(rows) and ((classes["class"] == "Lung Opacity") == (rows["Target"] == 1)).all()
    ds = pydicom.dcmread(a / IMAGES / f"{pos['patientId'].iloc[0]}.dcm")
    assert (ds.BitsAllocated, ds.PhotometricInterpretation, ds.Rows) == (8, "MONOCHROME2", 32)
    assert ds.file_meta.TransferSyntaxUID.name.startswith("JPEG Baseline") and ds.ViewPosition in ("AP", "PA")
    assert ds.PatientID == pos["patientId"].iloc[0] and ds.PatientSex in ("M", "F") and ds.PatientAge.isdigit()


# the real stage_2_train_labels.csv: 6,012 positives with 9,555 boxes (2,614 one, 3,266 two, 119 three,
# 13 four) and 20,672 negatives: 30,227 rows, 26,684 images
BOXES_PER_POSITIVE = {1: 2614, 2: 3266, 3: 119, 4: 13}
NEGATIVES = 20_672


def generate_rsna_csv(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    per_image = np.concatenate([np.repeat(k, n) for k, n in BOXES_PER_POSITIVE.items()] + [np.ones(NEGATIVES, int)])
    target = np.concatenate([np.ones(sum(BOXES_PER_POSITIVE.values()), int), np.zeros(NEGATIVES, int)])
    order = rng.permutation(len(per_image))
    per_image, target = per_image[order], target[order]
    ids = np.asarray([str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in per_image], dtype=object)
    n = int(per_image.sum())
    w, h = rng.uniform(40, 400, n).round(), rng.uniform(60, 600, n).round()
    df = pd.DataFrame(
        {
            "patientId": np.repeat(ids, per_image),
            "x": (rng.random(n) * (1024 - w)).round(),
            "y": (rng.random(n) * (1024 - h)).round(),
            "width": w,
            "height": h,
            "Target": np.repeat(target, per_image),
        }
    )
    df.loc[df["Target"] == 0, ["x", "y", "width", "height"]] = np.nan
    root.mkdir(parents=True)
    df.to_csv(root / CSV, index=False)
    return root


def test_the_real_sized_csv_plans_in_seconds(tmp_path):
    root = generate_rsna_csv(tmp_path / "rsna")
    rows = pd.read_csv(root / CSV)
    assert len(rows) == 30_227 and rows["patientId"].nunique() == 26_684
    # this thread's CPU time: OpenMP threads that an earlier in-process training left spinning do not count
    wall, cpu = time.perf_counter(), time.thread_time()
    m = pack("rsna", root, tmp_path / "shards", dry_run=True, quiet=True)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    print(f"30,227-row RSNA plan (table + split + shard plan + manifest): {wall:.2f} s wall, {cpu:.2f} s CPU")
    assert m["counts"][:2] == [[f"rows in {CSV}", 30_227], ["images (patientIds)", 26_684]]
    assert m["counts"][-1] == ["planned", 26_684] and m["skipped"] == []  # none dropped as not frontal
    positives = sum(round(s["prevalence"]["Lung Opacity"] * s["samples"]) for s in m["splits"].values())
    assert positives == rows.loc[rows["Target"] == 1, "patientId"].nunique() == 6_012
    assert m["labels"] == ["Lung Opacity"] and m["label_set"] == "rsna"
    assert any("from 0 DICOM headers" in n and "26,684 images absent" in n for n in m["notes"])
    assert cpu < 5.0, f"planning took {cpu:.1f} s CPU ({wall:.1f} s wall) for 30,227 rows"


def shard_samples(shards: Path) -> list[dict]:
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as f:
            out += [json.load(f.extractfile(m)) for m in f.getmembers() if m.name.endswith(".json")]
    return out


@pytest.mark.slow
def test_rsna_shards_carry_boxes_train_and_evaluate(tmp_path):
    root, shards = synth_shards(tmp_path, n=200, raw_size=64, size=32, layout="rsna", name="rsna", workers=1,
                                samples_per_shard=40, min_shards=4)  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["label_set"] == "rsna" and manifest["counts"][-1] == ["packed", 200]
    rows = pd.read_csv(root / CSV)
    samples = shard_samples(shards)
    assert len(samples) == 200 and {s["view"] for s in samples} == {"AP", "PA"}
    positive = [s for s in samples if s["labels"] == [1.0]]
    assert len(positive) == rows.loc[rows["Target"] == 1, "patientId"].nunique() > 0
    # boxes: mapped from the 64 px file into the 32 px sample (halved), only on positives
    assert all(s.get("boxes") for s in positive) and not any("boxes" in s for s in samples if s["labels"] == [0.0])
    pid = rows.loc[rows["Target"] == 1, "patientId"].iloc[0]
    first = rows[rows["patientId"] == pid].iloc[0]
    box = next(s for s in positive if s["patient_id"] == pid)["boxes"][0]
    assert box == {"label": "Lung Opacity", "x": first.x / 2, "y": first.y / 2, "w": first.width / 2,
                   "h": first.height / 2}  # fmt: skip
    run = tmp_path / "run"
    in_process("train", "--shards", shards, "--out", run, "--backend", "single", "--max-steps", "3", *TINY, check=True)
    s = summary(run)
    assert s["status"] == "completed" and s["labels"] == "rsna"
    ev = in_process("eval", "--run", run, "--split", "test", "--checkpoint", "last")
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluated = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert list(evaluated["labels"]) == ["Lung Opacity"]
