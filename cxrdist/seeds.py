"""Seeds with intervals, as papers report them (CheXclusion: 5 seeds): an arm's runs over several seeds, and
whether two arms differ beyond the noise of seeds and test patients.

- ``describe``: per arm, the mean ± sd over seeds of test AUROC, competition-5, accuracy and epoch time
  (the poster's Table 3 with error bars).
- ``pooled``: the arm's mean AUROC with one interval that holds both sources of noise the paper's reader
  cares about: the seed-averaged AUROC under the same patient-bootstrap resamples of the test split
  (``metrics.patient_weights``), so the interval is over test patients for the mean over seeds.
- ``paired``: arm B minus arm A, seed by seed (the same seed: the same data order and initialisation
  stream), on the same test patients: the mean over seeds of the per-seed difference in mean AUROC under
  shared resamples. The percentile interval of that difference and a two-sided bootstrap p-value say
  whether the arms differ beyond noise (the paired bootstrap over patients; DeLong per label is the
  parametric cousin, per label only). Runs are matched on their test keys; a key one arm lacks is refused.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrdist import metrics
from cxrdist.errors import UserError

MEASURES = (  # report.csv's column, what the table calls it
    ("test_auc_pct", "test AUROC"),
    ("test_comp5_pct", "competition-5"),
    ("test_acc_pct", "test accuracy"),
    ("epoch_time_s", "epoch time (s)"),
)


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) over the finite values; sd NaN below two."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return math.nan, math.nan, 0
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else math.nan), len(v)


def describe(arms: dict[str, list[dict]]) -> dict[str, dict]:
    """{arm: {measure: (mean, sd, n)}} from each arm's runs (report rows: one per seed)."""
    return {arm: {col: mean_sd([r.get(col) for r in runs]) for col, _ in MEASURES} for arm, runs in arms.items()}


@dataclass
class Scored:
    """One seed's test predictions, aligned to a common key order: N x L probabilities, labels, masks."""

    seed: int
    keys: list[str]
    patients: list[str]
    prob: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def align(runs: list[Scored]) -> list[Scored]:
    """The runs reordered to the first run's keys; a run scored on other samples is refused."""
    keys = runs[0].keys
    out = []
    for r in runs:
        if sorted(r.keys) != sorted(keys):
            raise UserError(f"seed {r.seed}: its test split holds other samples than seed {runs[0].seed}'s")
        idx = {k: i for i, k in enumerate(r.keys)}
        order = np.asarray([idx[k] for k in keys])
        out.append(Scored(r.seed, list(keys), list(runs[0].patients), r.prob[order], r.labels[order], r.mask[order]))
    return out


def mean_auroc_rows(s: Scored, weights: np.ndarray) -> np.ndarray:
    """(1 + R) mean AUROC over the labels defined in this split, under ``weights`` (row 0: the point)."""
    per = {j: metrics.auroc_rows(s.prob[s.mask[:, j] > 0, j], s.labels[s.mask[:, j] > 0, j],
                                 weights[:, s.mask[:, j] > 0]) for j in range(s.prob.shape[1])}  # fmt: skip
    rows = np.stack([r for r in per.values() if np.isfinite(r[0])]) if per else np.zeros((0, len(weights)))
    if not len(rows):
        raise UserError(f"seed {s.seed}: no label has both classes in the test split")
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isfinite(rows), rows, np.nan), axis=0)


def pooled(runs: list[Scored], replicates: int = metrics.REPLICATES, seed: int = 0) -> list | None:
    """[mean over seeds, low, high]: the seed-averaged mean AUROC under shared patient resamples."""
    runs = align(runs)
    w = metrics.patient_weights(runs[0].patients, replicates, seed)
    return metrics.interval(np.mean([mean_auroc_rows(r, w) for r in runs], axis=0))


def paired(a: list[Scored], b: list[Scored], replicates: int = metrics.REPLICATES, seed: int = 0) -> dict:
    """B - A in mean AUROC, seed by seed on the same patients: the difference with its interval, the
    two-sided bootstrap p-value, and whether the interval excludes 0 (``differ``)."""
    common = sorted({r.seed for r in a} & {r.seed for r in b})
    if not common:
        raise UserError("the two arms share no seed: a paired comparison needs the same seeds in both")
    pick = lambda runs: [next(r for r in runs if r.seed == s) for s in common]  # noqa: E731
    both = align(pick(a) + pick(b))
    k = len(common)
    w = metrics.patient_weights(both[0].patients, replicates, seed)
    rows = np.mean([mean_auroc_rows(y, w) - mean_auroc_rows(x, w) for x, y in zip(both[:k], both[k:])], axis=0)
    diff = metrics.interval(rows)
    reps = rows[1:][np.isfinite(rows[1:])]
    p = min(1.0, 2 * min(np.mean(reps <= 0), np.mean(reps >= 0))) if len(reps) else math.nan
    return {"seeds": common, "difference": diff, "p": float(p), "differ": bool(diff and diff[1] is not None
            and (diff[1] > 0 or diff[2] < 0))}  # fmt: skip


# --- in `cxrdist report`: a section when an arm ran on several seeds -----------------------------------
def arm_of(row: dict) -> str:
    return "-".join(str(x) for x in (row.get("model"), row.get("backend"), row.get("format")) if x) or row["run"]


def read_scored(run_path: str, seed: int) -> Scored | None:
    """A run's ``eval/test/predictions.csv`` (the contract: key, patient_id, p:/y:/m:<label>), None if absent."""
    import pandas as pd

    from cxrdist.runfolder import RunFolder

    path = RunFolder(run_path).eval_dir("test") / "predictions.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"key": str, "patient_id": str})
    names = [c[2:] for c in df.columns if c.startswith("p:")]
    cols = lambda tag: df[[f"{tag}:{n}" for n in names]].to_numpy(np.float64)  # noqa: E731
    return Scored(seed, df["key"].tolist(), df["patient_id"].tolist(), cols("p"), cols("y"), cols("m"))


def _pm(stat: tuple[float, float, int], digits: int = 2) -> str:
    mean, sd, n = stat
    if not n:
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd:.{digits}f}")


def section(rows: list[dict], replicates: int = metrics.REPLICATES) -> str:
    """report.md's seeds section ('' when no arm ran on more than one seed)."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "completed":
            arms.setdefault(arm_of(r), []).append(r)
    if not any(len(v) > 1 for v in arms.values()):
        return ""
    stats = describe(arms)
    scored = {a: [read_scored(r["path"], int(r.get("seed") or 0)) for r in runs] for a, runs in arms.items()}
    complete = {a: s for a, s in scored.items() if s and all(x is not None for x in s)}
    lines = [
        "## Seeds (mean ± sd over seeds; pooled: the seed-averaged mean AUROC, 95% patient-bootstrap interval)",
        "",
        "| arm | seeds | " + " | ".join(name for _, name in MEASURES) + " | pooled mean AUROC |",
        "|---|---|" + "---|" * (len(MEASURES) + 1),
    ]
    for arm, runs in arms.items():
        pool = metrics.fmt_interval(pooled(complete[arm], replicates)) if arm in complete else "eval first"
        cells = [_pm(stats[arm][col], 1 if col == "epoch_time_s" else 2) for col, _ in MEASURES]
        seeds = ",".join(str(r.get("seed")) for r in runs)
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + f" | {pool} |")
    reference = next(iter(arms))
    others = [a for a in arms if a != reference and a in complete and reference in complete]
    if others:
        lines += ["", f"Paired against {reference} (the same seeds and test patients; B − A in mean AUROC):", "",
                  "| arm | seeds | difference (95% CI) | p | beyond noise |", "|---|---|---|---|---|"]  # fmt: skip
        for arm in others:
            d = paired(complete[reference], complete[arm], replicates)
            lines.append(f"| {arm} | {','.join(map(str, d['seeds']))} | {metrics.fmt_interval(d['difference'])} | "
                         f"{d['p']:.3f} | {'yes' if d['differ'] else 'no'} |")  # fmt: skip
    elif len(arms) > 1:
        lines += ["", "Paired comparisons need every seed's `cxrdist eval` (eval/test/predictions.csv)."]
    return "\n".join(lines) + "\n"
