"""NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (or the 2017 ``Data_Entry_2017.csv``) and the PNGs.

Header ``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,
OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]`` (the brackets hold commas, so pandas sees two
columns each; only the first seven are read). ``Finding Labels`` is ``|``-separated names from
``labels.NIH`` or ``No Finding``; every label is an explicit positive or negative (no uncertain, no blank).
Images are ``<Image Index>`` in any of ``images_001/images/`` ... ``images_012/images/`` (the 12 archives
unpacked side by side), ``images/`` or ``--root`` itself; they are found by listing those folders once
(names only: no image is opened). Official split: ``test_list.txt`` -> test, ``train_val_list.txt`` ->
split patient-wise 90/10 into train/val. Key = Image Index without ``.png``; one image per follow-up visit,
so the study is the image. The expert annotations (radiologists' boxes, Google's adjudicated labels) are read
by ``nih_expert``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import NIH
from cxrdist.sources.nih_expert import BBOX, expert_rows, read_boxes
from cxrdist.sources.registry import Source, register
from cxrdist.sources.table import (
    STR,
    RawRows,
    clean_small,
    normalise_sex,
    parse_age,
    read_csv_checked,
    row_sources,
    strings,
    unparseable_sex,
)

CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
NO_FINDING = "No Finding"
TRAIN_VAL, TEST = "train_val_list.txt", "test_list.txt"


def find_csv(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    for name in CSVS:
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: no {' or '.join(CSVS)}: the NIH root is the folder holding it and images*/")


def image_index(root: Path) -> dict[str, str]:
    """{file name: path relative to root} for the PNGs in images_*/images/, images_*/, images/ and root."""
    folders = sorted(root.glob("images_*/images")) + sorted(root.glob("images_*")) + [root / "images", root]
    found: dict[str, str] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        rel = folder.relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        with os.scandir(folder) as it:
            for e in it:
                if e.name.endswith(".png") and e.name not in found:
                    found[e.name] = prefix + e.name
    return found


def parse_findings(text: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``Finding Labels`` -> (N x 14 float64 0/1 in ``NIH`` order, per-row error or ''). Parsed once per
    distinct string (the real CSV has under a thousand), so 112,120 rows take milliseconds."""
    codes, uniques = pd.factorize(pd.Series(strings(text).astype(object)))
    table = np.zeros((len(uniques) + 1, len(NIH)), np.float64)
    errors = [""] * (len(uniques) + 1)
    for u, s in enumerate(uniques):
        tokens = [t.strip() for t in str(s).split("|")]
        unknown = [t for t in tokens if t not in NIH and t != NO_FINDING]
        if not s:
            errors[u] = "empty Finding Labels"
        elif unknown:
            errors[u] = f"unknown finding {unknown[0]!r} in Finding Labels {s!r}"
        elif NO_FINDING in tokens and len(tokens) > 1:
            errors[u] = f"'No Finding' together with findings in Finding Labels {s!r}"
        for t in tokens:
            if t in NIH:
                table[u, NIH.index(t)] = 1.0
    errors[-1] = "empty Finding Labels"  # factorize's code -1 (missing) indexes the last row
    return table[codes], np.asarray(errors, dtype=object)[codes]


def _official(root: Path, keys: np.ndarray, notes: list[str]) -> np.ndarray:
    """test_list.txt rows -> 'test'; the rest NaN (split patient-wise into train/val)."""
    missing = [n for n in (TRAIN_VAL, TEST) if not (root / n).is_file()]
    if missing:
        raise UserError(f"{root}: --split official needs {' and '.join(missing)} (NIH's official lists)")
    test = {Path(line.strip()).stem for line in (root / TEST).read_text().splitlines() if line.strip()}
    listed = test | {Path(s.strip()).stem for s in (root / TRAIN_VAL).read_text().splitlines() if s.strip()}
    unlisted = int((~pd.Series(keys).isin(listed)).sum())
    if unlisted:
        notes.append(f"{unlisted:,} rows are in neither {TRAIN_VAL} nor {TEST}: split with train_val's rows")
    out = np.full(len(keys), np.nan, dtype=object)
    out[pd.Series(keys).isin(test).to_numpy()] = "test"
    return out


def read_nih(root: Path, *, official: bool = False, expert_labels=None) -> RawRows:
    """The NIH rows, with BBox_List_2017.csv's boxes attached when it is there; ``expert_labels``: Google's
    adjudicated file (``sources/nih_expert.py``): only its images, its four labels, its split."""
    raw, names = read_entries(root, official=official)
    if expert_labels is not None:
        raw = expert_rows(raw, names, expert_labels)
    return raw


def read_entries(root: Path, *, official: bool) -> tuple[RawRows, np.ndarray]:
    root = Path(root)
    csv = find_csv(root)
    df, lines, skipped = read_csv_checked(csv, REQUIRED, text=("Image Index", "Finding Labels", "Patient ID"))
    counts = [(f"rows in {csv.name}", len(df) + len(skipped))]
    df["_file"], df["_line"] = csv.name, lines
    values, errors = parse_findings(df["Finding Labels"])
    name = strings(df["Image Index"])
    errors = np.where(name == "", "empty Image Index", errors)
    bad = errors != ""
    if bad.any():
        idx = np.flatnonzero(bad)
        skipped += [{"source": s, "reason": r} for s, r in zip(row_sources(df, idx), errors[idx])]
        df, values, name = df.loc[~bad].reset_index(drop=True), values[~bad], name[~bad]
    head, dot, _ = np.strings.rpartition(name, np.array(".", dtype=STR))
    stem = np.where(dot == ".", head, name)
    index = image_index(root)
    notes = []
    path = pd.Series(name.astype(object)).map(index).astype(object)
    if path.isna().any():
        notes.append(f"{int(path.isna().sum()):,} rows name an image not found under images*/ (listed at packing)")
        path = path.fillna("images/" + pd.Series(name.astype(object)))
    age, bad_age = parse_age(df["Patient Age"], unit="Yy")
    out = pd.DataFrame(
        {
            "key": stem.astype(object),
            "path": path.to_numpy(dtype=object),
            "patient_id": strings(df["Patient ID"]).astype(object),
            "study_id": stem.astype(object),
            "view": clean_small(df["View Position"], upper=True),
            "sex": normalise_sex(df["Patient Gender"]),
            "age": age,
        }
    )
    for j, label in enumerate(NIH):
        out[label] = values[:, j]
    out["_file"], out["_line"] = df["_file"].to_numpy(), df["_line"].to_numpy()
    boxes = read_boxes(root, skipped)
    if boxes:
        out["boxes"] = pd.Series(name.astype(object)).map(boxes).to_numpy(dtype=object)
        boxed = int(pd.Series(name.astype(object)).isin(boxes.keys()).sum())
        n = sum(len(b) for b in boxes.values())
        notes.append(f"{BBOX}: {n:,} boxes on {len(boxes):,} images, {boxed:,} of them in the table")
    note = ""
    if official:
        out["_official"] = _official(root, stem.astype(object), notes)
        note = f"official: {TEST} -> test; {TRAIN_VAL} split patient-wise 90/10 into train/val (balanced, seeded)"
    bad = {"Patient Age": bad_age, "Patient Gender": unparseable_sex(df["Patient Gender"])}
    raw = RawRows(df=out, counts=counts, skipped=skipped, labels=NIH, notes=notes, official_note=note, unparseable=bad)
    return raw, name


register(
    Source(
        name="nih",
        labels=NIH,
        read=read_nih,
        root=f"the folder holding {CSVS[0]} and images*/ (or the PNGs flat)",
        official=f"{TEST} -> test; {TRAIN_VAL} split patient-wise 90/10 into train/val",
        synth_layouts=("nih",),
        official_rest=(0.9, 0.1, 0.0),
    )
)
