"""The evaluation record of one split, and ``predictions.csv``, the file it is computed from.

Pure functions of the predictions: anyone holding ``predictions.csv`` recomputes every number of
``metrics.json`` with ``score`` (tests/test_evaluate.py does so independently with scikit-learn).

- Intervals: 95% percentile bootstrap resampling **patients** (seeded, 1,000 replicates by default); a
  mean's interval comes from the same replicates as its labels'.
- Operating points and the temperature are fitted on val (``fit_operating_points``) and applied to the
  split scored; on val itself they are fitted and applied on the same data (the report says so).
- Subgroups (CheXclusion, Seyyed-Kalantari et al. 2021): per sex, age band and view, the mean AUROC with its
  interval and the TPR gap: a group's true-positive rate at the operating point minus the median TPR of
  the attribute's groups, averaged over the labels defined in both.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cxrdist import metrics
from cxrdist.atomic import atomic_write_bytes
from cxrdist.errors import UserError
from cxrdist.shards.mix import of_source

LOGIT_CLIP = 1e-7  # probabilities are stored, logits recomputed from them: one path for run and CSV
SEX_NAMES = {1.0: "M", 0.0: "F"}


@dataclass
class Predictions:
    """One split's predictions, ordered by key: N x L probabilities, targets and masks, plus what the
    subgroups and the patient bootstrap need."""

    names: list
    key: list
    patient_id: list
    prob: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    sex: np.ndarray = field(default_factory=lambda: np.zeros(0))  # 1 M, 0 F, 0.5 unknown
    age: np.ndarray = field(default_factory=lambda: np.zeros(0))  # NaN unknown
    view: list = field(default_factory=list)

    @classmethod
    def from_merged(cls, whole: dict, names) -> Predictions:
        """From ``engine.evaluation.merge``'s dict."""
        return cls(
            list(names),
            list(whole["key"]),
            list(whole["patient_id"]),
            *(np.asarray(whole[k], np.float64) for k in ("prob", "labels", "mask", "sex", "age")),
            view=list(whole["view"]),
        )

    @property
    def n(self) -> int:
        return len(self.key)

    def rows(self, keep: np.ndarray) -> Predictions:
        """The predictions of the rows ``keep`` (a boolean mask) holds."""
        idx = np.flatnonzero(keep)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        arrays = {k: getattr(self, k)[idx] if len(getattr(self, k)) else getattr(self, k) for k in ("sex", "age")}
        return replace(self, key=pick(self.key), patient_id=pick(self.patient_id), prob=self.prob[idx],
                       labels=self.labels[idx], mask=self.mask[idx], view=pick(self.view) if self.view else [],
                       **arrays)  # fmt: skip

    def logits(self) -> np.ndarray:
        p = np.clip(self.prob, LOGIT_CLIP, 1 - LOGIT_CLIP)
        return np.log(p) - np.log1p(-p)

    def to_csv(self, path: Path) -> None:
        """``key, patient_id, p:<label>…, y:<label>…, m:<label>…, sex, age, view`` (the contract), atomically."""
        cols = {"key": self.key, "patient_id": self.patient_id}
        for tag, arr in (("p", self.prob), ("y", self.labels), ("m", self.mask)):
            cols |= {f"{tag}:{name}": arr[:, j] for j, name in enumerate(self.names)}
        cols |= {"sex": [SEX_NAMES.get(float(s), "") for s in self.sex], "age": self.age, "view": self.view}
        buf = io.StringIO()
        pd.DataFrame(cols).to_csv(buf, index=False, float_format="%.9g")
        atomic_write_bytes(Path(path), buf.getvalue().encode())

    @classmethod
    def read_csv(cls, path: Path) -> Predictions:
        path = Path(path)
        try:
            df = pd.read_csv(
                path, dtype={"key": str, "patient_id": str, "sex": str, "view": str}, keep_default_na=False
            )
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable predictions ({e})") from None
        names = [c[2:] for c in df.columns if c.startswith("p:")]
        missing = [c for c in ("key", "patient_id") if c not in df] + [
            f"{t}:{n}" for n in names for t in "ym" if f"{t}:{n}" not in df
        ]
        if missing or not names:
            raise UserError(f"{path}: not a cxrdist predictions.csv (missing {', '.join(missing) or 'p:<label>'})")
        cols = lambda t: df[[f"{t}:{n}" for n in names]].to_numpy(np.float64)  # noqa: E731
        sex = df.get("sex", pd.Series([""] * len(df))).map({"M": 1.0, "F": 0.0}).fillna(0.5).to_numpy()
        age = pd.to_numeric(df.get("age", pd.Series([np.nan] * len(df))), errors="coerce").to_numpy(np.float64)
        return cls(
            names,
            df["key"].tolist(),
            df["patient_id"].tolist(),
            cols("p"),
            cols("y"),
            cols("m"),
            sex,
            age,
            df.get("view", pd.Series([""] * len(df))).tolist(),
        )

    def subset(self, sel: np.ndarray) -> Predictions:
        idx = np.flatnonzero(sel)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return Predictions(
            self.names,
            pick(self.key),
            pick(self.patient_id),
            self.prob[idx],
            self.labels[idx],
            self.mask[idx],
            self.sex[idx],
            self.age[idx],
            pick(self.view),
        )


def column(pred: Predictions, j: int) -> tuple[np.ndarray, np.ndarray]:
    keep = pred.mask[:, j] > 0
    return pred.labels[keep, j], pred.prob[keep, j]


def entries(pred: Predictions, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every masked-in (image, label) entry: probabilities and targets, flat (for calibration)."""
    keep = pred.mask > 0
    return prob[keep], (pred.labels[keep] >= 0.5).astype(np.float64)


def fit_operating_points(val: Predictions, rule: str = "youden") -> dict:
    """Per label the threshold chosen on val (None where val has one class), and the temperature fitted on
    val's masked-in entries."""
    thresholds = {n: metrics.operating_threshold(*column(val, j), rule) for j, n in enumerate(val.names)}
    keep = val.mask > 0
    temperature = metrics.fit_temperature(val.logits()[keep], (val.labels[keep] >= 0.5).astype(np.float64))
    return {"rule": rule, "fitted_on": "val", "n_val": val.n, "thresholds": thresholds, "temperature": temperature}


def scaled(pred: Predictions, temperature: float) -> np.ndarray:
    return metrics.sigmoid(pred.logits() / temperature)


def _label_record(pred: Predictions, j: int, ranked: dict, threshold: float | None) -> dict:
    y, p = column(pred, j)
    name = pred.names[j]
    acc = float(((p >= 0.5) == (y >= 0.5)).mean()) if len(y) else None
    return {
        "auroc": ranked["labels"][name]["auroc"],
        "auprc": ranked["labels"][name]["auprc"],
        "threshold": threshold,
        **metrics.rates_at(y, p, threshold),
        "accuracy@0.5": acc,
        "n": int(len(y)),
        "positives": int((y >= 0.5).sum()),
    }


def calibration(pred: Predictions, temperature: float) -> dict:
    p, y = entries(pred, pred.prob)
    ps, _ = entries(pred, scaled(pred, temperature))
    return {
        "ece": metrics.ece(p, y),
        "brier": metrics.brier(p, y),
        "temperature": float(temperature),
        "ece_scaled": metrics.ece(ps, y),
        "brier_scaled": metrics.brier(ps, y),
        "bins": metrics.ECE_BINS,
    }


def groups_of(pred: Predictions) -> dict[str, dict[str, np.ndarray]]:
    """attribute -> group -> row selection: sex, age bands, and view where the split holds several."""
    out = {"sex": {name: pred.sex == code for code, name in SEX_NAMES.items()}, "age": {}}
    for lo, hi, band in metrics.AGE_BANDS:
        out["age"][band] = (pred.age >= lo) & (pred.age < hi)
    views = np.asarray(pred.view, dtype=object)
    if len(set(pred.view) - {""}) > 1:
        out["view"] = {v: views == v for v in sorted(set(pred.view) - {""})}
    return {a: {g: s for g, s in gs.items() if s.any()} for a, gs in out.items()}


def _tpr(pred: Predictions, thresholds: dict) -> np.ndarray:
    """Per label the true-positive rate at its threshold (NaN where undefined)."""
    out = []
    for j, name in enumerate(pred.names):
        sens = metrics.rates_at(*column(pred, j), thresholds.get(name))["sensitivity"]
        out.append(np.nan if sens is None else sens)
    return np.asarray(out)


def subgroups(pred: Predictions, weights: np.ndarray, thresholds: dict) -> dict:
    out = {}
    for attribute, groups in groups_of(pred).items():
        if not groups:
            continue
        subs = {g: pred.subset(sel) for g, sel in groups.items()}
        tprs = {g: _tpr(sub, thresholds) for g, sub in subs.items()}
        stacked = np.stack(list(tprs.values()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a label no group has positives for: NaN
            median = np.nanmedian(stacked, axis=0)
        out[attribute] = {}
        for g, sel in groups.items():
            sub = subs[g]
            ranked = metrics.ranking(sub.prob, sub.labels, sub.mask, sub.names, weights[:, sel], kinds=("auroc",))
            gaps = tprs[g] - median
            defined = np.isfinite(gaps)
            out[attribute][g] = {
                "n": sub.n,
                "auroc_mean": ranked["mean"]["all"],
                "tpr_gap": float(gaps[defined].mean()) if defined.any() else None,
                "tpr_gap_labels": {n: float(v) for n, v, d in zip(pred.names, gaps, defined) if d},
            }
    return out


def by_source(pred: Predictions, sources, replicates: int = metrics.REPLICATES, seed: int = 0) -> dict:
    """A mixed run's split per source (keys ``<source>/...``): its size and mean AUROC with intervals."""
    out = {}
    for s in sources:
        sub = pred.rows(of_source(pred.key, s))
        if sub.n:
            weights = metrics.patient_weights(sub.patient_id, replicates, seed)
            out[s] = {"n": sub.n, "mean": metrics.ranking(sub.prob, sub.labels, sub.mask, sub.names, weights)["mean"]}
    return out


def score(
    pred: Predictions,
    points: dict,
    *,
    protocol: str,
    split: str,
    replicates: int = metrics.REPLICATES,
    seed: int = 0,
) -> dict:
    """``metrics.json`` of one split (the contract in docs/ARCHITECTURE.md), from its predictions and the
    operating points fitted on val. ``null`` for what is undefined."""
    if pred.n == 0:
        raise UserError(f"{split}: no predictions to score")
    weights = metrics.patient_weights(pred.patient_id, replicates, seed)
    ranked = metrics.ranking(pred.prob, pred.labels, pred.mask, pred.names, weights)
    thresholds = points["thresholds"]
    labels = {n: _label_record(pred, j, ranked, thresholds.get(n)) for j, n in enumerate(pred.names)}
    return {
        "protocol": protocol,
        "split": split,
        "n": pred.n,
        "patients": len(set(pred.patient_id)),
        "bootstrap": {"replicates": replicates, "seed": seed, "unit": "patient", "confidence": metrics.CONFIDENCE},
        "operating_point": {k: points[k] for k in ("rule", "fitted_on")},
        "labels": labels,
        "undefined": [n for n, r in labels.items() if r["auroc"] is None],
        "mean": ranked["mean"],
        "competition5_labels": ranked["competition5_labels"],
        "calibration": calibration(pred, points["temperature"]),
        "subgroups": subgroups(pred, weights, thresholds),
    }
