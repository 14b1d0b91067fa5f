"""The cross-dataset AUROC matrix (`cxrdist report --matrix RUN… --out DIR`): how a model trained on one
hospital's data does on another's, the central result of CheXclusion and torchxrayvision's domain studies.

Each run's evaluations are collected from its folder: ``eval/<split>/metrics.json`` (its own test split:
the diagonal, in-distribution) and ``eval/<split>@<shards>/metrics.json`` (``cxrdist eval --shards X
--map-labels``: another source). A row is a training run (named by its folder and its training source), a
column a test source (the protocol's source). A cell is the mean AUROC over the labels the evaluation scored,
which for another source are the findings both label sets define (``labels.overlap``), with the patient-
bootstrap interval ``eval`` computed from the same replicates as its labels'. Nothing is recomputed: the
matrix is what the evaluations said. A run trained on a mix of sources (``chexpert+nih``) is in-distribution
on each of them: its own evaluation scored each source's rows apart (``by_source``), and those are its cells.

Writes ``matrix.csv`` (one row per run; per test source its mean, low, high and each label's AUROC),
``matrix.md`` (the table, the diagonal marked) and ``matrix.png`` (a heat map, intervals in the cells).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from cxrdist.atomic import atomic_write_bytes
from cxrdist.errors import UserError
from cxrdist.metrics import fmt_interval
from cxrdist.runfolder import EVAL


@dataclass
class Row:
    """One training run's evaluations: test source -> {mean: [pt, lo, hi], labels: {name: [pt, lo, hi]}}."""

    run: str
    source: str  # what it trained on: its own test split's protocol source
    cells: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.run} ({self.source})"


def source_of(protocol: str) -> str:
    """``chexpert/patient-80-10-10 seed 0`` -> ``chexpert``; ``nih/google-expert-2019`` -> ``nih``."""
    return str(protocol).split("/", 1)[0] or "?"


def read_row(run: Path, split: str = "test") -> Row:
    """A run's own evaluation of ``split`` and its evaluations on other shards; refused when it has none of
    its own (its training source is read from there)."""
    folder = Path(run) / EVAL
    own = folder / split / "metrics.json"
    if not own.is_file():
        raise UserError(f"{run}: no {EVAL}/{split}/metrics.json: run `cxrdist eval --run {run} --split {split}` first")
    found = {own: _load(own)}
    for path in sorted(folder.glob(f"{split}@*/metrics.json")):
        found[path] = _load(path)
    row = Row(run=Path(run).name, source=source_of(found[own]["protocol"]))
    for source, part in (found[own].get("by_source") or {}).items():  # a mix: each source's rows
        row.cells[source] = {"mean": (part.get("mean") or {}).get("all"), "labels": {}, "n": part.get("n")}
    for path, m in found.items():
        target = source_of(m["protocol"])
        if path == own and m.get("by_source"):
            continue
        if target in row.cells:  # two evaluations on one source: refused, naming the second
            raise UserError(f"{path}: a second evaluation of {run} on {target}; keep one per test source")
        row.cells[target] = {
            "mean": (m.get("mean") or {}).get("all"),
            "labels": {name: r.get("auroc") for name, r in m.get("labels", {}).items()},
            "n": m.get("n"),
        }
    return row


def in_distribution(row: Row, test: str) -> bool:
    """The test source is (one of) the run's training sources."""
    return test in row.source.split("+")


def _load(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable metrics.json: {e}") from None
    if not isinstance(m, dict) or "protocol" not in m:
        raise UserError(f"{path}: not an evaluation's metrics.json (no protocol)")
    return m


def columns(rows: list[Row]) -> list[str]:
    """Test sources in the order the training sources first name them, then the others (the diagonal first)."""
    have = {t for r in rows for t in r.cells}
    order = [s for s in dict.fromkeys(s for r in rows for s in r.source.split("+")) if s in have]
    return order + sorted(have - set(order))


def to_csv(rows: list[Row], cols: list[str]) -> str:
    labels = {c: sorted({n for r in rows for n in (r.cells.get(c) or {}).get("labels", {})}) for c in cols}
    header = ["run", "train_source"]
    for c in cols:
        header += [f"{c} mean", f"{c} low", f"{c} high", f"{c} n"] + [f"{c}:{n}" for n in labels[c]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        line: list = [r.run, r.source]
        for c in cols:
            cell = r.cells.get(c) or {}
            line += [*(cell.get("mean") or [None, None, None]), cell.get("n")]
            line += [(cell.get("labels", {}).get(n) or [None])[0] for n in labels[c]]
        w.writerow(["" if v is None else v for v in line])
    return buf.getvalue()


def markdown(rows: list[Row], cols: list[str]) -> str:
    head = "| trained on \\ tested on | " + " | ".join(cols) + " |"
    lines = [
        "# Cross-dataset AUROC",
        "",
        "Mean AUROC over the labels both sets define (95% patient-bootstrap interval), as each run's "
        "`cxrdist eval` measured it. **Bold**: the diagonal, in-distribution (the run's own test split); the "
        "other cells are out-of-distribution (`eval --shards X --map-labels`). Per-label values: matrix.csv.",
        "",
        head,
        "|" + "---|" * (len(cols) + 1),
    ]
    for r in rows:
        cells = []
        for c in cols:
            mean = (r.cells.get(c) or {}).get("mean")
            text = fmt_interval(mean) if mean else "—"
            cells.append(f"**{text}**" if in_distribution(r, c) and mean else text)
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n![the matrix as a heat map](matrix.png)\n"


def plot(rows: list[Row], cols: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            mean = (r.cells.get(c) or {}).get("mean")
            if mean:
                values[i, j] = mean[0]
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(cols), 1.2 + 0.8 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.5, vmax=1.0)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            mean = (r.cells.get(c) or {}).get("mean")
            text = "—" if not mean else f"{mean[0]:.3f}" + ("" if mean[1] is None else f"\n{mean[1]:.3f}–{mean[2]:.3f}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if mean and mean[0] < 0.8 else "k")
            if in_distribution(r, c):  # inset, so that two diagonal cells of a 2 x 2 do not outline all four
                ax.add_patch(plt.Rectangle((j - 0.44, i - 0.44), 0.88, 0.88, fill=False, ec="red", lw=2, ls="--"))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [r.name for r in rows])
    ax.set_xlabel("tested on (dashed red: in-distribution)")
    ax.set_ylabel("trained on")
    fig.colorbar(im, ax=ax, label="mean AUROC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_matrix(runs: list[Path], out: Path, split: str = "test") -> list[Row]:
    """Collect, then write matrix.csv, matrix.md and matrix.png under ``out``; returns the rows."""
    if not runs:
        raise UserError("--matrix: name at least one run folder")
    rows = [read_row(Path(r), split) for r in runs]
    cols = columns(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "matrix.csv", to_csv(rows, cols).encode())
    atomic_write_bytes(out / "matrix.md", markdown(rows, cols).encode())
    plot(rows, cols, out / "matrix.png")
    return rows
