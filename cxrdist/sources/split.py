"""Patient-wise splits, balanced on label prevalence; the official splits.

``patient_split`` draws K seeded patient permutations (vectorised: per-patient row and positive counts,
one cumulative sum and one small matrix product per candidate), cuts each at the row fractions, and keeps
the candidate whose largest prevalence difference between splits (over the labels) is smallest. No
patient is in two splits; the result depends only on the seed and the data (patients are ordered by id).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_CANDIDATES = 48


def _gap(pos: np.ndarray, den: np.ndarray, active: np.ndarray) -> float:
    """Largest (max - min) prevalence over the active splits, over labels; pos/den: splits x labels."""
    with np.errstate(invalid="ignore", divide="ignore"):
        prev = pos[active] / den[active]
    if prev.shape[0] < 2:
        return 0.0
    spread = np.nanmax(prev, axis=0) - np.nanmin(prev, axis=0)
    return float(np.nanmax(spread)) if np.isfinite(spread).any() else 0.0


def patient_split(
    patient_ids,
    positives: np.ndarray,
    *,
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
    candidates: int = DEFAULT_CANDIDATES,
) -> tuple[np.ndarray, dict]:
    """Assign every row to split 0/1/2 (train/val/test) patient-wise.

    ``positives``: N x L booleans (a row is positive for a label); prevalence = positives / rows.
    Fractions are of rows (images), met to within one patient. Every split with a positive fraction gets
    at least one patient when there are enough patients. Returns (int8 codes, info).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    fractions = fractions / fractions.sum()
    codes, uniques = pd.factorize(pd.Series(patient_ids).astype(str), sort=True)
    n_pat = len(uniques)
    positives = np.asarray(positives, dtype=np.float64).reshape(len(codes), -1)
    info = {
        "method": "patient",
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "candidates": int(candidates),
        "patients": int(n_pat),
    }
    if n_pat == 0:
        info["max_prevalence_gap"] = 0.0
        return np.zeros(0, dtype=np.int8), info
    rows = np.bincount(codes, minlength=n_pat).astype(np.float64)
    pos = (
        np.stack(
            [np.bincount(codes, weights=positives[:, j], minlength=n_pat) for j in range(positives.shape[1])], axis=1
        )
        if positives.shape[1]
        else np.zeros((n_pat, 0))
    )
    total = rows.sum()
    targets = np.cumsum(fractions)[:-1] * total
    need = fractions > 0
    active = need.copy()

    best_gap, best_assign = np.inf, None
    for rng in (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(max(1, candidates))):
        perm = rng.permutation(n_pat)
        cum = np.concatenate([[0.0], np.cumsum(rows[perm])])
        b1, b2 = (int(np.abs(cum - t).argmin()) for t in targets)
        if n_pat >= need.sum():
            b1 = int(np.clip(b1, 1 if need[0] else 0, n_pat - need[1] - need[2]))
            b2 = int(np.clip(b2, b1 + need[1], n_pat - need[2]))
            if not need[1]:
                b2 = b1 if need[2] else n_pat
        b2 = max(b1, b2)
        in_perm = np.zeros(n_pat, dtype=np.int8)
        in_perm[b1:b2], in_perm[b2:] = 1, 2
        assign = np.empty(n_pat, dtype=np.int8)
        assign[perm] = in_perm
        onehot = np.eye(3)[assign]  # patients x 3
        gap = _gap(onehot.T @ pos, (onehot.T @ rows)[:, None], active)
        if gap < best_gap:
            best_gap, best_assign = gap, assign
    info["max_prevalence_gap"] = round(best_gap, 6)
    info["patients_per_split"] = {n: int((best_assign == i).sum()) for i, n in enumerate(SPLIT_NAMES)}
    return best_assign[codes], info


def assign_splits(
    patient_ids: pd.Series,
    positives: np.ndarray,
    *,
    method: str,
    seed: int = 0,
    official: pd.Series | None = None,
    rest: tuple[float, float, float] = (0.9, 0.0, 0.1),
) -> tuple[np.ndarray, dict]:
    """Split codes (0 train, 1 val, 2 test) for every row, and a description.

    ``method="patient"``: patient-wise 80/10/10 over all rows. ``method="official"``: rows whose
    ``official`` is set keep it (MIMIC's split.csv, CheXpert's valid.csv, NIH's test_list.txt); the other rows
    (CheXpert's train.csv, NIH's train_val_list.txt) are split patient-wise by the source's ``rest``
    fractions (CheXpert 90/0/10 train/val/test, NIH 90/10/0); a patient with any official row goes wholly to
    that row's split, so no patient is in two splits.
    """
    patient_ids = pd.Series(patient_ids).reset_index(drop=True).astype(str)
    if method == "patient" or official is None:
        return patient_split(patient_ids, positives, seed=seed)
    off = pd.Series(official).reset_index(drop=True)
    fixed_codes = off.map({n: i for i, n in enumerate(SPLIT_NAMES)})
    # a patient with an official row takes that row's split (the first one seen, if several)
    per_patient = fixed_codes.groupby(patient_ids).first()
    fixed = patient_ids.map(per_patient).to_numpy(dtype=np.float64)
    out = np.zeros(len(patient_ids), dtype=np.int8)
    have = ~np.isnan(fixed)
    out[have] = fixed[have].astype(np.int8)
    info = {"method": "official", "seed": int(seed)}
    open_ = ~have
    if open_.any():
        sub, sub_info = patient_split(patient_ids[open_], np.asarray(positives)[open_], fractions=rest, seed=seed)
        out[open_] = sub
        info["unassigned_rows_split"] = {k: sub_info[k] for k in ("fractions", "candidates", "max_prevalence_gap")}
    info["patients_per_split"] = {n: int(patient_ids[out == i].nunique()) for i, n in enumerate(SPLIT_NAMES)}
    return out, info
