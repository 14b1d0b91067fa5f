"""cxrdist.synth: real layouts and CSV formats, label statistics, DICOM variety, phantom findings."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist import imaging, synth
from cxrdist.labels import OBSERVATIONS

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices"
)
MIMIC_META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
MIMIC_LABEL_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
)
MIMIC_SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
LABEL_CELLS = {"1.0", "0.0", "-1.0", ""}


def first_line(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return f.readline().rstrip("\n")


def read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def frontal_contrast(img01: np.ndarray) -> float:
    """Spine/mediastinum minus lungs on a 64-px letterboxed phantom (anatomy ~53 px across, centred)."""
    x = imaging.fit_square(img01, 64)
    spine = x[22:34, 31:34].mean()
    lungs = np.concatenate([x[24:32, 18:24].ravel(), x[24:32, 41:47].ravel()]).mean()
    return float(spine - lungs)


# ------------------------------------------------------------------------------------------- chexpert


@pytest.fixture(scope="module")
def chexpert_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("chexpert")
    return synth.synthesize("chexpert", out, n=60, size=64, seed=3)


def test_chexpert_layout(chexpert_small):
    root = chexpert_small
    assert root.name == "CheXpert-v1.0-small"
    for name in ("train.csv", "valid.csv"):
        assert first_line(root / name) == CHEXPERT_HEADER
    train, valid = read_rows(root / "train.csv"), read_rows(root / "valid.csv")
    assert len(train) + len(valid) == 60 and len(valid) >= 1
    pat = re.compile(r"^CheXpert-v1\.0-small/(train|valid)/patient(\d{5})/study(\d+)/view(\d+)_(frontal|lateral)\.jpg$")
    for split, rows in (("train", train), ("valid", valid)):
        for r in rows:
            m = pat.match(r["Path"])
            assert m, r["Path"]
            assert m.group(1) == split
            assert (int(m.group(2)) >= 64541) == (split == "valid")
            assert m.group(5) == r["Frontal/Lateral"].lower()
            assert (root.parent / r["Path"]).is_file()
            assert r["Sex"] in ("Male", "Female", "Unknown")
            assert 18 <= int(r["Age"]) <= 90
            if r["Frontal/Lateral"] == "Frontal":
                assert r["AP/PA"] in ("AP", "PA", "LL", "RL")
            else:
                assert r["Frontal/Lateral"] == "Lateral" and r["AP/PA"] in ("", "LL", "RL")
            cells = [r[o] for o in OBSERVATIONS]
            if split == "valid":
                assert set(cells) <= {"0.0", "1.0"}
            else:
                assert set(cells) <= LABEL_CELLS
                assert r["No Finding"] in ("1.0", "")
    assert train[0]["Path"] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert valid[0]["Path"] == "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    with Image.open(root.parent / train[0]["Path"]) as im:
        assert im.mode == "L" and max(im.size) == 64


def test_deterministic(tmp_path, chexpert_small):
    again = synth.synthesize("chexpert", tmp_path / "a", n=60, size=64, seed=3)
    other = synth.synthesize("chexpert", tmp_path / "b", n=60, size=64, seed=4)
    assert (again / "train.csv").read_bytes() == (chexpert_small / "train.csv").read_bytes()
    rel = "train/patient00001/study1/view1_frontal.jpg"
    assert (again / rel).read_bytes() == (chexpert_small / rel).read_bytes()
    assert (other / "train.csv").read_bytes() != (chexpert_small / "train.csv").read_bytes()


# ----------------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def chexpert_2000(tmp_path_factory):
    root = synth.synthesize("chexpert", tmp_path_factory.mktemp("stats"), n=2000, size=32, seed=0)
    return pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")], ignore_index=True)


def test_label_fractions(chexpert_2000):
    df = chexpert_2000
    assert len(df) == 2000
    for name, (pos, unc) in synth.PREVALENCE.items():
        assert abs((df[name] == 1.0).mean() - pos) < 0.02, name
        assert abs((df[name] == -1.0).mean() - unc) < 0.02, name
    # blank is the most common cell, explicit negatives occur
    assert df["Pneumonia"].isna().mean() > 0.5 and (df["Pneumonia"] == 0.0).any()
    lateral = (df["Frontal/Lateral"] == "Lateral").mean()
    assert 0.08 < lateral < 0.22
    frontal = df[df["Frontal/Lateral"] == "Frontal"]
    assert 0.65 < (frontal["AP/PA"] == "AP").mean() < 0.85
    per_patient = df["Path"].str.extract(r"/(patient\d+)/")[0].value_counts().mean()
    assert 2.5 < per_patient < 4.5


def test_no_finding_exclusive_and_cooccurrence(chexpert_2000):
    df = chexpert_2000
    others = [o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices")]
    nf = df["No Finding"] == 1.0
    assert nf.sum() > 100
    assert not (df.loc[nf, others] == 1.0).any().any()
    assert not (df.loc[nf, others] == -1.0).any().any()
    assert (df.loc[nf, "Support Devices"] == 1.0).any()  # devices do not cancel No Finding
    edema = df["Edema"] == 1.0
    for other in ("Pleural Effusion", "Cardiomegaly"):
        assert (df.loc[edema, other] == 1.0).mean() > (df.loc[~edema, other] == 1.0).mean() + 0.1, other


# --------------------------------------------------------------------------------------------- mimic


@pytest.fixture(scope="module")
def mimic_jpg(tmp_path_factory):
    return synth.synthesize("mimic-jpg", tmp_path_factory.mktemp("mimicjpg"), n=60, size=64, seed=1)


@pytest.fixture(scope="module")
def mimic_dicom(tmp_path_factory):
    return synth.synthesize("mimic-dicom", tmp_path_factory.mktemp("mimicdcm"), n=60, size=64, seed=2)


@pytest.mark.parametrize("layout", ["mimic_jpg", "mimic_dicom"])
def test_mimic_layout(layout, request):
    root = request.getfixturevalue(layout)
    ext = "jpg" if layout == "mimic_jpg" else "dcm"
    meta_p, lab_p, split_p = (root / f"mimic-cxr-2.0.0-{k}.csv.gz" for k in ("metadata", "chexpert", "split"))
    assert first_line(meta_p) == MIMIC_META_HEADER
    assert first_line(lab_p) == MIMIC_LABEL_HEADER
    assert first_line(split_p) == MIMIC_SPLIT_HEADER
    meta, labels, split = read_rows(meta_p), read_rows(lab_p), read_rows(split_p)
    assert len(meta) == len(split) == 60
    studies = {(r["subject_id"], r["study_id"]) for r in meta}
    assert len(labels) == len(studies) == len({r["study_id"] for r in labels})  # one row per study
    assert {(r["subject_id"], r["study_id"]) for r in labels} == studies
    assert {r["split"] for r in split} <= {"train", "validate", "test"}
    by_subject = {}
    for r in split:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_subject.values())  # split by subject
    for r in labels:
        assert set(v for k, v in r.items() if k not in ("subject_id", "study_id")) <= LABEL_CELLS
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP"} & views and views <= {"PA", "AP", "LATERAL", "LL", "AP AXIAL", ""}
    for r in meta:
        assert DICOM_ID.match(r["dicom_id"])
        subj, study = r["subject_id"], r["study_id"]
        assert re.fullmatch(r"1\d{7}", subj) and re.fullmatch(r"5\d{7}", study)
        path = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{r['dicom_id']}.{ext}"
        assert path.is_file(), path
        if ext == "jpg":
            with Image.open(path) as im:
                assert (im.height, im.width) == (int(r["Rows"]), int(r["Columns"]))
        else:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert (ds.Rows, ds.Columns) == (int(r["Rows"]), int(r["Columns"]))


def test_mimic_label_fractions(tmp_path):
    root = synth.synthesize("mimic-jpg", tmp_path, n=3000, size=16, seed=5)
    df = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert len(df) > 1000
    for name, (pos, unc) in synth.PREVALENCE.items():
        assert abs((df[name] == 1.0).mean() - pos) < 0.02, name
        assert abs((df[name] == -1.0).mean() - unc) < 0.02, name


def test_mimic_dicom_variety_and_fake_phi(mimic_dicom):
    import pydicom

    meta = read_rows(mimic_dicom / "mimic-cxr-2.0.0-metadata.csv.gz")
    seen = {"pi": set(), "bits": set(), "ts": set(), "rescale": 0, "window": 0}
    contrast = {"MONOCHROME1": [], "MONOCHROME2": []}
    for r in meta:
        subj, study = r["subject_id"], r["study_id"]
        path = mimic_dicom / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}" / f"{r['dicom_id']}.dcm"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.MediaStorageSOPClassUID in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert str(ds.PatientName) == f"SYNTH^PATIENT^{subj}"
        assert ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber
        assert "SYNTH" in str(ds.InstitutionName) and "SYNTH" in str(ds.ReferringPhysicianName)
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
        seen["pi"].add(ds.PhotometricInterpretation)
        seen["bits"].add(int(ds.BitsStored))
        seen["ts"].add(str(ds.file_meta.TransferSyntaxUID))
        seen["rescale"] += "RescaleSlope" in ds
        seen["window"] += "WindowCenter" in ds
        assert int(ds.pixel_array.max()) < 2 ** int(ds.BitsStored)
        if r["ViewPosition"] in ("PA", "AP"):
            contrast[ds.PhotometricInterpretation].append(frontal_contrast(imaging.read_dicom(path)))
    assert seen["pi"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["bits"] == {12, 14, 15, 16}
    assert seen["ts"] == set(synth.DICOM_SYNTAXES.values())
    assert 0 < seen["rescale"] < len(meta) and len(meta) / 2 < seen["window"] < len(meta)
    for pi, values in contrast.items():  # both photometrics render bone bright, lungs dark
        assert len(values) >= 3, pi
        assert min(values) > 0.2, (pi, values)


def test_same_phantom_same_pixels_whatever_the_encoding(tmp_path):
    img = synth.draw_frontal(np.random.default_rng(7), 96, 80, {"Pleural Effusion": 1.0})
    variants = [
        dict(photometric="MONOCHROME1", bits=12, syntax="j2k", rescale=None, window=True),
        dict(photometric="MONOCHROME2", bits=16, syntax="rle", rescale=(0.5, 0.0), window=True),
        dict(photometric="MONOCHROME1", bits=15, syntax="jls", rescale=(1.0, -1024.0), window=True),
        dict(photometric="MONOCHROME2", bits=14, syntax="explicit", rescale=None, window=True),
    ]
    for i, kw in enumerate(variants):
        path = tmp_path / f"{i}.dcm"
        synth.write_dicom(path, img, uid_seed=str(i), **kw)
        back = imaging.read_dicom(path)
        assert back.shape == img.shape
        assert np.abs(back - img).max() < 2.0 / 2**12, kw
    # without a window the reader stretches percentiles: still the same way round
    synth.write_dicom(tmp_path / "nowin.dcm", img, photometric="MONOCHROME1", bits=12, window=False)
    assert frontal_contrast(imaging.read_dicom(tmp_path / "nowin.dcm")) > 0.3
    assert np.corrcoef(imaging.read_dicom(tmp_path / "nowin.dcm").ravel(), img.ravel())[0, 1] > 0.99


# ------------------------------------------------------------------------------------------- phantom


@pytest.mark.parametrize("finding", [o for o in OBSERVATIONS if o != "No Finding"])
def test_each_finding_is_visible_at_64px(finding):
    """Drawn on the same patient, every finding changes the 64-px image clearly; half strength less so."""
    diffs = []
    for seed in range(4):
        base = synth.draw_frontal(np.random.default_rng(seed), 128, 108, {}, finding_rng=np.random.default_rng(0))
        full = synth.draw_frontal(
            np.random.default_rng(seed), 128, 108, {finding: 1.0}, finding_rng=np.random.default_rng(seed + 100)
        )
        half = synth.draw_frontal(
            np.random.default_rng(seed), 128, 108, {finding: 0.5}, finding_rng=np.random.default_rng(seed + 100)
        )
        d_full = np.abs(imaging.fit_square(full, 64) - imaging.fit_square(base, 64))
        d_half = np.abs(imaging.fit_square(half, 64) - imaging.fit_square(base, 64))
        assert d_full.max() > 0.25, (finding, seed)
        assert (d_full > 0.1).sum() >= 6, (finding, seed)
        diffs.append((d_full.sum(), d_half.sum()))
    assert all(h < f for f, h in diffs)


def test_cardiomegaly_heart_at_least_1_5x_wider():
    def heart_width(findings):
        img = synth.draw_frontal(np.random.default_rng(11), 256, 256, findings, finding_rng=np.random.default_rng(1))
        row = img[int(256 * 0.64)]  # heart level: the bright run around the midline, bounded by both lungs
        left = right = 128
        while row[left - 1] > 0.5:
            left -= 1
        while row[right + 1] > 0.5:
            right += 1
        return right - left

    assert heart_width({"Cardiomegaly": 1.0}) >= 1.5 * heart_width({})


def test_lateral_and_jpeg_pipeline(chexpert_small):
    rows = read_rows(chexpert_small / "train.csv")
    lat = [r for r in rows if r["Frontal/Lateral"] == "Lateral"]
    fr = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    assert lat and fr
    x = imaging.load_for_model(chexpert_small.parent / fr[0]["Path"], 64)
    assert x.dtype == np.uint8 and x.shape == (64, 64)
    assert frontal_contrast(imaging.read_image(chexpert_small.parent / fr[0]["Path"])) > 0.3
