"""The MIMIC-CXR layout: ``mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz`` +
``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.{jpg,dcm}``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrdist.labels import OBSERVATIONS
from cxrdist.synth.common import _canvas, _rng, _save_jpg, _study_images, _write_csv
from cxrdist.synth.dicom import _encodable_syntaxes, write_dicom
from cxrdist.synth.labels import (
    _cells,
    _strengths,
    sample_labels,
)
from cxrdist.synth.phantom import draw_frontal, draw_lateral

MIMIC_METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_LABELS = sorted(OBSERVATIONS)  # MIMIC's chexpert.csv lists the observations alphabetically
MIMIC_PREFIX = "mimic-cxr-2.0.0-"


_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "AP AXIAL": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "": "",
}


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(rng.bytes(4).hex() for _ in range(5))


def synth_mimic(out: Path, n: int, size: int, seed: int, ext: str) -> Path:
    rng = _rng(seed, 11)
    subjects: list[int] = []
    studies = []  # (subject, study_id, n_images)
    count = 0
    used_subjects, used_studies, used_dicoms = set(), set(), set()
    while count < n:
        subj = int(rng.integers(10_000_000, 20_000_000))
        if subj in used_subjects:
            continue
        used_subjects.add(subj)
        subjects.append(subj)
        for _ in range(int(rng.choice([1, 2, 3, 4, 5, 6], p=(0.3, 0.2, 0.15, 0.15, 0.1, 0.1)))):
            if count >= n:
                break
            study = int(rng.integers(50_000_000, 60_000_000))
            while study in used_studies:
                study = int(rng.integers(50_000_000, 60_000_000))
            used_studies.add(study)
            k = min(_study_images(rng, (0.45, 0.45, 0.10)), n - count)
            studies.append((subj, study, k))
            count += k
    # split by subject: ~98 / 1 / 1, at least one subject each when there are 3 or more
    order = rng.permutation(len(subjects))
    n_small = max(1, int(round(0.01 * len(subjects)))) if len(subjects) >= 3 else 0
    split_of = {s: "train" for s in subjects}
    for j in order[:n_small]:
        split_of[subjects[j]] = "validate"
    for j in order[n_small : 2 * n_small]:
        split_of[subjects[j]] = "test"

    states = sample_labels(rng, len(studies))
    cell_rng = _rng(seed, 12)
    label_rows, meta_rows, split_rows = [], [], []
    encodable = _encodable_syntaxes() if ext == "dcm" else []
    img_i = 0
    for si, (subj, study, k) in enumerate(studies):
        cells = _cells(states[si : si + 1], cell_rng)[0]
        by_name = dict(zip(OBSERVATIONS, cells))
        label_rows.append([subj, study, *[by_name[o] for o in MIMIC_LABELS]])
        study_rng = _rng(seed, 13, si)
        strengths = _strengths(states[si], study_rng)
        year = 2110 + int(study_rng.integers(0, 90))
        date = f"{year}{int(study_rng.integers(1, 13)):02d}{int(study_rng.integers(1, 29)):02d}"
        time_ = (
            f"{int(study_rng.integers(0, 24)):02d}{int(study_rng.integers(0, 60)):02d}"
            f"{int(study_rng.integers(0, 60)):02d}.{int(study_rng.integers(0, 1000)):03d}"
        )
        portable = study_rng.random() < 0.55
        for j in range(k):
            img_rng = _rng(seed, 14, img_i)
            img_i += 1
            u = img_rng.random()
            if j == 0:
                view = ("AP" if portable else "PA") if u < 0.95 else ("AP AXIAL" if u < 0.975 else "")
            else:
                view = "LATERAL" if u < 0.75 else ("LL" if u < 0.9 else ("AP" if portable else "PA"))
            lateral = view in ("LATERAL", "LL")
            proc = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
            orient = "" if img_rng.random() < 0.05 else ("Recumbent" if portable and not lateral else "Erect")
            h, w = _canvas(img_rng, size, landscape=(view == "AP" and img_rng.random() < 0.2))
            if lateral:
                img = draw_lateral(img_rng, h, w)
            else:
                img = draw_frontal(img_rng, h, w, strengths, finding_rng=_rng(seed, 15, si))
            did = _dicom_id(img_rng)
            while did in used_dicoms:
                did = _dicom_id(img_rng)
            used_dicoms.add(did)
            folder = out / "files" / f"p{str(subj)[:2]}" / f"p{subj}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            if ext == "jpg":
                _save_jpg(folder / f"{did}.jpg", img)
            else:
                _write_mimic_dicom(
                    folder / f"{did}.dcm", img, img_rng, encodable, did, view, subj, study, date, time_.split(".")[0]
                )
            meta_rows.append([did, subj, study, proc, view, h, w, date, time_, proc, _VIEW_MEANING[view], orient])
            split_rows.append([did, study, subj, split_of[subj]])
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / f"{MIMIC_PREFIX}metadata.csv.gz", MIMIC_METADATA_COLUMNS, meta_rows, gz=True)
    _write_csv(out / f"{MIMIC_PREFIX}chexpert.csv.gz", ["subject_id", "study_id", *MIMIC_LABELS], label_rows, gz=True)
    _write_csv(
        out / f"{MIMIC_PREFIX}split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True
    )
    return out


def _write_mimic_dicom(path, img, rng, encodable, did, view, subj, study, date, time_) -> None:
    """One MIMIC-like DICOM with a random mix of photometric, bit depth, rescale, window and syntax."""
    photometric = "MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2"
    bits = int(rng.choice([12, 14, 15, 16]))
    u = rng.random()
    rescale = None if u < 0.6 else ((1.0, -1024.0) if u < 0.8 else (0.5, 0.0))
    window = rng.random() < 0.8
    syntax = str(rng.choice(encodable))
    write_dicom(
        path,
        img,
        photometric=photometric,
        bits=bits,
        syntax=syntax,
        rescale=rescale,
        window=window,
        uid_seed=did,
        modality="DX" if rng.random() < 0.7 else "CR",
        view=view,
        subject_id=subj,
        study_id=study,
        study_date=date,
        study_time=time_,
    )
