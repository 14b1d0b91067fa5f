"""The one sample table: what every source reader produces and what shards and the file loaders consume.

A reader (``chexpert.read_chexpert``, ``mimic.read_mimic``) returns ``RawRows``: one row per image with
identity columns and the 14 *raw* label cells as text, addressed by observation name. ``finish`` then does
the source-independent work, all vectorised: label validation (bad rows -> ``skipped``), duplicate keys,
the patient split, the view filter and the uncertainty policy, and returns the ``SourceTable`` of the
contract in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist.errors import UserError
from cxrdist.labels import OBSERVATIONS, POLICIES, apply_policy
from cxrdist.sources.split import SPLIT_NAMES, assign_splits

SOURCES = ("chexpert", "mimic")
VIEW_CHOICES = ("frontal", "all")
SPLIT_CHOICES = ("patient", "official")
# `views="frontal"` keeps posteroanterior and anteroposterior projections only. MIMIC's "AP AXIAL"
# (a lordotic/axial AP, ~0.1% of MIMIC) is deliberately NOT kept: it is neither the poster's PA nor AP.
FRONTAL_VIEWS = ("PA", "AP")

MASK_COLUMNS: tuple[str, ...] = tuple(f"mask:{o}" for o in OBSERVATIONS)
META_COLUMNS: tuple[str, ...] = ("key", "path", "patient_id", "study_id", "view", "sex", "age")
COLUMNS: tuple[str, ...] = META_COLUMNS + OBSERVATIONS + MASK_COLUMNS + ("split",)


@dataclass
class SourceTable:
    """The sample table (contract: docs/ARCHITECTURE.md, "The sample table")."""

    df: pd.DataFrame
    counts: list[tuple[str, int]]
    skipped: list[dict]
    root: Path
    source: str
    policy: str
    split: str
    views: str = "frontal"
    split_info: dict = field(default_factory=dict)  # method, seed, fractions, max prevalence gap, note
    notes: list[str] = field(default_factory=list)  # e.g. how the image extension was chosen

    def labels(self) -> np.ndarray:
        return self.df[list(OBSERVATIONS)].to_numpy(np.float32)

    def masks(self) -> np.ndarray:
        return self.df[list(MASK_COLUMNS)].to_numpy(np.int8)


@dataclass
class RawRows:
    """A reader's output. ``df`` columns: key, path, patient_id, study_id, view (upper-case, '' blank),
    sex (M/F/U), age (float), the 14 observations (raw cells: float, text or NaN), ``_file`` + ``_line``
    (where a row came from: ``train.csv`` + 17, or an image path + 0), optionally ``_lsrc`` (where its
    labels came from, appended to label reasons) and ``_official`` (train/val/test; NaN: patient-wise)."""

    df: pd.DataFrame
    counts: list[tuple[str, int]]
    skipped: list[dict]
    notes: list[str] = field(default_factory=list)
    official_note: str = ""


# --- CSV helpers (used by the readers) ---------------------------------------------------------------
# pandas without pyarrow runs `.str` methods as Python loops; the per-row text work here uses numpy's
# StringDType ufuncs (C loops) or factorises low-cardinality columns and cleans only the unique values.
STR = np.dtypes.StringDType()
_BAD_LINE = re.compile(r"Skipping line (\d+): ([^\n]*)")


def read_csv_checked(
    path: Path, required: tuple[str, ...], *, text: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """Read ``path`` (``.csv`` or ``.csv.gz``) and keep the ``required`` columns; ``text`` ones as strings,
    the others with the C parser's type inference (label columns come back float64 unless a cell is not
    a number).

    Returns (df, line numbers of df's rows in the file, skipped entries for unreadable lines). Raises
    ``UserError`` at once, naming the file, when it is missing, empty or lacks any required column.
    Fully blank lines are dropped silently; lines with too many fields go to ``skipped``.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        header = pd.read_csv(path, nrows=0)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file (expected a CSV with columns {', '.join(required)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable CSV: {e}") from None
    have = {str(c).strip(): c for c in header.columns}
    missing = [c for c in required if c not in have]
    if missing:
        raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # all columns: with `usecols`, pandas does not notice rows with too many fields
            df = pd.read_csv(
                path, dtype={have[c]: str for c in text}, on_bad_lines="warn", skip_blank_lines=False, low_memory=False
            )
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError) as e:
            raise UserError(f"{path}: not a readable CSV: {e}") from None
    df = df[[have[c] for c in required]]
    df.columns = list(required)
    bad: dict[int, str] = {}
    for w in caught:
        for m in _BAD_LINE.finditer(str(w.message)):
            bad[int(m.group(1))] = m.group(2).strip()
    lines = np.arange(2, 2 + len(df) + len(bad), dtype=np.int64)
    if bad:
        lines = lines[~np.isin(lines, np.fromiter(bad, dtype=np.int64))]
    skipped = [{"source": f"{name}:{ln}", "reason": f"unreadable row: {why}"} for ln, why in sorted(bad.items())]
    blank = df.isna().all(axis=1).to_numpy()
    if blank.any():
        df, lines = df.loc[~blank].reset_index(drop=True), lines[~blank]
    return df, lines, skipped


def strings(s) -> np.ndarray:
    """Any column -> stripped numpy StringDType array ('' for missing)."""
    a = np.asarray(s, dtype=object)
    a = np.where(pd.isna(a), "", a).astype(STR)
    return np.strings.strip(a)


def clean_small(s: pd.Series, upper: bool = False) -> np.ndarray:
    """A low-cardinality column (sex, view) -> stripped str objects, '' for missing; fast (factorised)."""
    codes, uniques = pd.factorize(s)
    vals = [str(u).strip() for u in uniques]
    vals = [v.upper() for v in vals] if upper else vals
    return np.asarray(vals + [""], dtype=object)[codes]


def normalise_sex(s: pd.Series) -> np.ndarray:
    """Male/Female/M/F (any case) -> M/F; anything else (Unknown, blank) -> U."""
    t = clean_small(s, upper=True)
    return np.where(np.isin(t, ["M", "MALE"]), "M", np.where(np.isin(t, ["F", "FEMALE"]), "F", "U")).astype(object)


def parse_label_cells(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Raw label cells (N x 14, by name; float or text) -> (float64 values, NaN blank; bad N x 14)."""
    values = np.full(cells.shape, np.nan, dtype=np.float64)
    bad = np.zeros(cells.shape, dtype=bool)
    for j, name in enumerate(OBSERVATIONS):
        col = cells[name]
        if pd.api.types.is_numeric_dtype(col.dtype):
            num = col.to_numpy(np.float64)
            blank = np.isnan(num)
        else:  # a cell that is not a number (e.g. 'abc') made the column text
            text = strings(col)
            blank = text == ""
            num = pd.to_numeric(pd.Series(text.astype(object)).where(~blank), errors="coerce").to_numpy(np.float64)
        ok = blank | np.isin(num, (1.0, 0.0, -1.0))
        bad[:, j] = ~ok
        values[:, j] = np.where(ok, num, np.nan)
    return values, bad


def row_sources(df: pd.DataFrame, idx) -> list[str]:
    """``skipped`` sources for rows ``idx``: ``file:line`` (``_line`` > 0) or ``_file`` alone (a path)."""
    files, lines = df["_file"].to_numpy()[idx], df["_line"].to_numpy()[idx]
    return [f"{f}:{int(n)}" if n > 0 else str(f) for f, n in zip(files, lines)]


def cell_text(v) -> str:
    """A label cell as written: 2.0 -> '2.0', ' abc ' -> 'abc'."""
    return repr(float(v)) if isinstance(v, (float, np.floating)) else str(v).strip()


# --- the source-independent part ---------------------------------------------------------------------
def finish(raw: RawRows, *, root: Path, source: str, views: str, policy: str, split: str, seed: int) -> SourceTable:
    df = raw.df.reset_index(drop=True)
    counts = list(raw.counts)
    skipped = list(raw.skipped)

    # 1. labels: unknown values send the row to `skipped` (reason names the first bad cell)
    values, bad_cells = parse_label_cells(df[list(OBSERVATIONS)])
    bad = bad_cells.any(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)
        first = bad_cells[idx].argmax(axis=1)
        srcs = row_sources(df, idx)
        lsrcs = df["_lsrc"].to_numpy()[idx] if "_lsrc" in df else [None] * len(idx)
        for i, j, src, ls in zip(idx, first, srcs, lsrcs):
            name = OBSERVATIONS[j]
            reason = f"unknown label value '{cell_text(df.at[i, name])}' in {name}"
            skipped.append({"source": src, "reason": reason + (f" ({ls})" if isinstance(ls, str) else "")})

    # 2. duplicate keys (the first occurrence wins)
    live = df["key"].where(~pd.Series(bad))  # bad rows do not claim a key
    dup = (live.duplicated(keep="first") & live.notna()).to_numpy()
    if dup.any():
        idx = np.flatnonzero(dup)
        live_first = ~bad & ~dup
        first = dict(zip(df["key"].to_numpy()[live_first], np.flatnonzero(live_first)))
        for i, src in zip(idx, row_sources(df, idx)):
            k = df.at[i, "key"]
            skipped.append({"source": src, "reason": f"duplicate key {k} (first at {row_sources(df, [first[k]])[0]})"})
    keep = ~bad & ~dup
    df, values = df.loc[keep].reset_index(drop=True), values[keep]
    counts.append(("valid rows", int(len(df))))

    # 3. split: over all valid rows, before the view filter and independent of the uncertainty policy
    #    (balanced on raw positives), so one seed gives every patient the same split for any --views/--policy
    official = df["_official"] if "_official" in df else None
    split_col, info = assign_splits(df["patient_id"], values == 1.0, method=split, seed=seed, official=official)
    if split == "official" and raw.official_note:
        info["note"] = raw.official_note

    # 4. view filter
    if views == "frontal":
        keep = df["view"].isin(FRONTAL_VIEWS).to_numpy()
        counts.append((f"frontal views ({', '.join(FRONTAL_VIEWS)})", int(keep.sum())))
        df, values, split_col = df.loc[keep].reset_index(drop=True), values[keep], split_col[keep]

    # 5. uncertainty policy and the contract's columns
    labels, mask = apply_policy(values, policy)
    out = {c: df[c].to_numpy(dtype=object) for c in ("key", "path", "patient_id", "study_id", "view", "sex")}
    out["age"] = pd.to_numeric(df["age"], errors="coerce").to_numpy(np.float64)
    for j, name in enumerate(OBSERVATIONS):
        out[name] = labels[:, j]
    for j, name in enumerate(MASK_COLUMNS):
        out[name] = mask[:, j]
    out["split"] = np.asarray(SPLIT_NAMES, dtype=object)[split_col]
    table = pd.DataFrame(out, columns=list(COLUMNS))
    for c in ("key", "path", "patient_id", "study_id", "view", "sex", "split"):
        table[c] = table[c].astype(str)
    return SourceTable(
        df=table,
        counts=counts,
        skipped=skipped,
        root=Path(root).resolve(),
        source=source,
        policy=policy,
        split=split,
        views=views,
        split_info=info,
        notes=list(raw.notes),
    )


def check_choices(source: str, views: str, policy: str, split: str) -> None:
    for what, value, choices in (
        ("source", source, SOURCES),
        ("views", views, VIEW_CHOICES),
        ("policy", policy, POLICIES),
        ("split", split, SPLIT_CHOICES),
    ):
        if value not in choices:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
