"""Packing real images into WebDataset shards: names, sample contents, the manifest, verify, skipped images,
--strict, resume after a crash, tampering, --dry-run, and no PHI from DICOM headers in any shard."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdist.errors import UserError
from cxrdist.labels import OBSERVATIONS
from cxrdist.shards.manifest import (
    ManifestError,
    load_manifest,
    read_manifest,
    shard_paths,
    split_samples,
    write_manifest,
)
from cxrdist.shards.pack import n_shards, pack, plan_shards
from cxrdist.shards.verify import verify
from cxrdist.sources import build_table

SHARD_RE = r"^(train|val|test)-\d{6}\.tar$"
SAMPLE_FIELDS = {"labels", "mask", "patient_id", "study_id", "view", "sex", "age", "source"}
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
PACK = dict(
    size=32,
    encoding="jpg",
    views="frontal",
    policy="u-ignore",
    split="patient",
    samples_per_shard=6,
    min_shards=2,
    seed=0,
)


def _jpeg(rng, h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    img = (128 + 60 * np.sin(x / 5.0 + rng.random() * 6) + rng.normal(0, 20, (h, w))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_chexpert(root: Path, patients: int = 16, seed: int = 0) -> dict:
    """A CheXpert-v1.0-small layout with real JPEGs: 3 frontal + 1 lateral per patient in train, a valid.csv;
    one frontal JPEG truncated (unusable). Returns facts the tests check."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = {"train": [], "valid": []}
    for p in range(1, patients + 1):
        split = "valid" if p > patients - 2 else "train"
        pid = f"patient{p + (64540 if split == 'valid' else 0):05d}"
        for s, (fname, fl, appa) in enumerate(
            [
                ("view1_frontal", "Frontal", "AP"),
                ("view1_frontal", "Frontal", "PA"),
                ("view2_lateral", "Lateral", ""),
                ("view1_frontal", "Frontal", "AP"),
            ]
        ):
            rel = f"{split}/{pid}/study{s + 1}/{fname}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_jpeg(rng, int(rng.integers(40, 72)), int(rng.integers(40, 72))))
            cells = rng.choice(["1.0", "0.0", "-1.0", ""], size=14, p=[0.3, 0.3, 0.1, 0.3])
            cells[0] = "1.0" if cells[0] == "1.0" else ""
            if split == "valid":
                cells = np.where(cells == "-1.0", "0.0", np.where(cells == "", "0.0", cells))
            rows[split].append([f"CheXpert-v1.0-small/{rel}", "Female" if p % 2 else "Male", 20 + p, fl, appa, *cells])
    for split, data in rows.items():
        pd.DataFrame(data, columns=HEADER).to_csv(root / f"{split}.csv", index=False)
    truncated = "train/patient00003/study1/view1_frontal.jpg"
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 3])
    return {"root": root, "truncated": truncated, "frontal": patients * 3}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return make_chexpert(tmp_path_factory.mktemp("cx") / "CheXpert-v1.0-small")


@pytest.fixture(scope="module")
def packed(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("packed") / "shards"
    m = pack("chexpert", dataset["root"], out, workers=2, **PACK)  # the multi-process path
    return {"out": out, "manifest": m}


def members(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return [m.name for m in tf.getmembers()]


def read_samples(tar: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


# --- the plan -------------------------------------------------------------------------------------------
def test_shard_count_formula():
    assert n_shards(0, 1000, 128) == 0
    assert n_shards(5, 1000, 128) == 5  # one sample per shard rather than empty shards
    assert n_shards(500, 1000, 128) == 128  # enough shards for 64 GPUs x 2 loader workers
    assert n_shards(200_000, 1000, 128) == 200
    assert n_shards(1001, 1000, 1) == 2


def test_plan_is_deterministic_and_partitions_each_split(dataset):
    t = build_table("chexpert", dataset["root"], views="frontal", seed=0)
    a = plan_shards(t.df, seed=0, samples_per_shard=6, min_shards=2)
    b = plan_shards(
        t.df.sample(frac=1, random_state=1).reset_index(drop=True), seed=0, samples_per_shard=6, min_shards=2
    )
    keys = t.df["key"].to_numpy()
    # the same shards with the same keys in the same order, whatever the row order of the table
    kb = t.df.sample(frac=1, random_state=1).reset_index(drop=True)["key"].to_numpy()
    assert [(n, list(keys[r])) for _, n, r in a] == [(n, list(kb[r])) for _, n, r in b]
    for split in ("train", "val", "test"):
        rows = np.concatenate([r for s, _, r in a if s == split])
        assert sorted(rows) == sorted(np.flatnonzero(t.df["split"] == split))
        sizes = [len(r) for s, _, r in a if s == split]
        assert max(sizes) <= 6 and max(sizes) - min(sizes) <= 1
        assert len(sizes) == n_shards(len(rows), 6, 2)
    c = plan_shards(t.df, seed=1, samples_per_shard=6, min_shards=2)
    assert [list(keys[r]) for _, _, r in a] != [list(keys[r]) for _, _, r in c]


# --- a pack run -----------------------------------------------------------------------------------------
def test_shard_names_manifest_fields_and_verify(dataset, packed):
    out, m = packed["out"], packed["manifest"]
    assert m == json.loads((out / "manifest.json").read_text())
    tars = sorted(p.name for p in out.glob("*.tar"))
    import re

    assert tars and all(re.match(SHARD_RE, n) for n in tars)
    listed = [s["name"] for sp in ("train", "val", "test") for s in m["splits"][sp]["shards"]]
    assert sorted(listed) == tars
    for split in ("train", "val", "test"):
        names = [s["name"] for s in m["splits"][split]["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
    for field in (
        "version",
        "source",
        "root",
        "labels",
        "policy",
        "split",
        "views",
        "size",
        "encoding",
        "counts",
        "splits",
        "skipped",
    ):
        assert field in m, field
    assert (m["source"], m["policy"], m["split"], m["views"], m["size"], m["encoding"]) == (
        "chexpert",
        "u-ignore",
        "patient",
        "frontal",
        32,
        "jpg",
    )
    assert Path(m["root"]).is_absolute() and Path(m["root"]) == dataset["root"].resolve()
    assert m["labels"] == list(OBSERVATIONS) and m["dry_run"] is False
    steps = [s for s, _ in m["counts"]]
    assert steps[0] == "rows in train.csv + valid.csv" and steps[-1] == "packed"
    assert dict(m["counts"])["frontal views (PA, AP)"] == dataset["frontal"]
    assert dict(m["counts"])["packed"] == dataset["frontal"] - 1  # the truncated JPEG
    total = 0
    for split in ("train", "val", "test"):
        s = m["splits"][split]
        assert s["samples"] == sum(x["samples"] for x in s["shards"]) > 0
        assert set(s["prevalence"]) == set(OBSERVATIONS)
        assert all(v is None or 0 <= v <= 1 for v in s["prevalence"].values())
        assert 0 < s["patients"] <= s["samples"]
        assert all(len(x["sha256"]) == 64 and x["bytes"] == (out / x["name"]).stat().st_size for x in s["shards"])
        total += s["samples"]
        assert split_samples(m, split) == s["samples"]
        assert [p.name for p in shard_paths(m, out, split)] == [x["name"] for x in s["shards"]]
    assert total == dataset["frontal"] - 1
    assert verify(out) == []
    assert load_manifest(out)["version"] == m["version"]
    assert not list(out.glob("*.partial"))


def test_samples_hold_an_image_and_the_json_fields_only(dataset, packed):
    out = packed["out"]
    t = build_table("chexpert", dataset["root"], views="frontal", policy="u-ignore", seed=0)
    by_key = t.df.set_index("key")
    seen = set()
    for tar in sorted(out.glob("*.tar")):
        names = members(tar)
        samples = read_samples(tar)
        assert len(names) == 2 * len(samples)
        for key, files in samples.items():
            assert set(files) == {"jpg", "json"}, (tar.name, key, set(files))
            assert key not in seen
            seen.add(key)
            meta = json.loads(files["json"])
            assert set(meta) == SAMPLE_FIELDS
            r = by_key.loc[key]
            assert meta["labels"] == [float(r[o]) for o in OBSERVATIONS]
            assert meta["mask"] == [int(r[f"mask:{o}"]) for o in OBSERVATIONS]
            assert (meta["patient_id"], meta["study_id"], meta["view"], meta["sex"], meta["source"]) == (
                r["patient_id"],
                r["study_id"],
                r["view"],
                r["sex"],
                r["path"],
            )
            assert meta["age"] == r["age"]
            assert tar.name.split("-")[0] == r["split"]
            img = Image.open(io.BytesIO(files["jpg"]))
            assert img.size == (32, 32) and img.mode == "L"
    truncated_key = dataset["truncated"].split("/", 1)[1].rsplit(".", 1)[0].replace("/", "_")
    assert seen == set(t.df["key"]) - {truncated_key}


def test_unusable_image_is_skipped_and_strict_fails(dataset, packed, tmp_path):
    m = packed["manifest"]
    hits = [s for s in m["skipped"] if s["source"] == dataset["truncated"]]
    assert len(hits) == 1 and hits[0]["reason"]
    out = tmp_path / "strict"
    with pytest.raises(UserError, match=r"--strict: 1 input row\(s\) skipped .*patient00003/study1/view1_frontal"):
        pack("chexpert", dataset["root"], out, workers=1, strict=True, **PACK)
    again = read_manifest(out)  # written before failing: nothing is lost
    assert [s["source"] for s in again["skipped"]] == [dataset["truncated"]]


def test_resume_repacks_only_the_missing_shard(packed, dataset, tmp_path):
    out = copy_dir(packed["out"], tmp_path / "resume")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    victim = sorted(before)[1]
    (out / victim).unlink()
    leftover = sorted(before)[2]
    (out / (leftover + ".partial")).write_bytes(b"half a shard")
    m = pack("chexpert", dataset["root"], out, workers=1, **PACK)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert set(after) == set(before)
    assert after[victim] != before[victim]
    unchanged = {n for n in before if n != victim}
    assert all(after[n] == before[n] for n in unchanged), "an intact shard was re-written"
    assert not list(out.glob("*.partial"))
    assert m["splits"] == packed["manifest"]["splits"]  # the same bytes: deterministic shards
    assert verify(out) == []


def test_resume_repacks_a_shard_whose_bytes_changed(packed, dataset, tmp_path):
    out = copy_dir(packed["out"], tmp_path / "resume2")
    victim = sorted(out.glob("train-*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    pack("chexpert", dataset["root"], out, workers=1, **PACK)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after[victim.name] != before[victim.name]
    assert all(after[n] == before[n] for n in before if n != victim.name)
    assert verify(out) == []


def test_a_changed_plan_repacks_and_removes_stale_shards(packed, dataset, tmp_path):
    out = copy_dir(packed["out"], tmp_path / "replan")
    m = pack("chexpert", dataset["root"], out, workers=1, **{**PACK, "min_shards": 1, "samples_per_shard": 100})
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert m["splits"]["train"]["samples"] == packed["manifest"]["splits"]["train"]["samples"]
    assert verify(out) == []


def test_verify_names_each_problem_shard(packed, tmp_path):
    out = copy_dir(packed["out"], tmp_path / "tamper")
    train = sorted(out.glob("train-*.tar"))
    data = bytearray(train[0].read_bytes())
    data[600] ^= 0x01  # inside the first member's data
    train[0].write_bytes(bytes(data))
    train[1].unlink()
    val = sorted(out.glob("val-*.tar"))[0]
    val.write_bytes(val.read_bytes()[:700])  # truncated
    shutil.copy(sorted(out.glob("test-*.tar"))[0], out / "test-000999.tar")
    problems = verify(out)
    text = "\n".join(problems)
    assert f"{train[0].name}: sha256 mismatch" in problems
    assert f"{train[1].name}: missing" in problems
    assert any(
        p.startswith(f"{val.name}: ") and ("unreadable tar" in p or "samples, manifest says" in p) for p in problems
    ), text
    assert f"{val.name}: sha256 mismatch" in problems
    assert "test-000999.tar: on disk but not in the manifest" in problems
    assert all(p.split(":")[0] in {train[0].name, train[1].name, val.name, "test-000999.tar"} for p in problems), text
    with pytest.raises(ManifestError, match=f"shard {train[1].name} is listed in manifest.json but missing"):
        load_manifest(out)


def test_verify_counts_samples_against_the_manifest(packed, tmp_path):
    out = copy_dir(packed["out"], tmp_path / "recount")
    m = read_manifest(out)
    shard = m["splits"]["test"]["shards"][0]
    shard["samples"] += 1
    m["splits"]["test"]["samples"] += 1
    write_manifest(out, m)
    assert verify(out) == [f"{shard['name']}: {shard['samples'] - 1} samples, manifest says {shard['samples']}"]


# --- dry run --------------------------------------------------------------------------------------------
def test_dry_run_reads_no_image(dataset, packed, tmp_path):
    csv_only = tmp_path / "CheXpert-v1.0-small"
    csv_only.mkdir()
    for name in ("train.csv", "valid.csv"):
        shutil.copy(dataset["root"] / name, csv_only / name)  # no image files at all
    out = tmp_path / "dry"
    m = pack("chexpert", csv_only, out, workers=2, dry_run=True, **PACK)
    assert m["dry_run"] is True and not list(out.glob("*.tar")) and not list(out.glob("*.partial"))
    assert json.loads((out / "manifest.json").read_text()) == m
    assert dict(m["counts"])["planned"] == dataset["frontal"]  # nothing failed: nothing was read
    real = packed["manifest"]
    for split in ("train", "val", "test"):
        assert [s["name"] for s in m["splits"][split]["shards"]] == [s["name"] for s in real["splits"][split]["shards"]]
        assert all(s["bytes"] is None and s["sha256"] is None for s in m["splits"][split]["shards"])
    with pytest.raises(ManifestError, match="--dry-run"):
        load_manifest(out)
    # a dry run next to real shards leaves their manifest alone
    real_dir = copy_dir(packed["out"], tmp_path / "real")
    pack("chexpert", dataset["root"], real_dir, workers=1, dry_run=True, **PACK)
    assert json.loads((real_dir / "manifest.json").read_text()) == real
    assert json.loads((real_dir / "manifest.dry-run.json").read_text())["dry_run"] is True
    assert verify(real_dir) == []


# --- load_manifest --------------------------------------------------------------------------------------
def test_load_manifest_errors(packed, tmp_path):
    with pytest.raises(ManifestError, match="no such shard folder"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"no manifest\.json.*run `cxrdist shard"):
        load_manifest(tmp_path / "empty")
    out = copy_dir(packed["out"], tmp_path / "emptysplit")
    m = read_manifest(out)
    m["splits"]["val"]["samples"] = 0
    m["splits"]["val"]["shards"] = []
    write_manifest(out, m)
    with pytest.raises(ManifestError, match="split 'val' is empty"):
        load_manifest(out)
    assert load_manifest(out, splits=("train",))["splits"]["val"]["samples"] == 0
    assert issubclass(ManifestError, UserError)


# --- DICOM input: nothing but pixels and the JSON fields reaches a shard ------------------------------
PHI = {
    "PatientName": "Doe^Jane^PHINAMEQX",
    "PatientID": "PHIMRN99887766",
    "PatientBirthDate": "19230405",
    "InstitutionName": "PHI General Hospital QX",
    "ReferringPhysicianName": "House^Greg^PHIDOCQX",
    "AccessionNumber": "PHIACC5566",
    "PatientAddress": "12 PHI Street QX",
}


def write_dicom(path: Path, pixels: np.ndarray, phi: dict) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for k, v in phi.items():
        setattr(ds, k, v)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_mimic_dicom(root: Path, n_subjects: int = 12) -> Path:
    rng = np.random.default_rng(1)
    meta, labels, split = [], [], []
    for i in range(n_subjects):
        subject, study = f"1{i:07d}", f"5{i:07d}"
        for j in range(2):
            dicom_id = f"{i:08x}-{j:08x}-abcdef01-23456789-0badcafe"
            h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
            px = (rng.random((h, w)) * 4095).astype(np.uint16)
            write_dicom(root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.dcm", px, PHI)
            meta.append(
                {"dicom_id": dicom_id, "subject_id": subject, "study_id": study, "ViewPosition": "PA" if j else "AP"}
            )
            split.append({"dicom_id": dicom_id, "study_id": study, "subject_id": subject, "split": "train"})
        labels.append(
            {
                "subject_id": subject,
                "study_id": study,
                **{o: rng.choice(["1.0", "0.0", "-1.0", ""]) for o in sorted(OBSERVATIONS)},
            }
        )
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    return root


def test_no_phi_from_dicom_headers_reaches_a_shard(tmp_path):
    root = make_mimic_dicom(tmp_path / "mimic")
    sample = next(root.rglob("*.dcm")).read_bytes()
    assert all(v.encode() in sample for v in PHI.values())  # the PHI really is in the input
    out = tmp_path / "shards"
    m = pack("mimic", root, out, size=32, encoding="png16", workers=1, samples_per_shard=50, min_shards=1, strict=True)
    assert dict(m["counts"])["packed"] == 24 and m["skipped"] == []
    assert verify(out) == []
    blob = b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))
    blob += (out / "manifest.json").read_bytes()
    # every planted value and its distinctive parts (>= 6 bytes: shorter ones occur by chance in pixel data)
    needles = {v.encode() for v in PHI.values()} | {
        p.encode() for v in PHI.values() for p in v.split("^") if len(p) >= 6
    }
    needles |= {b"Patient", b"Institution", b"DICM", b"1.2.840.10008"}  # DICOM tags / preamble / UIDs
    leaked = [n for n in needles if n in blob]
    assert not leaked, f"PHI bytes in shards: {leaked}"
    for tar in out.glob("*.tar"):
        for files in read_samples(tar).values():
            assert set(files) == {"png", "json"}
            assert set(json.loads(files["json"])) == SAMPLE_FIELDS
            img = Image.open(io.BytesIO(files["png"]))
            assert img.size == (32, 32) and img.mode.startswith("I")  # 16-bit grey
