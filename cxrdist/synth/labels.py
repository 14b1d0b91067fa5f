"""Synthetic labels: real prevalences with realistic co-occurrence (a shared "sick" factor and a
"heart failure" factor)."""

from __future__ import annotations

import math

import numpy as np

from cxrdist.labels import OBSERVATIONS

# CheXpert training-set fractions: observation -> (positive, uncertain).
PREVALENCE: dict[str, tuple[float, float]] = {
    "Support Devices": (0.519, 0.005),
    "Lung Opacity": (0.473, 0.025),
    "Pleural Effusion": (0.386, 0.052),
    "Edema": (0.234, 0.058),
    "Atelectasis": (0.149, 0.151),
    "Cardiomegaly": (0.121, 0.036),
    "No Finding": (0.100, 0.0),
    "Pneumothorax": (0.087, 0.014),
    "Consolidation": (0.066, 0.124),
    "Enlarged Cardiomediastinum": (0.048, 0.056),
    "Lung Lesion": (0.041, 0.007),
    "Fracture": (0.040, 0.003),
    "Pneumonia": (0.027, 0.084),
    "Pleural Other": (0.016, 0.012),
}
PATHOLOGIES = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices"))


# Loadings of each pathology's latent score on the shared "sick" factor and the "heart failure" factor.
_SICK_LOADING = 0.25  # calibrated so that ~10% of rows have no pathology at all (= No Finding)
_HF_LOADING = {"Edema": 0.6, "Pleural Effusion": 0.45, "Cardiomegaly": 0.5, "Enlarged Cardiomediastinum": 0.35}
_EXPLICIT_NEGATIVE = 0.2  # share of negatives written as 0.0 rather than left blank


# ============================================================================================ labels


def sample_labels(
    rng: np.random.Generator,
    n: int,
    names: tuple[str, ...] = OBSERVATIONS,
    prevalence: dict[str, tuple[float, float]] | None = None,
    heart_failure: dict[str, float] | None = None,
    clear: str | None = "No Finding",
) -> np.ndarray:
    """Raw label states, ``n`` x len(names) int8 in ``names`` order: 1 positive, -1 uncertain, 0 negative.
    Each label's counts hit its ``prevalence`` (positive, uncertain) exactly (rank thresholds on a correlated
    latent score); ``clear`` (CheXpert's No Finding) is 1 exactly where no pathology is positive or
    uncertain. Defaults: CheXpert's observations and training-set fractions."""
    prevalence = PREVALENCE if prevalence is None else prevalence
    heart_failure = _HF_LOADING if heart_failure is None else heart_failure
    g = rng.standard_normal(n)  # how sick
    h = rng.standard_normal(n)  # heart failure: edema + effusion + cardiomegaly
    states = np.zeros((n, len(names)), np.int8)
    for j, name in enumerate(names):
        if name == clear:
            continue
        a = 0.3 if name == "Support Devices" else _SICK_LOADING
        b = heart_failure.get(name, 0.0)
        z = a * g + b * h + math.sqrt(1.0 - a * a - b * b) * rng.standard_normal(n)
        pos, unc = prevalence[name]
        order = np.argsort(-z, kind="stable")
        n_pos = int(round(pos * n))
        n_unc = int(round(unc * n))
        states[order[:n_pos], j] = 1
        states[order[n_pos : n_pos + n_unc], j] = -1
    if clear is not None:
        path_cols = [names.index(p) for p in PATHOLOGIES]
        none = (states[:, path_cols] == 0).all(axis=1)
        states[none, names.index(clear)] = 1
    return states


def _cells(states: np.ndarray, rng: np.random.Generator, *, valid: bool = False) -> list[list[str]]:
    """Label states -> CSV cells. Train: '1.0', '-1.0', '0.0' (sometimes) or '' (No Finding: '1.0' or '').
    Valid (CheXpert valid.csv): every cell '1.0' or '0.0'."""
    table = []
    nf = OBSERVATIONS.index("No Finding")
    for row in states:
        out = []
        for j, s in enumerate(row):
            if valid:
                out.append("1.0" if s == 1 else "0.0")
            elif s == 1:
                out.append("1.0")
            elif s == -1:
                out.append("-1.0")
            elif j != nf and rng.random() < _EXPLICIT_NEGATIVE:
                out.append("0.0")
            else:
                out.append("")
        table.append(out)
    return table


def _resolve_uncertain(states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CheXpert's valid set has no uncertain labels: map each to 0 or 1 and recompute No Finding."""
    s = states.copy()
    unc = s == -1
    s[unc] = np.where(rng.random(int(unc.sum())) < 0.5, 1, 0)
    path_cols = [OBSERVATIONS.index(p) for p in PATHOLOGIES]
    s[:, OBSERVATIONS.index("No Finding")] = (s[:, path_cols] == 0).all(axis=1)
    return s


def _strengths(states: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """One row of states -> {finding: drawing strength}: positive 1.0, uncertain 0.5 or nothing."""
    out = {}
    for j, name in enumerate(OBSERVATIONS):
        if name == "No Finding":
            continue
        if states[j] == 1:
            out[name] = 1.0
        elif states[j] == -1 and rng.random() < 0.5:
            out[name] = 0.5
    return out


# NIH ChestX-ray14 (Data_Entry_2017_v2020.csv) fractions of 112,120 images; no uncertain labels
NIH_PREVALENCE: dict[str, tuple[float, float]] = {
    "Infiltration": (0.177, 0.0),
    "Effusion": (0.119, 0.0),
    "Atelectasis": (0.103, 0.0),
    "Nodule": (0.056, 0.0),
    "Mass": (0.052, 0.0),
    "Pneumothorax": (0.047, 0.0),
    "Consolidation": (0.042, 0.0),
    "Pleural_Thickening": (0.030, 0.0),
    "Cardiomegaly": (0.025, 0.0),
    "Emphysema": (0.022, 0.0),
    "Edema": (0.021, 0.0),
    "Fibrosis": (0.015, 0.0),
    "Pneumonia": (0.013, 0.0),
    "Hernia": (0.002, 0.0),
}
