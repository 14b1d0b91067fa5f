"""NIH ChestX-ray14's expert annotations: radiologists' boxes and Google's adjudicated labels.

- ``BBox_List_2017.csv`` (in the NIH root, read when present): 984 boxes over 8 findings on 880 images. Its
  real header is broken: ``Image Index,Finding Label,Bbox [x,y,w,h],,,``, so the box is four columns named
  ``Bbox [x``, ``y``, ``w``, ``h]``, followed by three empty ones. Coordinates are in the 1024 x 1024 frame
  the PNGs ship in, and the file spells Infiltration ``Infiltrate``. The boxes travel with their samples
  (``RawRows.df["boxes"]``, mapped into the stored frame by the packer).
- ``google2019_nih-chest-xray-labels.csv`` (``cxrdist shard --source nih --expert-labels FILE``): the NIH
  columns, then ``Fracture,Pneumothorax,Airspace opacity,Nodule or mass`` (YES/NO, adjudicated by three
  radiologists, Majkowska et al. 2019) and ``Set Id`` (test/validation), for 4,376 images. The shards then
  hold those images only, with those four labels, and ``Set Id`` as the split (validation -> val).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import NIH, NIH_EXPERT
from cxrdist.sources.table import RawRows, read_csv_checked, row_sources, strings

BBOX = "BBox_List_2017.csv"
BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
BBOX_FRAME = (1024, 1024)  # (width, height) the coordinates are in: the PNGs' own size
BBOX_SPELLING = {"Infiltrate": "Infiltration"}  # the box file's names -> NIH's label names
SET_IDS = {"test": "test", "validation": "val"}
YES_NO = {"YES": 1.0, "NO": 0.0}


def read_boxes(root: Path, skipped: list[dict]) -> dict[str, tuple]:
    """``BBox_List_2017.csv`` -> {Image Index: ((label, x, y, w, h, 1024, 1024), ...)}; {} without the file.
    A row with an unknown finding, a coordinate that is not a number, or a box outside the frame is listed."""
    path = Path(root) / BBOX
    if not path.is_file():
        return {}
    df, lines, bad = read_csv_checked(path, BBOX_COLUMNS, text=("Image Index", "Finding Label"))
    skipped += bad
    df["_file"], df["_line"] = BBOX, lines
    label = pd.Series(strings(df["Finding Label"]).astype(object)).replace(BBOX_SPELLING).to_numpy()
    xywh = np.stack([pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in BBOX_COLUMNS[2:]], 1)
    why = np.full(len(df), "", dtype=object)
    x, y, w, h = xywh.T
    fw, fh = BBOX_FRAME
    with np.errstate(invalid="ignore"):
        outside = (x < 0) | (y < 0) | (w <= 0) | (h <= 0) | (x + w > fw + 1) | (y + h > fh + 1)
    why[outside] = f"box outside the {fw}x{fh} frame or empty"
    why[~np.isfinite(xywh).all(1)] = "a box coordinate is not a number"
    why[~np.isin(label, NIH)] = "unknown Finding Label"
    why[strings(df["Image Index"]) == ""] = "empty Image Index"
    listed = np.flatnonzero(why != "")
    skipped += [{"source": s, "reason": f"{why[i]}: {label[i]!r}"} for s, i in zip(row_sources(df, listed), listed)]
    boxes: dict[str, tuple] = {}
    for i in np.flatnonzero(why == ""):
        boxes[df.at[i, "Image Index"]] = boxes.get(df.at[i, "Image Index"], ()) + ((label[i], *xywh[i], fw, fh),)
    return boxes


def expert_rows(raw: RawRows, names: np.ndarray, path: Path) -> RawRows:
    """``raw`` (the NIH rows, ``names`` their Image Index) restricted to the images Google's expert file
    labels, with its four labels and its ``Set Id`` as the official split."""
    path = Path(path).expanduser()
    df, lines, skipped = read_csv_checked(path, ("Image Index", *NIH_EXPERT, "Set Id"), text=("Image Index",))
    df["_file"], df["_line"] = path.name, lines
    cells = {c: pd.Series(strings(df[c]).astype(object)).str.upper().map(YES_NO) for c in NIH_EXPERT}
    set_id = pd.Series(strings(df["Set Id"]).astype(object)).str.lower().map(SET_IDS)
    where = pd.Series(names.astype(object)).reset_index(drop=True)
    row_of = pd.Series(np.arange(len(where)), index=where).groupby(level=0).first()
    at = strings(df["Image Index"]).astype(object)
    found = pd.Series(at).map(row_of)
    why = np.full(len(df), "", dtype=object)
    for c in reversed(NIH_EXPERT):
        why[cells[c].isna().to_numpy()] = f"{c} is not YES or NO"
    why[set_id.isna().to_numpy()] = "Set Id is not test or validation"
    why[found.isna().to_numpy()] = "not in the NIH table (or skipped there)"
    why[pd.Series(at).duplicated().to_numpy()] = "listed twice"
    listed = np.flatnonzero(why != "")
    skipped += [{"source": s, "reason": f"{why[i]}: {at[i]}"} for s, i in zip(row_sources(df, listed), listed)]
    ok = why == ""
    if not ok.any():
        raise UserError(f"{path}: no usable expert-labelled rows (first: {skipped[0]['reason'] if skipped else '-'})")
    out = raw.df.iloc[found[ok].astype(np.int64).to_numpy()].drop(columns=list(NIH)).reset_index(drop=True)
    for c in NIH_EXPERT:
        out[c] = cells[c][ok].to_numpy(np.float64)
    out["_official"] = set_id[ok].to_numpy(dtype=object)
    out["_file"], out["_line"] = path.name, lines[ok]
    counts = [*raw.counts, (f"rows in {path.name}", len(df) + len(skipped) - len(listed))]
    return RawRows(
        df=out,
        counts=counts,
        skipped=raw.skipped + skipped,
        labels=NIH_EXPERT,
        notes=raw.notes,
        official_note=f"{path.name}'s Set Id: test -> test, validation -> val",
        unparseable=raw.unparseable,
        split_from_file=f"{path.name}'s Set Id",
        protocol="nih/google-expert-2019",
    )
