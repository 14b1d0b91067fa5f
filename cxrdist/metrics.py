"""Per-label and mean AUC (our own, equal to scikit-learn's) and accuracy at 0.5, plus CheXclusion-style subgroups.

Inputs are whole-split arrays gathered across ranks *by key* (each sample exactly once). A label whose
masked-in targets hold one class only has an undefined AUC: reported as ``None`` and left out of the mean,
never as 0.5.
"""

from __future__ import annotations

import warnings

import numpy as np

from cxrdist.labels import COMPETITION5, overlap

AGE_BANDS = ((0, 40, "0-40"), (40, 60, "40-60"), (60, 80, "60-80"), (80, 200, "80+"))


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def label_metrics(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, names) -> dict:
    """probs/labels/mask: N x L, columns named by ``names``. Returns auc/accuracy per label, their means,
    and n. A label masked out everywhere (one its source lacks) has both undefined."""
    auc, acc = {}, {}
    for j, name in enumerate(names):
        keep = mask[:, j] > 0
        y, p = labels[keep, j], probs[keep, j]
        acc[name] = float(((p >= 0.5) == (y >= 0.5)).mean()) if len(y) else None
        # the evaluation's own AUROC (equal to scikit-learn's, tests/test_evaluate.py): one code path, and no
        # scikit-learn import in every rank's start-up
        auc[name] = float(auroc_rows(p, y, np.ones((1, len(y))))[0]) if len(np.unique(y)) == 2 else None
    return {
        "auc": auc,
        "auc_mean": _mean(auc.values()),
        "accuracy": acc,
        "accuracy_mean": _mean(acc.values()),
        "n": int(len(probs)),
        "undefined_auc": [k for k, v in auc.items() if v is None],
    }


def subgroup_metrics(probs, labels, mask, sex, age, names) -> dict:
    """Mean AUC per sex and age band (CheXclusion reports these gaps)."""
    groups = {"sex:M": sex == 1.0, "sex:F": sex == 0.0}
    for lo, hi, name in AGE_BANDS:
        groups[f"age:{name}"] = (age >= lo) & (age < hi)
    out = {}
    for name, sel in groups.items():
        sel = np.asarray(sel, dtype=bool)
        if sel.sum() == 0:
            continue
        m = label_metrics(probs[sel], labels[sel], mask[sel], names)
        out[name] = {"n": int(sel.sum()), "auc_mean": m["auc_mean"], "accuracy_mean": m["accuracy_mean"]}
    return out


def evaluate_arrays(whole: dict, names, replicates: int = 0, seed: int = 0) -> dict:
    """The trainer's evaluation record of a whole split (``engine.evaluation.merge``'s dict): per-label AUC
    and accuracy, their means, subgroups; with ``replicates``, patient-bootstrap intervals of the 14-label and
    the competition-5 mean AUROC (``[value, low, high]``)."""
    probs, labels, mask = whole["prob"], whole["labels"], whole["mask"]
    result = label_metrics(probs, labels, mask, names)
    result["labels"] = list(names)
    result["subgroups"] = subgroup_metrics(probs, labels, mask, whole["sex"], whole["age"], names)
    if replicates:
        rank = ranking(probs, labels, mask, names, patient_weights(whole["patient_id"], replicates, seed))
        result["auc_mean_ci"], result["competition5"] = rank["mean"]["all"], rank["mean"]["competition5"]
    return result


def fmt_interval(value: list | None) -> str:
    """``[value, low, high]`` (fractions) as ``83.1 (80.2–85.9)`` in percent; ``undef`` for None."""
    if not value or value[0] is None:
        return "undef"
    if len(value) < 3 or value[1] is None:
        return f"{100 * value[0]:.1f}"
    return f"{100 * value[0]:.1f} ({100 * value[1]:.1f}–{100 * value[2]:.1f})"


# --------------------------------------------------------------------------------------------------------
# ranking metrics with patient-bootstrap intervals (vectorised over replicates)
# --------------------------------------------------------------------------------------------------------
# Each metric is computed for R rows of sample weights at once: row 0 all ones (the point estimate, equal to
# scikit-learn's, which tests/test_metrics.py checks), rows 1.. a patient bootstrap (a patient drawn k times
# weighs k on each of its images). Sorting happens once per label, not once per replicate, which is what makes
# 1,000 replicates of a 5k-image split take well under a second per label.
REPLICATES, CONFIDENCE = 1000, 0.95


def patient_weights(patients, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """(1 + replicates) x N image weights: a row of ones, then per replicate the number of times each image's
    patient was drawn when drawing as many patients as there are, with replacement (seeded)."""
    _, codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    n_pat = int(codes.max()) + 1 if len(codes) else 0
    draws = np.random.default_rng(seed).integers(0, max(n_pat, 1), size=(replicates, n_pat))
    offsets = (np.arange(replicates)[:, None] * n_pat + draws).ravel()
    counts = np.bincount(offsets, minlength=replicates * n_pat).reshape(replicates, n_pat)
    return np.concatenate([np.ones((1, len(codes))), counts[:, codes].astype(np.float64)])


def _runs(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each run of tied scores in a sorted vector: its start and its end (exclusive), and each element's
    run number."""
    new = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts = np.flatnonzero(new)
    return starts, np.r_[starts[1:], len(sorted_scores)], np.cumsum(new) - 1


def _cumsum_from_zero(x: np.ndarray) -> np.ndarray:
    """Column-wise running sums with a leading zero column: out[:, k] = sum of x[:, :k]."""
    out = np.zeros((x.shape[0], x.shape[1] + 1))
    np.cumsum(x, axis=1, out=out[:, 1:])
    return out


def auroc_rows(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC under each row of weights ``w`` (R x n): the weighted Mann-Whitney statistic, ties counting
    half. NaN where a row has no positive or no negative weight."""
    if not len(score):
        return np.full(len(w), np.nan)
    order = np.argsort(score, kind="stable")
    pos, w = y[order] >= 0.5, w[:, order]
    starts, ends, run = _runs(score[order])
    neg = _cumsum_from_zero(w * ~pos)  # negative weight below each position
    at = np.flatnonzero(pos)  # only positives' columns: they are the minority for nearly every finding
    wp, r = w[:, at], run[at]
    credit = 0.5 * (neg[:, starts[r]] + neg[:, ends[r]])  # below the tie run, plus half of it
    num = (wp * credit).sum(axis=1)
    den = wp.sum(axis=1) * neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def auprc_rows(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's definition: sum over thresholds of recall gained x precision) under
    each row of weights. NaN where a row has no positive weight."""
    if not len(score):
        return np.full(len(w), np.nan)
    order = np.argsort(-score, kind="stable")
    pos, w = y[order] >= 0.5, w[:, order]
    _, ends, _ = _runs(-score[order])
    tp = _cumsum_from_zero(w * pos)[:, ends]  # at each threshold (the end of a tie run)
    called = _cumsum_from_zero(w)[:, ends]
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(called > 0, tp / called, 0.0)
        gained = np.diff(tp, axis=1, prepend=0.0) / total
        return np.where(total[:, 0] > 0, (gained * precision).sum(axis=1), np.nan)


def interval(rows: np.ndarray, confidence: float = CONFIDENCE) -> list | None:
    """[point, low, high] from a (1 + R) vector (row 0 the point estimate): the percentile bootstrap interval
    over the replicates where the metric is defined. None when the point is undefined."""
    point, reps = rows[0], rows[1:]
    if not np.isfinite(point):
        return None
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return [float(point), None, None]
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return [float(point), float(lo), float(hi)]


CURVES = {"auroc": auroc_rows, "auprc": auprc_rows}


def ranking(
    probs: np.ndarray, labels: np.ndarray, mask: np.ndarray, names, weights: np.ndarray, kinds=("auroc", "auprc")
) -> dict:
    """Per label AUROC and AUPRC (``kinds``) as [value, low, high] (each over its masked-in rows; None where
    undefined), the 14-label and competition-5 mean AUROCs with intervals from the same replicates, and the
    replicate rows (``rows``) for callers that combine them further."""
    rows: dict[str, dict] = {k: {} for k in kinds}
    for j, name in enumerate(names):
        keep = mask[:, j] > 0
        w, y, p = weights[:, keep], labels[keep, j], probs[keep, j]
        for k in kinds:
            rows[k][name] = CURVES[k](p, y, w)
    comp5 = [have for _, have in overlap(COMPETITION5, names)]
    means = {"all": mean_rows(rows["auroc"], names), "competition5": mean_rows(rows["auroc"], comp5)}
    return {
        "labels": {n: {k: interval(rows[k][n]) for k in kinds} for n in names},
        "mean": {k: None if v is None else interval(v) for k, v in means.items()},
        "competition5_labels": comp5,
        "rows": rows,
    }


def mean_rows(per_label: dict[str, np.ndarray], names) -> np.ndarray | None:
    """The mean over ``names`` (those whose point estimate is defined) per replicate, for the mean's interval
    from the same replicates; None when none is defined."""
    rows = [per_label[n] for n in names if n in per_label and np.isfinite(per_label[n][0])]
    if not rows:
        return None
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate without one rare label's positives
        return np.nanmean(np.stack(rows), axis=0)


# --------------------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------------------
RULES = ("youden", "f1")


def threshold_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct score as a threshold, highest first: (false positives, true positives, thresholds) of
    calling ``p >= threshold`` positive (scikit-learn's confusion_matrix_at_thresholds, unweighted).

    Written here, with ``roc_points`` and ``pr_points``, for the reason ``label_metrics`` gives: scikit-learn's
    import costs every `cxrdist eval` 1.5-2.5 s for three cumulative sums (tests/test_evaluate.py checks them
    against scikit-learn's curves)."""
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")
    score, pos = np.asarray(p, dtype=np.float64)[order], np.asarray(y)[order] >= 0.5
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last sample of each run of tied scores
    tps = np.cumsum(pos, dtype=np.float64)[last]
    return 1.0 + last - tps, tps, score[last]


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds) from (0, 0) at +inf, every distinct score a point
    (scikit-learn's ``roc_curve(drop_intermediate=False)``)."""
    fps, tps, thr = threshold_counts(y, p)
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thr]


def pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), recall decreasing and ending at (precision 1, recall 0), thresholds
    increasing (scikit-learn's ``precision_recall_curve``)."""
    fps, tps, thr = threshold_counts(y, p)
    precision = np.divide(tps, tps + fps, out=np.zeros_like(tps), where=(tps + fps) > 0)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1]


def operating_threshold(y: np.ndarray, p: np.ndarray, rule: str = "youden") -> float | None:
    """The threshold on ``p`` that maximises Youden's J (sensitivity + specificity - 1) or F1 on these
    targets (the validation split's); None when the label has one class here."""
    if len(np.unique(y)) < 2:
        return None
    if rule == "youden":
        fpr, tpr, thr = roc_points(y, p)
        best = int(np.argmax(tpr[1:] - fpr[1:])) + 1  # thr[0] is +inf: nothing called positive
        return float(thr[best])
    if rule == "f1":
        precision, recall, thr = pr_points(y, p)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        return float(thr[int(np.argmax(f1))])
    raise ValueError(f"operating point rule {rule!r}: one of {', '.join(RULES)}")


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def rates_at(y: np.ndarray, p: np.ndarray, threshold: float | None) -> dict:
    """Sensitivity, specificity, PPV and F1 of calling ``p >= threshold`` positive."""
    if threshold is None:
        return dict.fromkeys(("sensitivity", "specificity", "ppv", "f1"))
    call, pos = p >= threshold, y >= 0.5
    tp, fp = float((call & pos).sum()), float((call & ~pos).sum())
    fn, tn = float((~call & pos).sum()), float((~call & ~pos).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


# --------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------
ECE_BINS = 15


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error over equal-width confidence bins: sum over bins of the bin's share of the
    predictions x |observed positive rate - mean predicted probability|."""
    if not len(p):
        return None
    which = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, weights=y, minlength=bins) - np.bincount(which, weights=p, minlength=bins))
    return float(gap.sum() / n.sum())


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per bin: count, mean predicted probability, observed positive rate (the reliability diagram's data)."""
    which = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=p, minlength=bins) / n
        freq = np.bincount(which, weights=y, minlength=bins) / n
    return {"n": n.tolist(), "confidence": conf.tolist(), "observed": freq.tolist()}


def brier(p: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.mean((p - y) ** 2)) if len(p) else None


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The single temperature T minimising the binary cross-entropy of sigmoid(logit / T) on these entries
    (Guo et al. 2017, one T shared by all labels); 1.0 when there is nothing to fit."""
    from scipy.optimize import minimize_scalar

    if not len(logits) or len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))  # -log sigmoid terms, stable

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))
