"""Per-label and mean AUC (scikit-learn) and accuracy at 0.5, plus CheXclusion-style subgroups.

Inputs are whole-split arrays gathered across ranks *by key* (each sample exactly once). A label whose
masked-in targets hold one class only has an undefined AUC: reported as ``None`` and left out of the mean,
never as 0.5.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

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
        auc[name] = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None
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


def evaluate_arrays(keys: list[str], names, probs, labels, mask, sex, age) -> dict:
    """The full evaluation record; checks that every key is there exactly once."""
    if len(set(keys)) != len(keys):
        dup = len(keys) - len(set(keys))
        raise RuntimeError(f"evaluation saw {dup} samples more than once; the eval loader must be exact-once")
    result = label_metrics(probs, labels, mask, names)
    result["labels"] = list(names)
    result["subgroups"] = subgroup_metrics(probs, labels, mask, sex, age, names)
    return result


def fmt(value: float | None, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undef"
    return f"{100 * value:.2f}" if percent else f"{value:.4f}"
