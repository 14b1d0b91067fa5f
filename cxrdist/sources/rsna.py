"""RSNA Pneumonia Detection Challenge (2018), stage 2: ``stage_2_train_labels.csv`` and its DICOMs.

``--root`` holds ``stage_2_train_labels.csv`` (header ``patientId,x,y,width,height,Target``) and
``stage_2_train_images/<patientId>.dcm``. The CSV's 30,227 rows describe 26,684 images: a positive image
(Target 1: "lung opacity suspicious for pneumonia", 6,012 images) has one row per box, ``x,y,width,height``
floats in the image's 1024 x 1024 pixel frame (x, y: the top-left corner); a negative (Target 0) has one row
with x, y, width and height empty. The rows of one image are adjacent. ``stage_2_detailed_class_info.csv``
(Lung Opacity / No Lung Opacity / Not Normal / Normal, one row per labels row) is not read: its Lung Opacity
is Target 1.

Checked per row: a non-empty patientId, Target 0 or 1, a box on every Target 1 row and none on a Target 0
row, a box of positive width and height inside the image (the header's Columns x Rows, else 1024 x 1024);
per image: its rows agree on Target. An image with a failing row is skipped whole (its boxes would be
incomplete, or its label unknown): each failing row is listed (``file:line``, reason).

Label set ``labels.RSNA`` = ("Lung Opacity",): the Target, named as CheXpert's Lung Opacity, which it matches
by name. NIH's nearest is Pneumonia (RSNA's images are NIH ChestX-ray14's, their Target made by re-reading
NIH's pneumonia-related findings), which is not the same finding: ``labels.NEAREST`` pairs the two for
``eval --map-labels`` between an RSNA and an NIH label set only, never CheXpert with NIH.

The view, age and sex are only in the DICOM headers (the real files: 1024 x 1024 MONOCHROME2 8-bit;
ViewPosition AP or PA, PatientAge a bare '51' where DICOM writes '051Y' (a handful over 100 are the
set's own errors, kept), PatientSex M or F). Each file present under ``stage_2_train_images/`` (one listing of
the folder) has its header read by pydicom without its pixels, these tags only (``HEADER_TAGS``): no other
header field reaches the table. An absent or unreadable file keeps view '', sex U and age NaN (packing lists
it). Every RSNA image is AP or PA by curation, so the source is ``frontal_only``: ``--views frontal`` keeps a
row whose view is unknown.

Key = patient_id = study_id = patientId. RSNA's patientId is a de-identified id per *image* (one image each),
not per person: the images came from NIH ChestX-ray14, where a patient may have several follow-ups, and the
published ids do not say which belong together, so the patient-wise split is image-wise for this source.

Boxes: each row's ``boxes`` is ((``Lung Opacity``, x, y, w, h), ...) in the file's pixels; () for a negative.

Official split: none. RSNA never released the stage 2 test set's labels, so ``--split official`` is refused.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.contain import Outside, within
from cxrdist.cpus import cpu_count
from cxrdist.errors import UserError
from cxrdist.labels import RSNA
from cxrdist.sources.registry import Source, register
from cxrdist.sources.table import (
    RawRows,
    clean_small,
    normalise_sex,
    parse_age,
    read_csv_checked,
    strings,
    unparseable_sex,
)

CSV = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"
REQUIRED = ("patientId", "x", "y", "width", "height", "Target")
BOX = ("x", "y", "width", "height")
LABEL = RSNA[0]
FRAME = 1024  # the real images' side: a box whose file's header was not read is checked against it
HEADER_TAGS = ["ViewPosition", "PatientAge", "PatientSex", "Rows", "Columns"]
# A header costs ~0.45 ms of pydicom (Python, holding the GIL): all 26,684 ~12 s of CPU. Threads overlap the
# file opens (cold or network storage) but not the parsing, and more threads than cores only add contention
# (3,000 warm headers: 0.95 s serial, 1.0 s on 2 threads, 1.6 s on 4, on a busy 2-core box).
MAX_THREADS = 8


def _numbers(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A text column -> (stripped text, float64 values with NaN for blank or not a number, blank)."""
    text = strings(col)
    blank = text == ""
    num = pd.to_numeric(pd.Series(text.astype(object)).where(~blank), errors="coerce").to_numpy(np.float64)
    return text, num, blank


def _row_errors(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (patientId; Target 0/1, NaN if bad; the N x 4 box, NaN if none; the first error or '')."""
    pid = strings(df["patientId"])
    t_text, target, t_blank = _numbers(df["Target"])
    cells = [_numbers(df[c]) for c in BOX]
    box = np.stack([num for _, num, _ in cells], axis=1)
    blank = np.stack([b for _, _, b in cells], axis=1)
    not_number = np.stack([np.isnan(num) & ~b for _, num, b in cells], axis=1).any(axis=1)
    has_box, no_box = ~blank.any(axis=1), blank.all(axis=1)
    bad_target = ~np.isin(target, (0.0, 1.0))
    checks = [  # the first that applies is the row's reason
        (pid == "", "empty patientId"),
        (bad_target & t_blank, "empty Target"),
        (bad_target, None),  # names the value: filled below
        (not_number, "a box cell is not a number"),
        (~has_box & ~no_box, "incomplete box (x, y, width and height are all needed)"),
        ((target == 1.0) & no_box, "Target 1 without a box"),
        ((target == 0.0) & has_box, "Target 0 with a box"),
        (has_box & ((box[:, 2] <= 0) | (box[:, 3] <= 0)), "box with a non-positive width or height"),
    ]
    errors = np.full(len(df), "", dtype=object)
    for hit, reason in checks:
        new = hit & (errors == "")
        if reason is None:
            errors[new] = [f"Target {t!r} is not 0 or 1" for t in t_text[new].astype(object)]
        else:
            errors[new] = reason
    target = np.where(bad_target, np.nan, target)
    return pid.astype(object), target, np.where(has_box[:, None], box, np.nan), errors


def _conflicts(codes: np.ndarray, target: np.ndarray, errors: np.ndarray, lines: np.ndarray) -> None:
    """Rows whose Target differs from their image's first row get that as their error (in place)."""
    first = pd.Series(np.arange(len(codes))).groupby(codes).transform("first").to_numpy()
    differs = (errors == "") & ~np.isnan(target) & ~np.isnan(target[first]) & (target != target[first])
    for i in np.flatnonzero(differs):
        f = first[i]
        errors[i] = f"Target {target[i]:g} disagrees with Target {target[f]:g} at {CSV}:{lines[f]} (same patientId)"


def _header(path: Path) -> tuple | None:
    """(ViewPosition, PatientSex, PatientAge, Rows, Columns) of one DICOM, read without its pixels; None if
    unreadable. Only ``HEADER_TAGS`` are parsed: nothing else of the header is kept."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        return (
            str(ds.get("ViewPosition") or ""),
            str(ds.get("PatientSex") or ""),
            str(ds.get("PatientAge") or ""),
            float(rows) if rows else np.nan,
            float(cols) if cols else np.nan,
        )
    except Exception:  # noqa: BLE001 - a truncated or foreign file: its row is kept, packing lists the file
        return None


def _safe_header(root: Path, rel: str) -> tuple | None:
    try:
        return _header(within(root, rel))  # a symlink out of the dataset is not opened (packing lists it)
    except Outside:
        return None


def read_headers(root: Path, names: np.ndarray, want: np.ndarray, notes: list[str]) -> dict[str, np.ndarray]:
    """View, sex, age (header text) and the image size (rows, cols) of the images ``want`` selects whose
    file is under ``IMAGES/`` (one listing of the folder); blanks and NaN for the rest. ``notes`` gets how
    many headers were read and how many files were absent or unreadable."""
    folder = root / IMAGES
    present = set()
    if folder.is_dir():
        with os.scandir(folder) as it:
            present = {e.name for e in it if e.is_file()}
    idx = np.flatnonzero(want & pd.Series(names).isin(present).to_numpy())
    threads = max(1, min(MAX_THREADS, cpu_count(), len(idx)))
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda i: _safe_header(root, f"{IMAGES}/{names[i]}"), idx))
    ok = [(i, h) for i, h in zip(idx, got) if h is not None]
    n = len(names)
    head = {k: np.full(n, "", dtype=object) for k in ("view", "sex", "age")}
    head |= {k: np.full(n, np.nan) for k in ("rows", "cols")}
    if ok:
        read = np.asarray([i for i, _ in ok])
        for k, values in zip(head, zip(*(h for _, h in ok))):
            head[k][read] = values
    absent, unreadable = int(want.sum()) - len(idx), len(idx) - len(ok)
    note = f"view, sex and age from {len(ok):,} DICOM headers under {IMAGES}/"
    if absent or unreadable:
        note += f"; {absent:,} images absent, {unreadable:,} unreadable: view '', sex U, age NaN (packing lists them)"
    notes.append(note)
    return head


def read_rsna(root: Path, *, official: bool = False) -> RawRows:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if official:
        raise UserError(
            "--split official: RSNA never released the labels of its stage 2 test images, so it has no official "
            "split of labelled images; use --split patient"
        )
    if not (root / CSV).is_file():
        raise UserError(f"{root}: no {CSV}: the RSNA root is the folder holding it and {IMAGES}/")
    df, lines, skipped = read_csv_checked(root / CSV, REQUIRED, text=REQUIRED)
    counts = [(f"rows in {CSV}", len(df) + len(skipped))]
    pid, target, box, errors = _row_errors(df)
    codes, uniques = pd.factorize(pid)
    counts.append(("images (patientIds)", len(uniques)))
    _conflicts(codes, target, errors, lines)

    # one image per patientId (its first row's line); an image with a failing row is dropped whole
    first = np.unique(codes, return_index=True)[1]
    bad = np.bincount(codes, weights=errors != "", minlength=len(uniques)) > 0
    names = np.asarray([f"{p}.dcm" for p in uniques], dtype=object)
    notes: list[str] = []
    head = read_headers(root, names, ~bad, notes)

    # boxes inside the image: the header's Columns x Rows, else the real set's 1024 x 1024
    w_img = np.nan_to_num(head["cols"], nan=FRAME)[codes]
    h_img = np.nan_to_num(head["rows"], nan=FRAME)[codes]
    x, y, bw, bh = box.T
    outside = (errors == "") & ~np.isnan(x) & ((x < 0) | (y < 0) | (x + bw > w_img) | (y + bh > h_img))
    errors[outside] = [f"box outside the {w:g} x {h:g} image" for w, h in zip(w_img[outside], h_img[outside])]
    bad |= np.bincount(codes, weights=outside, minlength=len(uniques)) > 0
    skipped += [{"source": f"{CSV}:{lines[i]}", "reason": errors[i]} for i in np.flatnonzero(errors != "")]

    keep = np.flatnonzero(~bad)
    positive = np.zeros(len(uniques))
    np.maximum.at(positive, codes, np.nan_to_num(target))
    by_image: dict[int, list] = {}
    for i in np.flatnonzero(~np.isnan(x)):  # ~9,500 boxes in the real set: a plain loop is milliseconds
        by_image.setdefault(codes[i], []).append((LABEL, float(x[i]), float(y[i]), float(bw[i]), float(bh[i])))
    age, bad_age = parse_age(pd.Series(head["age"][keep]), unit="Yy")
    sex = pd.Series(head["sex"][keep])
    out = pd.DataFrame(
        {
            "key": uniques[keep],
            "path": IMAGES + "/" + names[keep],
            "patient_id": uniques[keep],
            "study_id": uniques[keep],
            "view": clean_small(pd.Series(head["view"][keep]), upper=True),
            "sex": normalise_sex(sex),
            "age": age,
            LABEL: positive[keep],
        }
    )
    out["boxes"] = [tuple(by_image.get(c, ())) for c in keep]
    out["_file"], out["_line"] = CSV, lines[first[keep]]
    unparseable = {"PatientAge": bad_age, "PatientSex": unparseable_sex(sex)}  # '' (no header) is not counted
    return RawRows(df=out, counts=counts, skipped=skipped, labels=RSNA, notes=notes, unparseable=unparseable)


register(
    Source(
        name="rsna",
        labels=RSNA,
        read=read_rsna,
        root=f"the folder holding {CSV} and {IMAGES}/",
        official="none: RSNA never released its stage 2 test labels (refused; use --split patient)",
        synth_layouts=("rsna",),
        frontal_only=True,
    )
)
