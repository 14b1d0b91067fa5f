"""The one sample table: what every source reader produces and what shards and the file loaders consume.

A reader (each source's ``read``) returns ``RawRows``: one row per image with identity columns and the *raw*
label cells of the source's own label set, addressed by name. ``finish`` then does the source-independent
work, all vectorised: label validation (bad rows -> ``skipped``), duplicate keys, the patient split, the view
filter, the uncertainty policy and the chosen label set (``--labels``), and returns the ``SourceTable`` of
the contract in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist import labels as label_sets
from cxrdist.contain import OUTSIDE, escapes
from cxrdist.errors import UserError
from cxrdist.labels import POLICIES, apply_policy
from cxrdist.sources.split import SPLIT_NAMES, assign_splits

VIEW_CHOICES = ("frontal", "all")
SPLIT_CHOICES = ("patient", "official")
# `views="frontal"` keeps posteroanterior and anteroposterior projections only. MIMIC's "AP AXIAL"
# (a lordotic/axial AP, ~0.1% of MIMIC) is deliberately NOT kept: it is neither the poster's PA nor AP.
FRONTAL_VIEWS = ("PA", "AP")

META_COLUMNS: tuple[str, ...] = ("key", "path", "patient_id", "study_id", "view", "sex", "age")


def label_columns(names) -> tuple[list[str], list[str]]:
    """The table's label columns and mask columns (``mask:<name>``) for a label set."""
    return list(names), [f"mask:{n}" for n in names]


def table_columns(names) -> list[str]:
    lab, mask = label_columns(names)
    return [*META_COLUMNS, *lab, *mask, "split"]


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
    label_names: tuple[str, ...] = label_sets.CHEXPERT
    split_info: dict = field(default_factory=dict)  # method, seed, fractions, max prevalence gap, note
    notes: list[str] = field(default_factory=list)  # e.g. how the image extension was chosen
    labels_missing: tuple[str, ...] = ()  # chosen labels the source cannot provide (masked out everywhere)
    unparseable: dict[str, int] = field(default_factory=dict)  # source column -> cells read as missing
    protocol: str = ""  # RawRows.protocol

    def labels(self) -> np.ndarray:
        return self.df[label_columns(self.label_names)[0]].to_numpy(np.float32)

    def masks(self) -> np.ndarray:
        return self.df[label_columns(self.label_names)[1]].to_numpy(np.int8)


@dataclass
class RawRows:
    """A reader's output. ``df`` columns: key, path, patient_id, study_id, view (upper-case, '' blank),
    sex (M/F/U), age (float), the source's ``labels`` (raw cells: float, text or NaN), ``_file`` + ``_line``
    (where a row came from: ``train.csv`` + 17, or an image path + 0), optionally ``_lsrc`` (where its
    labels came from, appended to label reasons), ``_official`` (train/val/test; NaN: patient-wise) and
    ``boxes`` (per row a tuple of (label, x, y, w, h[, frame_w, frame_h]): imaging.fit_boxes; () none)."""

    df: pd.DataFrame
    counts: list[tuple[str, int]]
    skipped: list[dict]
    labels: tuple[str, ...]
    notes: list[str] = field(default_factory=list)
    official_note: str = ""
    unparseable: dict[str, int] = field(default_factory=dict)  # source column -> cells read as missing
    split_from_file: str = ""  # the rows' split is given by this (a file's column): ``_official`` for every row
    protocol: str = ""  # what eval names these rows' test set by, when not ``<source>/<split>``


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
    # pandas fills a row with too few fields with NaN, which reads as "not mentioned": a truncated last line
    # would lose its positives without a word, so such rows are skipped like rows with too many
    fields = field_counts(path)
    width = int(fields[0]) if len(fields) else 0
    got = fields[np.minimum(lines, len(fields)) - 1] if len(fields) else np.zeros(0, np.int64)
    short = got < width
    if short.any():
        skipped += [
            {"source": f"{name}:{ln}", "reason": f"unreadable row: {n} fields, the header has {width}"}
            for ln, n in zip(lines[short], got[short])
        ]
        df, lines = df.loc[~short].reset_index(drop=True), lines[~short]
    return df, lines, skipped


def field_counts(path: Path) -> np.ndarray:
    """Fields on each physical line of a CSV (index 0 is the header), counted in C: commas per line with
    numpy; only a file holding quotes (a quoted comma) goes through the csv module."""
    import csv
    import gzip
    import io

    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if b'"' in raw:
        return np.asarray([len(r) for r in csv.reader(io.StringIO(raw.decode(errors="replace")))], np.int64)
    buf = np.frombuffer(raw, np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], ends + 1])
    if len(starts) and starts[-1] >= len(buf):
        starts = starts[:-1]  # the file ends with a newline
    if not len(starts):
        return np.zeros(0, np.int64)
    return np.add.reduceat(buf == 44, starts, dtype=np.int64) + 1


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


SEX_WORDS = ("M", "MALE", "F", "FEMALE", "U", "UNKNOWN", "")  # what a sex cell may say (else: unparseable)


def unparseable_sex(s: pd.Series) -> int:
    """Sex cells that say something other than male, female or unknown (read as U: counted, not silent)."""
    return int((~np.isin(clean_small(s, upper=True), SEX_WORDS)).sum())


def parse_age(s: pd.Series, unit: str = "") -> tuple[np.ndarray, int]:
    """Age cells -> float64 years (NaN: blank or unparseable), and how many non-blank cells did not parse
    (``abc`` is read as missing and counted, never dropped without a word). ``unit``: a suffix to allow
    (NIH's ``058Y``)."""
    text = strings(s)
    if unit:
        text = np.strings.rstrip(text, unit)
    age = pd.to_numeric(pd.Series(text.astype(object)).where(text != ""), errors="coerce").to_numpy(np.float64)
    return age, int((np.isnan(age) & (text != "")).sum())


def parse_label_cells(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Raw label cells (N x L, by name; float or text) -> (float64 values, NaN blank; bad N x L)."""
    values = np.full(cells.shape, np.nan, dtype=np.float64)
    bad = np.zeros(cells.shape, dtype=bool)
    for j, name in enumerate(cells.columns):
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
def choose_labels(spec, source, native: tuple[str, ...]) -> tuple[tuple[str, ...], list[str | None]]:
    """``--labels`` against what the source provides -> (chosen names, the source's column for each or None).

    A chosen name is taken from the source's column of that name or of its counterpart
    (``labels.SAME_FINDING``: Effusion <-> Pleural Effusion). A name no label set knows is a typo: refused,
    listing what the source has. A known name the source lacks gets None (masked out everywhere). ``native``:
    the labels the reader gave (the source's own, or another set such as NIH's expert labels)."""
    if spec is None:
        names = native
    else:
        names = label_sets.resolve(spec) if isinstance(spec, str) else tuple(spec)
    cols = [label_sets.counterpart(n, native) for n in names]
    known = {n for s in label_sets.LABEL_SETS.values() for n in s}
    unknown = [n for n, c in zip(names, cols) if c is None and n not in known]
    if unknown:
        raise UserError(
            f"--labels: {source.name} has no label {', '.join(map(repr, unknown))}; it has {', '.join(native)}"
        )
    return tuple(names), cols


def _skip_bad_labels(df, bad_cells, names, skipped) -> None:
    """One ``skipped`` entry per row with an unknown label value (the reason names its first bad cell)."""
    idx = np.flatnonzero(bad_cells.any(axis=1))
    first = bad_cells[idx].argmax(axis=1)
    lsrcs = df["_lsrc"].to_numpy()[idx] if "_lsrc" in df else [None] * len(idx)
    for i, j, src, ls in zip(idx, first, row_sources(df, idx), lsrcs):
        reason = f"unknown label value '{cell_text(df.at[i, names[j]])}' in {names[j]}"
        skipped.append({"source": src, "reason": reason + (f" ({ls})" if isinstance(ls, str) else "")})


def _duplicates(df, bad, skipped) -> np.ndarray:
    """Rows whose key an earlier (valid) row holds, each listed in ``skipped``; the first occurrence wins."""
    live = df["key"].where(~pd.Series(bad))  # bad rows do not claim a key
    dup = (live.duplicated(keep="first") & live.notna()).to_numpy()
    if dup.any():
        idx = np.flatnonzero(dup)
        live_first = ~bad & ~dup
        first = dict(zip(df["key"].to_numpy()[live_first], np.flatnonzero(live_first)))
        for i, src in zip(idx, row_sources(df, idx)):
            k = df.at[i, "key"]
            skipped.append({"source": src, "reason": f"duplicate key {k} (first at {row_sources(df, [first[k]])[0]})"})
    return dup


def finish(
    raw: RawRows, *, source, root: Path, labels=None, views: str, policy: str, split: str, seed: int
) -> SourceTable:
    names, cols = choose_labels(labels, source, tuple(raw.labels))
    df = raw.df.reset_index(drop=True)
    counts = list(raw.counts)
    skipped = list(raw.skipped)

    # 1. labels: unknown values send the row to `skipped`
    values, bad_cells = parse_label_cells(df[list(raw.labels)])
    bad = bad_cells.any(axis=1)
    if bad.any():
        _skip_bad_labels(df, bad_cells, list(raw.labels), skipped)

    # 2. paths that leave the root (absolute, or climbing with ..): dropped before any file is opened, one
    #    reason for all, so the skip list never tells whether a file exists elsewhere
    path = strings(df["path"])
    dot, slash, back = (np.array(c, dtype=STR) for c in ("..", "/", "\\"))
    odd = (path == "") | np.strings.startswith(path, slash) | (np.strings.find(path, dot) >= 0)
    odd |= np.strings.find(path, back) >= 0  # the full rule only for these few, in Python (NUL: at opening)
    outside = ~bad & odd
    outside[outside] = [escapes(str(p)) for p in path[outside]]
    if outside.any():
        idx = np.flatnonzero(outside)
        skipped += [{"source": src, "reason": OUTSIDE} for src in row_sources(df, idx)]
        bad = bad | outside

    # 3. duplicate keys
    keep = ~bad & ~_duplicates(df, bad, skipped)
    df, values = df.loc[keep].reset_index(drop=True), values[keep]
    counts.append(("valid rows", int(len(df))))
    if df.empty:  # a header-only CSV, or every row skipped: say so now, not at `cxrdist train`
        raise UserError(no_rows_message(root, counts, skipped))

    # 4. split: over all valid rows, before the view filter and independent of the uncertainty policy
    #    (balanced on the source's raw positives), so one seed gives every patient the same split for any
    #    --views/--policy/--labels
    official = df["_official"] if "_official" in df else None
    if raw.split_from_file:  # e.g. Google's expert labels: their Set Id is the split, whatever --split says
        split = "official"
    split_col, info = assign_splits(
        df["patient_id"], values == 1.0, method=split, seed=seed, official=official, rest=source.official_rest
    )
    if split == "official" and raw.official_note:
        info["note"] = raw.official_note

    # 5. view filter
    if views == "frontal":
        keep = df["view"].isin(FRONTAL_VIEWS).to_numpy()
        if source.frontal_only:
            keep = keep | (df["view"] == "").to_numpy()
        counts.append((f"frontal views ({', '.join(FRONTAL_VIEWS)})", int(keep.sum())))
        df, values, split_col = df.loc[keep].reset_index(drop=True), values[keep], split_col[keep]

    # 6. uncertainty policy, then the chosen labels (a label the source lacks: masked out everywhere)
    lab, mask = apply_policy(values, policy)
    index = {n: j for j, n in enumerate(raw.labels)}
    out = {c: df[c].to_numpy(dtype=object) for c in ("key", "path", "patient_id", "study_id", "view", "sex")}
    out["age"] = pd.to_numeric(df["age"], errors="coerce").to_numpy(np.float64)
    lab_cols, mask_cols = label_columns(names)
    for name, col, mcol in zip(lab_cols, cols, mask_cols):
        out[name] = lab[:, index[col]] if col else np.zeros(len(df), np.float32)
        out[mcol] = mask[:, index[col]] if col else np.zeros(len(df), np.int8)
    out["split"] = np.asarray(SPLIT_NAMES, dtype=object)[split_col]
    table = pd.DataFrame(out, columns=table_columns(names))
    if "boxes" in df:  # radiologists' boxes (RSNA, NIH's BBox_List): (label, x, y, w, h) in the file's pixels
        table["boxes"] = [tuple(b) if isinstance(b, tuple | list) else () for b in df["boxes"]]
    for c in ("key", "path", "patient_id", "study_id", "view", "sex", "split"):
        table[c] = table[c].astype(str)
    missing = tuple(n for n, c in zip(names, cols) if c is None)
    notes = list(raw.notes)
    if missing:
        notes.append(f"{source.name} provides no {', '.join(missing)}: masked out (mask 0) in every sample")
    return SourceTable(
        df=table,
        counts=counts,
        skipped=skipped,
        root=Path(root).resolve(),
        source=source.name,
        policy=policy,
        split=split,
        views=views,
        label_names=names,
        split_info=info,
        notes=notes,
        labels_missing=missing,
        unparseable={c: n for c, n in raw.unparseable.items() if n},
        protocol=raw.protocol,
    )


def no_rows_message(root, counts, skipped) -> str:
    first = f"; first skipped: {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
    return f"{root}: no usable rows ({' → '.join(f'{step} {n:,}' for step, n in counts)}){first}"


def check_choices(views: str, policy: str, split: str) -> None:
    for what, value, choices in (
        ("views", views, VIEW_CHOICES),
        ("policy", policy, POLICIES),
        ("split", split, SPLIT_CHOICES),
    ):
        if value not in choices:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def check_options(source, options: dict) -> None:
    """A reader option the source has no use for (``--expert-labels`` with CheXpert) is refused, not dropped."""
    import inspect

    takes = set(inspect.signature(source.read).parameters) - {"root", "official"}
    for name in options:
        if name not in takes:
            flag = "--" + name.replace("_", "-")
            users = ", ".join(sorted(takes)) or "none"
            raise UserError(f"{flag} is not an option of --source {source.name} (its options: {users})")
