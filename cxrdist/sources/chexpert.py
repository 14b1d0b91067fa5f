"""CheXpert v1.0 / v1.0-small: ``train.csv`` + ``valid.csv`` in the dataset folder (``--root``).

Header ``Path,Sex,Age,Frontal/Lateral,AP/PA,`` + the 14 observations (mapped by name). ``Path`` starts
with the dataset folder (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``); the first
component is stripped so ``path`` is relative to root. Keys drop the split folder:
``patient00001_study1_view1_frontal``. The view comes from ``Frontal/Lateral`` (trusted over the file name)
and, for frontal images, ``AP/PA``. Everything is vectorised pandas (223,414 rows in about a second).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import OBSERVATIONS
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

REQUIRED: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS
CSVS = ("train.csv", "valid.csv")
SPLIT_FOLDERS = ("train", "valid", "test")


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    missing = [n for n in CSVS if not (root / n).is_file()]
    if missing:
        hint = ""
        inner = sorted(p.parent for p in root.glob("*/train.csv"))
        if inner:
            hint = f" (did you mean --root {inner[0]}?)"
        raise UserError(
            f"{root}: no {' or '.join(missing)}: the CheXpert root is the dataset folder holding "
            f"train.csv and valid.csv, e.g. .../CheXpert-v1.0-small{hint}"
        )


def read_chexpert(root: Path, *, official: bool = False) -> RawRows:
    root = Path(root)
    _check_root(root)
    frames, skipped, n_rows = [], [], 0
    for name in CSVS:
        df, lines, bad = read_csv_checked(root / name, REQUIRED, text=("Path",))
        skipped += bad
        n_rows += len(df) + len(bad)
        df["_file"] = name
        df["_line"] = lines
        df["_official"] = "test" if name == "valid.csv" else np.nan  # the published numbers' split
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    counts = [("rows in train.csv + valid.csv", n_rows)]

    # Path -> path relative to root (strip the dataset folder, unless the path starts at the split folder)
    slash, dot = np.array("/", dtype=STR), np.array(".", dtype=STR)
    full = strings(df["Path"])
    first, _, rest = np.strings.partition(full, slash)
    at_split = np.zeros(len(full), dtype=bool)
    for folder in SPLIT_FOLDERS:
        at_split |= first == folder
    rel = np.where(at_split, full, rest)
    _, _, tail = np.strings.partition(rel, slash)  # patient00001/study1/view1_frontal.jpg
    patient, _, after = np.strings.partition(tail, slash)
    study, _, fname = np.strings.partition(after, slash)
    ok = (patient != "") & (study != "") & (fname != "")
    if not ok.all():
        idx = np.flatnonzero(~ok)
        for i, src in zip(idx, row_sources(df, idx)):
            skipped.append(
                {
                    "source": src,
                    "reason": f"cannot parse Path {str(full[i])!r} (want <dataset>/<split>/<patient>/<study>/<file>)",
                }
            )
        df = df.loc[ok].reset_index(drop=True)
        rel, tail, patient, study, fname = (x[ok] for x in (rel, tail, patient, study, fname))
    # key: drop the file extension (a last '.' in the file name), then '/' and any other '.' -> '_'
    stem, _, ext = np.strings.rpartition(tail, dot)
    stem = np.where((stem != "") & (np.strings.find(ext, slash) < 0), stem, tail)
    key = np.strings.replace(stem, "/", "_")
    if (np.strings.find(key, dot) >= 0).any():
        key = np.strings.replace(key, ".", "_")
    fl = clean_small(df["Frontal/Lateral"], upper=True)
    appa = clean_small(df["AP/PA"], upper=True)
    view = np.where(fl == "LATERAL", np.where(np.isin(appa, ["LL", "RL"]), appa, "LATERAL"), appa)

    age, bad_age = parse_age(df["Age"])
    out = pd.DataFrame(
        {
            "key": key.astype(object),
            "path": rel.astype(object),
            "patient_id": patient.astype(object),
            "study_id": np.strings.add(np.strings.add(patient, slash), study).astype(object),
            "view": view.astype(object),
            "sex": normalise_sex(df["Sex"]),
            "age": age,
        }
    )
    for name in OBSERVATIONS:
        out[name] = df[name].to_numpy()
    for c in ("_file", "_line", "_official"):
        out[c] = df[c].to_numpy()
    note = (
        (
            "official: valid.csv (234 studies, radiologist labels: the split published CheXpert numbers "
            "come from) -> test; train.csv is split patient-wise 90/10 into train/val (balanced, seeded)"
        )
        if official
        else ""
    )
    bad = {"Age": bad_age, "Sex": unparseable_sex(df["Sex"])}
    return RawRows(df=out, counts=counts, skipped=skipped, labels=OBSERVATIONS, official_note=note, unparseable=bad)


register(
    Source(
        name="chexpert",
        labels=OBSERVATIONS,
        read=read_chexpert,
        root="the dataset folder holding train.csv and valid.csv (e.g. .../CheXpert-v1.0-small)",
        official="valid.csv (radiologist labels) -> test; train.csv split patient-wise 90/10 into train/val",
        official_rest=(0.9, 0.1, 0.0),
        synth_layouts=("chexpert",),
    )
)
