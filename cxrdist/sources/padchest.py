"""PadChest (Bustos et al. 2020, BIMCV): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or its
``.csv.gz`` as downloaded) and the 16-bit greyscale PNGs in ``<root>/<ImageDir>/<ImageID>``.

The table: 160,861 rows, one per image. Its first column has an empty header (a saved pandas index); the columns
read are ``ImageID`` (``<digits>_<xx-xxx-xxx>.png``), ``ImageDir`` (the folder 0..54 the image was unzipped
into; written ``12`` or ``12.0``), ``StudyDate_DICOM`` (YYYYMMDD), ``StudyID``, ``PatientID``, ``PatientBirth``
(a year, ``1930.0``, sometimes blank), ``PatientSex_DICOM`` (M, F, rarely O or blank), ``Projection``,
``MethodLabel`` (``Physician`` or ``RNN_model``) and ``Labels``; the others (ViewPosition_DICOM, Pediatric,
Modality_DICOM, ..., Report, Localizations, LabelsLocalizationsBySentence, labelCUIS, LocalizationsCUIS) are not.

- ``Labels`` is a Python list literal of report terms, ``"['pleural effusion', 'cardiomegaly']"``,
  ``"['normal']"`` or ``"[]"``, with stray spaces (``' pleural effusion'``). It is parsed with
  ``ast.literal_eval`` (never ``eval``), once per distinct cell, and only a list of strings is accepted; any
  other cell is a skipped row naming file, line and why. Terms are stripped and matched case-insensitively.
- Labels: ``labels.PADCHEST``, the pathologies torchxrayvision trains on PadChest (Cohen et al. 2022,
  ``xrv.datasets.PC_Dataset``): its choice of the findings frequent enough in PadChest to learn, which this
  reader takes as is (the rule), less xrv's separate ``Tube`` (tubes are in Support Devices here, as in
  CheXpert). A label is 1 when any of its ``TERMS`` is in the row's list, else 0: PadChest has no uncertain
  label and no blank. Each label carries the NIH or CheXpert name of the same finding, so ``eval --map-labels``
  and ``labels.overlap`` pair them (NIH 14 of 14; CheXpert 9: Effusion <-> Pleural Effusion by
  ``labels.SAME_FINDING``). xrv matches substrings of the cell; ``TERMS`` lists exact terms instead, which
  leaves out what a substring wrongly catches: ``pseudonodule`` (not a nodule), ``pericardial effusion`` (not
  pleural), ``subcutaneous emphysema`` (not pulmonary), ``breast mass`` and ``soft tissue mass`` (not a chest
  mass). How many frontal positives each label has in the real table is not re-counted here: the manifest's
  per-split prevalences show it for a packed copy.
- ``['normal']`` is a row with every label 0. ``normal`` beside a finding of the set (a report's "rest normal")
  keeps the finding. ``[]`` (no term extracted from the report) and a blank cell are rows without labels:
  skipped, with the reason, as torchxrayvision drops them rather than call them normal.
- ``label_method``: ``all`` (default; what torchxrayvision and most published PadChest numbers train on) keeps
  every row; ``physician`` keeps the ~27% whose labels a physician wrote (``MethodLabel`` Physician), not those
  of the authors' RNN: the rows dropped are said in ``counts`` and the notes.
- Views: ``Projection`` PA, L, AP_horizontal (a supine AP), AP, COSTAL, EXCLUDE, UNK. ``AP_horizontal`` becomes
  view ``AP``, so ``--views frontal`` keeps PA, AP and AP_horizontal; the others keep their name, upper-case.
- Age = the study's year (``StudyDate_DICOM``) - ``PatientBirth``; sex from ``PatientSex_DICOM`` (DICOM's O,
  other, reads as U like a blank). Unparseable dates and years are counted, not dropped.
- Key = ImageID without ``.png``; study = StudyID; path = ``<ImageDir as an integer>/<ImageID>``. No image is
  opened here; the ones PadChest ships broken (about twenty truncated or corrupt PNGs, which
  torchxrayvision lists by name) are listed with their reason when packing.
- No official split: ``--split official`` is refused; ``--split patient`` splits by PatientID.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import PADCHEST
from cxrdist.sources.registry import Source, register
from cxrdist.sources.table import (
    SEX_WORDS,
    STR,
    RawRows,
    clean_small,
    normalise_sex,
    parse_age,
    read_csv_checked,
    row_sources,
    strings,
)

CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "MethodLabel",
    "Labels",
)
TEXT = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "Projection", "MethodLabel", "Labels")
LABEL_METHODS = ("all", "physician")
NORMAL = "normal"
MAX_CELL = 4000  # the longest real Labels cell is a few hundred characters; literal_eval never sees more

# label -> the PadChest terms (Bustos et al. 2020's vocabulary) that make it positive; torchxrayvision's
# mapping, spelled out term by term (see the module docstring for what its substrings caught that these do not)
TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (
        "atelectasis",
        "laminar atelectasis",
        "lobar atelectasis",
        "segmental atelectasis",
        "atelectasis basal",
        "round atelectasis",
        "total atelectasis",
    ),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Infiltration": (
        "infiltrates",
        "interstitial pattern",
        "ground glass pattern",
        "reticular interstitial pattern",
        "reticulonodular interstitial pattern",
        "alveolar pattern",
        "consolidation",
        "air bronchogram",
    ),
    "Mass": ("mass", "pulmonary mass", "mediastinal mass", "pleural mass"),
    "Nodule": ("nodule", "multiple nodules"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Hernia": ("hiatal hernia",),
    "Fracture": (
        "fracture",
        "rib fracture",
        "callus rib fracture",
        "clavicle fracture",
        "humeral fracture",
        "vertebral fracture",
    ),
    "Support Devices": (
        "pacemaker",
        "single chamber device",
        "dual chamber device",
        "electrical device",
        "endotracheal tube",
        "tracheostomy tube",
        "NSG tube",
        "chest drain tube",
        "central venous catheter",
        "central venous catheter via jugular vein",
        "central venous catheter via subclavian vein",
        "central venous catheter via umbilical vein",
        "reservoir central venous catheter",
        "catheter",
    ),
    "Granuloma": ("granuloma", "calcified granuloma"),
    "Flattened Diaphragm": ("flattened diaphragm",),
    "Bronchiectasis": ("bronchiectasis",),
    "Aortic Elongation": (
        "aortic elongation",
        "supra aortic elongation",
        "descendent aortic elongation",
        "ascendent aortic elongation",
    ),
    "Scoliosis": ("scoliosis",),
    "Hilar Enlargement": (
        "hilar enlargement",
        "vascular hilar enlargement",
        "adenopathy",
        "calcified adenopathy",
        "calcified mediastinal adenopathy",
        "pulmonary artery enlargement",
    ),
    "Tuberculosis": ("tuberculosis", "tuberculosis sequelae"),
    "Air Trapping": ("air trapping",),
    "Costophrenic Angle Blunting": ("costophrenic angle blunting",),
    "Aortic Atheromatosis": ("aortic atheromatosis",),
    "Hemidiaphragm Elevation": ("hemidiaphragm elevation",),
}


def _term_labels() -> dict[str, list[int]]:
    """lower-case term -> the PADCHEST columns it sets (consolidation: Consolidation and Infiltration)."""
    out: dict[str, list[int]] = {}
    for j, name in enumerate(PADCHEST):
        for t in TERMS[name]:
            out.setdefault(t.lower(), []).append(j)
    return out


_TERM_LABELS = _term_labels()


def find_csv(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    for name in (CSV, CSV + ".gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"{root}: no {CSV}[.gz]: the PadChest root is the folder holding it and the image folders 0..54")


def parse_terms(cell: str) -> tuple[list[str], str]:
    """One ``Labels`` cell -> (its stripped terms, '') or ([], why it is refused)."""
    shown = cell if len(cell) <= 60 else cell[:57] + "..."
    if not cell:
        return [], "no Labels"
    # literal_eval evaluates no call or name, but nested input can exhaust its recursion; a list is all we want
    if len(cell) > MAX_CELL or not (cell.startswith("[") and cell.endswith("]")):
        return [], f"Labels {shown!r} is not a list literal"
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        return [], f"Labels {shown!r} is not a list literal ({type(e).__name__})"
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        return [], f"Labels {shown!r} is not a list of terms"
    terms = [t.strip() for t in value if t.strip()]
    return (terms, "") if terms else ([], "empty Labels [] (no term extracted from the report)")


def parse_labels(cells: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Labels`` -> (N x len(PADCHEST) float64 0/1, per-row error or '', per-row 'normal beside a finding').
    Each distinct cell is parsed once (the real table has tens of thousands for 160,861 rows)."""
    codes, uniques = pd.factorize(cells)  # each distinct cell is stripped and parsed below, once
    table = np.zeros((len(uniques) + 1, len(PADCHEST)), np.float64)
    errors = [""] * len(uniques) + ["no Labels"]  # code -1 (a missing cell) indexes the last row
    normal_too = np.zeros(len(uniques) + 1, bool)
    for u, cell in enumerate(uniques):
        terms, errors[u] = parse_terms(str(cell).strip())
        lower = {t.lower() for t in terms}
        for t in lower:
            table[u, _TERM_LABELS.get(t, [])] = 1.0
        normal_too[u] = NORMAL in lower and table[u].any()
    return table[codes], np.asarray(errors, dtype=object)[codes], normal_too[codes]


def image_dirs(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``ImageDir`` (``12`` or ``12.0``) -> (folder name ``12``, per-row error or ''); factorised: 55 values."""
    codes, uniques = pd.factorize(pd.Series(strings(col).astype(object)))
    names, errors = [], []
    for u in uniques:
        try:
            x = float(u)
        except ValueError:
            x = -1.0
        ok = x >= 0 and x.is_integer()
        names.append(str(int(x)) if ok else "")
        errors.append("" if ok else f"ImageDir {u!r} is not a folder number")
    names.append("")
    errors.append("empty ImageDir")
    return np.asarray(names, dtype=object)[codes], np.asarray(errors, dtype=object)[codes]


def ages(df: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
    """Study year - PatientBirth (NaN when either is missing), and the cells that did not parse per column."""
    date = strings(df["StudyDate_DICOM"])
    ok = (np.strings.str_len(date) == 8) & np.strings.isdigit(date)
    year = np.full(len(date), np.nan)
    year[ok] = np.strings.slice(date[ok], 0, 4).astype(np.float64)
    birth, bad_birth = parse_age(df["PatientBirth"])
    age = year - birth
    odd = (age < 0) | (age > 120)  # a typo'd year: read as missing and counted with the births
    age[odd] = np.nan
    return age, {"StudyDate_DICOM": int((~ok & (date != "")).sum()), "PatientBirth": bad_birth + int(odd.sum())}


def _views(col: pd.Series, notes: list[str]) -> np.ndarray:
    proj = clean_small(col, upper=True)
    horizontal = proj == "AP_HORIZONTAL"
    if horizontal.any():  # the generic frontal filter keeps PA and AP: a supine AP is an AP
        notes.append(f"{int(horizontal.sum()):,} AP_horizontal (supine) images read as view AP")
    return np.where(horizontal, "AP", proj).astype(object)


def _by_method(df, lines, label_method, counts, notes):
    if label_method not in LABEL_METHODS:
        raise UserError(f"label_method {label_method!r}: choose one of {', '.join(LABEL_METHODS)}")
    if label_method == "all":
        return df, lines
    keep = np.char.lower(clean_small(df["MethodLabel"]).astype(str)) == "physician"
    counts.append(("labelled by a physician (label_method physician)", int(keep.sum())))
    notes.append(f"label_method physician: {int((~keep).sum()):,} rows labelled by the RNN (or unsaid) dropped")
    return df.loc[keep].reset_index(drop=True), lines[keep]


def read_padchest(root: Path, *, official: bool = False, label_method: str = "all") -> RawRows:
    root = Path(root)
    if official:
        raise UserError("padchest has no official split: use --split patient (split by PatientID)")
    csv = find_csv(root)
    df, lines, skipped = read_csv_checked(csv, REQUIRED, text=TEXT)
    counts = [(f"rows in {csv.name}", len(df) + len(skipped))]
    notes: list[str] = []
    df, lines = _by_method(df, lines, label_method, counts, notes)
    df["_file"], df["_line"] = csv.name, lines

    values, errors, normal_too = parse_labels(df["Labels"])
    name = strings(df["ImageID"])
    folder, folder_errors = image_dirs(df["ImageDir"])
    errors = np.where(folder_errors != "", folder_errors, errors)
    errors = np.where(name == "", "empty ImageID", errors)
    bad = errors != ""
    if bad.any():
        idx = np.flatnonzero(bad)
        skipped += [{"source": s, "reason": r} for s, r in zip(row_sources(df, idx), errors[idx])]
        df, values, name, folder = df.loc[~bad].reset_index(drop=True), values[~bad], name[~bad], folder[~bad]
        normal_too = normal_too[~bad]
    if normal_too.any():
        notes.append(f"{int(normal_too.sum()):,} rows list 'normal' beside a finding: the finding is kept")

    head, dot, _ = np.strings.rpartition(name, np.array(".", dtype=STR))
    stem = np.where(dot == ".", head, name)
    age, bad_cells = ages(df)
    sex_text = clean_small(df["PatientSex_DICOM"], upper=True)
    out = pd.DataFrame(
        {
            "key": stem.astype(object),
            "path": np.strings.add(np.strings.add(folder.astype(STR), "/"), name).astype(object),
            "patient_id": strings(df["PatientID"]).astype(object),
            "study_id": strings(df["StudyID"]).astype(object),
            "view": _views(df["Projection"], notes),
            "sex": normalise_sex(df["PatientSex_DICOM"]),
            "age": age,
        }
    )
    for j, label in enumerate(PADCHEST):
        out[label] = values[:, j]
    out["_file"], out["_line"] = df["_file"].to_numpy(), df["_line"].to_numpy()
    bad_cells["PatientSex_DICOM"] = int((~np.isin(sex_text, (*SEX_WORDS, "O"))).sum())  # DICOM's O(ther) is an answer
    return RawRows(df=out, counts=counts, skipped=skipped, labels=PADCHEST, notes=notes, unparseable=bad_cells)


register(
    Source(
        name="padchest",
        labels=PADCHEST,
        read=read_padchest,
        root=f"the folder holding {CSV}[.gz] and the image folders 0..54",
        official="none: PadChest publishes no split (refused; use --split patient)",
        synth_layouts=("padchest",),
    )
)
