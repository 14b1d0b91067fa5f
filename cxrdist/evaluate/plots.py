"""The evaluation's figures (matplotlib, Agg, PNG): ROC and precision-recall per label with the operating
point marked, the reliability diagram before and after temperature scaling, the subgroup gap chart."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cxrdist import metrics
from cxrdist.evaluate.record import Predictions, column, entries, scaled


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(5, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    margins(fig, left=0.6, bottom=0.5)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, list(axes.flat[:n])


def margins(fig, left: float, bottom: float, top: float = 0.3, right: float = 0.15) -> None:
    """Fixed margins in inches and gaps for a panel's title and axis labels. Not ``tight_layout``: it measures
    every label's text by drawing the figure once more, ~0.5 s a figure, a second or two of every `cxrdist
    eval`, for panels whose labels are the same every time."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=0.35, hspace=0.45
    )


def _save(plt, fig, path: Path) -> str:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def curves(pred: Predictions, m: dict, out: Path, kind: str) -> str:
    """``roc.png`` or ``pr.png``: one panel per label, the operating point as a dot."""
    plt, fig, axes = _grid(len(pred.names))
    for j, (name, ax) in enumerate(zip(pred.names, axes)):
        y, p = column(pred, j)
        rec = m["labels"][name]
        ax.set_title(name, fontsize=9)
        if len(np.unique(y)) < 2:
            ax.text(0.5, 0.5, "undefined", ha="center")
            continue
        t = rec["threshold"]
        if kind == "roc":
            fpr, tpr, _ = metrics.roc_points(y, p)
            ax.plot(fpr, tpr, lw=1.2)
            ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
            if t is not None:
                ax.plot(1 - rec["specificity"], rec["sensitivity"], "o", c="C3", ms=4)
            ax.set_xlabel("1 - specificity", fontsize=8)
            ax.set_ylabel("sensitivity", fontsize=8)
            ax.text(0.95, 0.05, f"AUROC {100 * rec['auroc'][0]:.1f}", ha="right", fontsize=8)
        else:
            precision, recall, _ = metrics.pr_points(y, p)
            ax.step(recall, precision, where="post", lw=1.2)
            ax.axhline((y >= 0.5).mean(), ls=":", c="grey", lw=0.8)
            if t is not None and rec["ppv"] is not None:
                ax.plot(rec["sensitivity"], rec["ppv"], "o", c="C3", ms=4)
            ax.set_xlabel("recall", fontsize=8)
            ax.set_ylabel("precision", fontsize=8)
            ax.text(0.95, 0.9, f"AUPRC {100 * rec['auprc'][0]:.1f}", ha="right", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    return _save(plt, fig, out / f"{kind}.png")


def reliability(pred: Predictions, m: dict, out: Path) -> str:
    plt, fig, (ax,) = _grid(1)
    temperature = m["calibration"]["temperature"]
    for prob, label in ((pred.prob, "as trained"), (scaled(pred, temperature), f"T = {temperature:.2f}")):
        p, y = entries(pred, prob)
        r = metrics.reliability(p, y)
        keep = np.asarray(r["n"]) > 0
        ax.plot(np.asarray(r["confidence"])[keep], np.asarray(r["observed"])[keep], "o-", ms=3, label=label)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"reliability ({m['split']}, all labels)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "reliability.png")


def subgroup_gaps(m: dict, out: Path) -> str:
    rows = [(f"{a}:{g}", r) for a, gs in m["subgroups"].items() for g, r in gs.items()]
    plt, fig, (ax,) = _grid(1)
    fig.set_size_inches(6.4, 0.3 * len(rows) + 1.5)
    margins(fig, left=1.0, bottom=0.6)  # the group names left of the bars
    names = [n for n, _ in rows]
    gaps = [100 * (r["tpr_gap"] or 0.0) for _, r in rows]
    ax.barh(names, gaps, color=["C3" if g < 0 else "C0" for g in gaps])
    ax.axvline(0, c="k", lw=0.8)
    ax.set_xlabel("TPR gap vs the attribute's median group (percentage points)")
    ax.invert_yaxis()
    return _save(plt, fig, out / "subgroups.png")


def all_plots(pred: Predictions, m: dict, out: Path) -> list[str]:
    return [curves(pred, m, out, "roc"), curves(pred, m, out, "pr"), reliability(pred, m, out), subgroup_gaps(m, out)]
