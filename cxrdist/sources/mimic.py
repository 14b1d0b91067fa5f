"""MIMIC-CXR-JPG 2.0.0 and MIMIC-CXR (DICOM): the same layout, ``.jpg`` or ``.dcm`` images.

``root`` holds ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (one row per image), ``mimic-cxr-2.0.0-chexpert.csv[.gz]``
(one row per *study*, labels in alphabetical order: mapped by name) and ``mimic-cxr-2.0.0-split.csv[.gz]``
(only needed for ``split="official"``). Images live at
``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.{jpg|dcm}``; key = dicom_id. These CSVs
carry no sex or age (they are in MIMIC-IV's patients table): sex is ``U`` and age NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import OBSERVATIONS
from cxrdist.sources.registry import Source, register
from cxrdist.sources.table import RawRows, clean_small, read_csv_checked, strings

PREFIX = "mimic-cxr-2.0.0-"
META_REQUIRED = ("dicom_id", "subject_id", "study_id", "ViewPosition")
LABELS_REQUIRED = ("subject_id", "study_id") + OBSERVATIONS
SPLIT_REQUIRED = ("dicom_id", "split")
SPLIT_MAP = {"train": "train", "validate": "val", "val": "val", "test": "test"}
IMAGE_EXTS = ("jpg", "dcm")
PROBE_ROWS = 20


def find_csv(root: Path, stem: str) -> Path:
    for ext in (".csv", ".csv.gz"):
        p = root / f"{PREFIX}{stem}{ext}"
        if p.is_file():
            return p
    raise UserError(
        f"{root}: no {PREFIX}{stem}.csv or .csv.gz: the MIMIC-CXR root is the folder holding "
        f"files/ and the {PREFIX}*.csv files"
    )


def _detect_ext(root: Path, stems: pd.Series, image_ext: str | None, notes: list[str]) -> str:
    if image_ext is not None:
        ext = str(image_ext).lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise UserError(f"image_ext {image_ext!r}: choose one of {', '.join(IMAGE_EXTS)}")
        return ext
    for stem in stems[:PROBE_ROWS]:
        for ext in IMAGE_EXTS:
            if (root / f"{stem}.{ext}").is_file():
                notes.append(f"image extension .{ext} detected from {stem}.{ext}")
                return ext
    notes.append(f"no image found for the first {PROBE_ROWS} rows; assuming .jpg")
    return "jpg"


def read_mimic(root: Path, *, official: bool = False, image_ext: str | None = None) -> RawRows:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    meta_path, labels_path = find_csv(root, "metadata"), find_csv(root, "chexpert")
    split_path = find_csv(root, "split") if official else None
    skipped: list[dict] = []
    notes: list[str] = []

    meta, lines, bad = read_csv_checked(meta_path, META_REQUIRED, text=META_REQUIRED)
    skipped += bad
    counts = [(f"images in {meta_path.name}", len(meta) + len(bad))]
    dicom, subject, study = strings(meta["dicom_id"]), strings(meta["subject_id"]), strings(meta["study_id"])
    ok = (dicom != "") & (np.strings.str_len(subject) >= 2) & (study != "")
    if not ok.all():
        for i in np.flatnonzero(~ok):
            skipped.append(
                {
                    "source": f"{meta_path.name}:{lines[i]}",
                    "reason": "unreadable row: missing dicom_id, subject_id or study_id",
                }
            )
        meta = meta.loc[ok].reset_index(drop=True)
        dicom, subject, study = dicom[ok], subject[ok], study[ok]
    add = np.strings.add
    stem = add(
        add(add(add(add(add(add("files/p", np.strings.slice(subject, 0, 2)), "/p"), subject), "/s"), study), "/"), dicom
    )
    ext = _detect_ext(root, stem, image_ext, notes)
    path = add(stem, "." + ext).astype(object)
    study = study.astype(object)

    # labels: one row per study; the first row of a repeated study wins
    lab, lab_lines, bad = read_csv_checked(labels_path, LABELS_REQUIRED, text=("subject_id", "study_id"))
    skipped += bad
    lab["study_id"] = strings(lab["study_id"]).astype(object)
    lab["_lsrc"] = [f"{labels_path.name}:{n}" for n in lab_lines]
    dup = lab["study_id"].duplicated(keep="first").to_numpy()
    if dup.any():
        first = lab.loc[~dup].set_index("study_id")["_lsrc"]
        for i in np.flatnonzero(dup):
            sid = lab.at[i, "study_id"]
            skipped.append(
                {"source": lab.at[i, "_lsrc"], "reason": f"duplicate labels for study {sid} (first at {first[sid]})"}
            )
        lab = lab.loc[~dup]
    lab = lab.set_index("study_id")[list(OBSERVATIONS) + ["_lsrc"]]

    out = pd.DataFrame(
        {
            "key": dicom.astype(object),
            "path": path,
            "patient_id": subject.astype(object),
            "study_id": study,
            "view": clean_small(meta["ViewPosition"], upper=True),
            "sex": np.full(len(meta), "U", dtype=object),
            "age": np.full(len(meta), np.nan),
        }
    )
    joined = lab.reindex(study)
    for name in OBSERVATIONS:
        out[name] = joined[name].to_numpy()
    out["_file"], out["_line"] = path, 0
    out["_lsrc"] = joined["_lsrc"].to_numpy(object)
    has = pd.Index(lab.index).get_indexer(study) >= 0
    for i in np.flatnonzero(~has):
        skipped.append({"source": path[i], "reason": "no labels for study"})
    out = out.loc[has].reset_index(drop=True)

    note = ""
    if official:
        sp, _, bad = read_csv_checked(split_path, SPLIT_REQUIRED, text=SPLIT_REQUIRED)
        skipped += bad
        names = pd.Series(clean_small(sp["split"])).str.lower().map(SPLIT_MAP).to_numpy(object)
        sp = pd.Series(names, index=strings(sp["dicom_id"]).astype(object))
        sp = sp[~sp.index.duplicated(keep="first")]
        off = sp.reindex(out["key"].to_numpy()).to_numpy(object)
        has = pd.notna(off)
        for i in np.flatnonzero(~has):
            skipped.append({"source": out.at[i, "_file"], "reason": f"not in {split_path.name} (or unknown split)"})
        out["_official"] = off
        out = out.loc[has].reset_index(drop=True)
        note = f"official: {split_path.name} (train/validate/test -> train/val/test)"
    return RawRows(df=out, counts=counts, skipped=skipped, labels=OBSERVATIONS, notes=notes, official_note=note)


register(
    Source(
        name="mimic",
        labels=OBSERVATIONS,
        read=read_mimic,
        root=f"the folder holding files/ and the {PREFIX}metadata/chexpert/split .csv[.gz] files",
        official=f"{PREFIX}split.csv's train/validate/test",
        synth_layouts=("mimic-jpg", "mimic-dicom"),
    )
)
