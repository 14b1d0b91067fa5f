"""Published figures beside a run's own (`cxrdist report RUN… --published FILE`): the poster's Table 5 shape.

``FILE`` is a small csv, ``model,dataset,accuracy,auc,source``: accuracy and AUC in percent (blank or ``—``
where the paper gives none), ``source`` the citation. ``docs/published/poster_table5.csv`` ships the poster's
own Table 5. The comparison is labelled as published figures, not rerun: cxrdist cannot know the papers'
splits, label sets or preprocessing, and says so beside the table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from cxrdist.errors import UserError

COLUMNS = ("model", "dataset", "accuracy", "auc", "source")
NONE = ("", "—", "-", "n/a", "NA")
DATASETS = {  # a run's source (its test protocol's first part) as papers name the dataset
    "chexpert": "CheXpert",
    "mimic": "MIMIC-CXR",
    "nih": "NIH ChestX-ray14",
    "padchest": "PadChest",
    "rsna": "RSNA Pneumonia",
}
CAVEAT = (
    "Published figures are quoted as their papers report them, not rerun: splits, label sets, uncertainty "
    "policies and image sizes differ between papers, so a difference here is not a controlled comparison."
)


def _percent(text: str, where: str, column: str) -> float | None:
    text = text.strip().rstrip("%")
    if text in NONE:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {column} {text!r} is not a number (percent, or blank)") from None
    if not 0 <= value <= 100:
        raise UserError(f"{where}: {column} {value} is not a percentage (0-100)")
    return value


def read_published(path: Path) -> list[dict]:
    """The rows of a published-figures csv; a missing column or a bad value is one line naming file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise UserError(f"--published {path}: {e.strerror or e}") from None
    reader = csv.DictReader(lines)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                        f"(want {','.join(COLUMNS)})")  # fmt: skip
    rows = []
    for n, r in enumerate(reader, 2):
        where = f"{path}:{n}"
        if not (r.get("model") or "").strip() or not (r.get("dataset") or "").strip():
            raise UserError(f"{where}: model and dataset are required")
        rows.append(
            {
                "model": r["model"].strip(),
                "dataset": r["dataset"].strip(),
                "accuracy": _percent(r.get("accuracy") or "", where, "accuracy"),
                "auc": _percent(r.get("auc") or "", where, "auc"),
                "source": (r.get("source") or "").strip(),
                "kind": "published",
            }
        )
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def dataset_of(protocol: str, labels: str) -> str:
    """The dataset a run was tested on, as papers name it: its test protocol's source, else its label set."""
    source = str(protocol or "").split("/", 1)[0] or str(labels or "")
    return DATASETS.get(source, source or "?")


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def comparison(published: list[dict], runs) -> list[dict]:
    """Published rows, then each run's test accuracy and AUROC (``runs``: report.csv's rows), per dataset."""
    mine = [
        {
            "model": r.get("model_description") or r.get("model") or r["run"],
            "dataset": dataset_of(r.get("protocol", ""), r.get("labels", "")),
            "accuracy": _finite(r.get("test_acc_pct")),
            "auc": _finite(r.get("test_auc_pct")),
            "source": f"this run: {r['run']}" + (f" ({r['protocol']})" if r.get("protocol") else ""),
            "kind": "this run",
        }
        for r in runs
        if r.get("status") != "skipped"
    ]
    datasets = list(dict.fromkeys([p["dataset"] for p in published] + [m["dataset"] for m in mine]))
    rows = published + mine
    return [r for d in datasets for r in rows if r["dataset"] == d]


def markdown(rows: list[dict]) -> str:
    def pct(v):
        return "—" if v is None else f"{v:.2f}"

    lines = [
        "## Beside published figures (not rerun)",
        "",
        CAVEAT,
        "",
        "| model | dataset | accuracy | AUC | source |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        bold = "**" if r["kind"] == "this run" else ""
        lines.append(
            f"| {bold}{r['model']}{bold} | {r['dataset']} | {pct(r['accuracy'])} | {pct(r['auc'])} | {r['source']} |"
        )
    return "\n".join(lines) + "\n"
