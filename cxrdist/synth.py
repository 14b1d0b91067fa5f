"""Synthetic chest X-ray datasets in the real CheXpert / MIMIC-CXR / NIH ChestX-ray14 layouts (floor 2).

``synthesize(layout, out, n)`` writes ``n`` phantom radiographs plus the CSVs exactly as the real data sets
ship them, so every source reader, packer and loader can be exercised end to end without patient data:

- ``chexpert``: ``out/CheXpert-v1.0-small/{train,valid}.csv`` + ``{train,valid}/patientNNNNN/studyK/viewJ_*.jpg``
- ``mimic-jpg`` / ``mimic-dicom``: ``out/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz`` +
  ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.{jpg,dcm}``
- ``nih``: ``out/Data_Entry_2017_v2020.csv`` + ``images_001..012/images/PPPPPPPP_FFF.png`` +
  ``train_val_list.txt`` / ``test_list.txt``

CheXpert and MIMIC labels follow CheXpert's positive / uncertain fractions with realistic co-occurrence (a shared "sick"
factor and a "heart failure" factor tie edema, effusion and cardiomegaly together); No Finding is set
exactly when no pathology is positive or uncertain (Support Devices excepted). NIH labels follow NIH's
fractions (``NIH_PREVALENCE``), binary, and are drawn with the same phantom findings (``_NIH_DRAWN_AS``) plus
three of their own (emphysema, fibrosis, hernia).

Each frontal image is a phantom (body, lungs with hilar markings, ribs, clavicles, spine, mediastinum,
heart) drawn in the patient's anatomical frame after a random pose, and every positive finding is drawn
where a radiologist would look, large and distinct enough to be learnt at 64 px (see the ``draw_*``
functions). Uncertain labels are drawn at half strength or not at all, at random. Laterals are a crude
side view without findings (the default view filter drops them).

Everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdist.errors import UserError
from cxrdist.labels import NIH, OBSERVATIONS

__all__ = [
    "LAYOUTS",
    "PREVALENCE",
    "NIH_PREVALENCE",
    "NIH_HEADER",
    "CHEXPERT_HEADER",
    "MIMIC_METADATA_COLUMNS",
    "MIMIC_LABELS",
    "synthesize",
    "sample_labels",
    "draw_frontal",
    "draw_lateral",
    "write_dicom",
    "DICOM_SYNTAXES",
]


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

CHEXPERT_DIR = "CheXpert-v1.0-small"
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
CHEXPERT_FIRST_VALID_PATIENT = 64541
MIMIC_METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_LABELS = sorted(OBSERVATIONS)  # MIMIC's chexpert.csv lists the observations alphabetically
MIMIC_PREFIX = "mimic-cxr-2.0.0-"

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


# ========================================================================================== phantom
#
# Drawing happens in the patient's anatomical frame (a, b): a runs across the image (0 left .. 1 right,
# patient's right lung on the image left as in a PA film), b down (0 neck .. ~1 upper abdomen). Every
# pixel carries its (a, b) after the random pose, so findings land in anatomy whatever the pose.


@dataclass
class Lung:
    cx: float
    cy: float
    rx: float
    ry: float
    lateral: float  # -1: lateral edge towards a=0 (image left), +1 towards a=1

    @property
    def top(self) -> float:
        return self.cy - self.ry

    @property
    def bottom(self) -> float:
        return self.cy + self.ry


@dataclass
class Frame:
    """Per-pixel anatomical coordinates of one image plus its anatomy."""

    a: np.ndarray
    b: np.ndarray
    px: float  # one pixel in anatomical units
    lungs: tuple[Lung, Lung]
    mediastinum_width: float = 0.055
    lung_masks: list = field(default_factory=list)
    lung_f: list = field(default_factory=list)  # superellipse value per lung (<1 inside)
    visible: list = field(default_factory=list)  # lung masks less the heart and mediastinum shadows
    heart: np.ndarray | None = None  # the heart shadow's soft mask (where a cardiomegaly is)


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Antialiased mask from a signed distance ``d`` (negative inside), edge one pixel wide."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _ellipse_sd(g: Frame, cx, cy, rx, ry) -> np.ndarray:
    """Approximate signed distance to an ellipse (exact for circles)."""
    r = np.sqrt(((g.a - cx) / rx) ** 2 + ((g.b - cy) / ry) ** 2)
    return (r - 1.0) * min(rx, ry)


def _segment_dist(g: Frame, p0, p1) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy or 1e-12
    t = np.clip(((g.a - x0) * dx + (g.b - y0) * dy) / L2, 0.0, 1.0)
    return np.hypot(g.a - (x0 + t * dx), g.b - (y0 + t * dy))


def _polyline_dist(g: Frame, pts) -> np.ndarray:
    d = _segment_dist(g, pts[0], pts[1])
    for p0, p1 in zip(pts[1:-1], pts[2:]):
        d = np.minimum(d, _segment_dist(g, p0, p1))
    return d


def _frame(rng: np.random.Generator, h: int, w: int) -> Frame:
    """Random pose and body habitus -> the anatomical coordinates of every pixel."""
    L = min(h, w) * rng.uniform(0.97, 1.05)  # pixels per anatomical unit
    theta = math.radians(rng.uniform(-4.0, 4.0))
    tx, ty = rng.uniform(-0.03, 0.03, 2)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    xc = (x + 0.5 - w / 2) / L - tx
    yc = (y + 0.5 - h / 2) / L - ty
    c, s = math.cos(theta), math.sin(theta)
    a = (c * xc + s * yc + 0.5).astype(np.float32)
    b = (-s * xc + c * yc + 0.5).astype(np.float32)
    k = rng.uniform(0.95, 1.05)  # lung size
    right = Lung(0.305 + rng.normal(0, 0.006), 0.445, 0.140 * k, 0.275 * k, -1.0)
    left = Lung(0.695 + rng.normal(0, 0.006), 0.455, 0.130 * k, 0.265 * k, +1.0)
    return Frame(a=a, b=b, px=1.0 / L, lungs=(right, left))


def _lung_f(g: Frame, lung: Lung) -> np.ndarray:
    p = np.abs(g.a - lung.cx) / lung.rx
    q = np.abs(g.b - lung.cy) / lung.ry
    return p**2.6 + q**2.6


def draw_body(g: Frame, rng: np.random.Generator) -> np.ndarray:
    """Background air, torso and neck soft tissue, shoulders."""
    img = np.full(g.a.shape, 0.03, np.float32)
    torso_f = (np.abs(g.a - 0.5) / 0.42) ** 4 + (np.abs(g.b - 0.68) / 0.62) ** 4
    torso = _soft((torso_f - 1.0) * 0.3, g.px)
    neck = _soft(np.maximum(np.abs(g.a - 0.5) - 0.09, g.b - 0.2), g.px)
    body = np.maximum(torso, neck)
    soft = 0.50 + rng.uniform(-0.03, 0.03) + 0.06 * np.clip(g.b - 0.7, 0, 0.4)  # abdomen a bit denser
    return img + body * (soft - img)


def draw_lungs(img: np.ndarray, g: Frame, rng: np.random.Generator) -> np.ndarray:
    """Two dark lungs with hilar vascular markings that fade to the periphery."""
    base = 0.17 + rng.uniform(-0.02, 0.02)
    for lung in g.lungs:
        f = _lung_f(g, lung)
        g.lung_f.append(f)
        m = _soft((f - 1.0) * min(lung.rx, lung.ry) * 0.4, g.px)
        g.lung_masks.append(m)
        hx = lung.cx - 0.55 * lung.rx * lung.lateral
        d = np.hypot(g.a - hx, (g.b - lung.cy) * 0.8)
        markings = 0.15 * np.exp(-d / 0.09)
        value = base + markings
        img = img + m * (value - img)
    return img


def draw_ribs(img: np.ndarray, g: Frame) -> np.ndarray:
    """Posterior rib arcs over the thorax (10 a side)."""
    r = np.abs(g.a - 0.5)
    centre = g.b - 0.9 * (r - 0.12) ** 2  # arcs droop laterally
    phase = (centre - 0.12) / 0.06
    frac = phase - np.floor(phase)
    band = np.clip(1.0 - np.abs(frac - 0.5) / 0.16, 0.0, 1.0)
    inside = (phase > 0) & (phase < 10) & (r > 0.06) & (r < 0.40)
    return img + 0.09 * band * inside


def draw_mediastinum(img: np.ndarray, g: Frame, width: float = 0.055) -> np.ndarray:
    """Upper mediastinum (vessels), spine with vertebral bodies, trachea."""
    g.mediastinum_width = width
    r = np.abs(g.a - 0.5)
    bulge = width + 0.012 * np.exp(-(((g.b - 0.27) / 0.04) ** 2)) * (g.a > 0.5)  # aortic knob
    med = _soft(np.maximum(r - bulge, np.maximum(0.08 - g.b, g.b - 0.75)), g.px)
    img = img + med * (0.72 - img)
    spine = _soft(r - 0.032, g.px)
    vert = 0.86 - 0.06 * (np.cos((g.b - 0.1) / 0.045 * 2 * np.pi) > 0.8)
    img = img + spine * (vert - img)
    trachea = _soft(np.maximum(r - 0.016, g.b - 0.30), g.px)
    return img - 0.25 * trachea


def draw_heart(img: np.ndarray, g: Frame, rng: np.random.Generator, enlarge: float = 0.0) -> np.ndarray:
    """Heart shadow, left of midline; ``enlarge`` 1 = cardiomegaly (>= 1.6x wider)."""
    rx = rng.uniform(0.115, 0.13) * (1.0 + 0.65 * enlarge)
    ry = rng.uniform(0.10, 0.115) * (1.0 + 0.2 * enlarge)
    cx = 0.535 + 0.04 * enlarge
    cy = 0.64
    m = _soft(_ellipse_sd(g, cx, cy, rx, ry), g.px)
    cover = np.maximum(m, _soft(np.abs(g.a - 0.5) - g.mediastinum_width, g.px))
    g.visible = [lm * (1.0 - cover) for lm in g.lung_masks]
    g.heart = m
    return img + m * (0.70 - img)


def draw_clavicles(img: np.ndarray, g: Frame) -> np.ndarray:
    d = np.minimum(_segment_dist(g, (0.47, 0.17), (0.2, 0.10)), _segment_dist(g, (0.53, 0.17), (0.8, 0.10)))
    return img + 0.22 * _soft(d - 0.011, g.px)


# ----------------------------------------------------------------------------------------- findings


def draw_lung_opacity(img, g, s, rng):
    """Diffuse haze over one lung, denser towards the base."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    grad = 0.6 + 0.4 * np.clip((g.b - lung.top) / (2 * lung.ry), 0, 1)
    return img + 0.3 * s * grad * g.visible[i]


def draw_edema(img, g, s, rng):
    """Bilateral perihilar 'bat-wing' haze."""
    add = np.zeros_like(img)
    for i, lung in enumerate(g.lungs):
        hx = lung.cx - 0.45 * lung.rx * lung.lateral
        wing = np.exp(-(((g.a - hx) / 0.10) ** 2) - ((g.b - lung.cy) / 0.15) ** 2)
        add += wing * g.visible[i]
    return img + 0.34 * s * add


def draw_consolidation(img, g, s, rng):
    """Dense lobar patch in the mid zone of one lung, sharp lower border (fissure), air bronchograms."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    top = lung.top + 2 * lung.ry * rng.uniform(0.28, 0.36)
    bottom = lung.top + 2 * lung.ry * rng.uniform(0.58, 0.64)
    band = _soft(np.maximum(top - g.b, g.b - bottom), 3 * g.px)
    patch = band * g.visible[i]
    hx = lung.cx - 0.6 * lung.rx * lung.lateral
    ex = lung.cx + 0.5 * lung.rx * lung.lateral
    bronchi = _polyline_dist(g, [(hx, lung.cy - 0.02), (0.5 * (hx + ex), (top + bottom) / 2), (ex, bottom - 0.02)])
    air = _soft(bronchi - 0.006, g.px) * patch
    return img + s * (0.42 * patch - 0.2 * air)


def draw_pneumonia(img, g, s, rng):
    """Many fuzzy patchy blobs scattered over the lower two thirds of one lung."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    add = np.zeros_like(img)
    for _ in range(int(rng.integers(9, 13))):
        bx = lung.cx + rng.uniform(-0.75, 0.75) * lung.rx
        by = lung.cy + rng.uniform(-0.2, 0.8) * lung.ry
        sig = rng.uniform(0.02, 0.03)
        add = np.maximum(add, np.exp(-((g.a - bx) ** 2 + (g.b - by) ** 2) / (2 * sig * sig)))
    return img + 0.45 * s * add * g.visible[i]


def draw_atelectasis(img, g, s, rng):
    """Plate-like atelectasis: a bright horizontal band across the lower zone of one lung."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    y = lung.cy + lung.ry * rng.uniform(0.35, 0.5)
    tilt = rng.uniform(-0.1, 0.1)
    d = np.abs(g.b - y - tilt * (g.a - lung.cx)) - 0.018
    span = np.abs(g.a - lung.cx) < 0.85 * lung.rx
    return img + 0.5 * s * _soft(d, g.px) * span * g.visible[i]


def draw_lung_lesion(img, g, s, rng):
    """A single round, sharply marginated nodule in the upper/mid zone of one lung."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    cx = lung.cx + rng.uniform(-0.35, 0.35) * lung.rx
    cy = lung.cy + rng.uniform(-0.55, -0.05) * lung.ry
    r = rng.uniform(0.05, 0.06)
    return img + 0.6 * s * _soft(np.hypot(g.a - cx, g.b - cy) - r, g.px)


def draw_pneumothorax(img, g, s, rng):
    """Apicolateral pneumothorax: a dark band without lung markings, bounded by a thin pleural line."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    f = g.lung_f[i]
    # The collapsed lung: the same shape, smaller, pulled towards the hilum and the base.
    k = 0.62 - 0.1 * rng.random()
    cx = lung.cx - (1 - k) * lung.rx * lung.lateral * 0.9
    cy = lung.cy + (1 - k) * lung.ry * 0.9
    fc = (np.abs(g.a - cx) / (k * lung.rx)) ** 2.6 + (np.abs(g.b - cy) / (k * lung.ry)) ** 2.6
    inside = g.visible[i]
    collapsed = _soft((fc - 1.0) * k * lung.rx * 0.4, g.px)
    air = inside * (1.0 - collapsed)
    line = np.clip(1.0 - np.abs(fc - 1.0) * k * lung.rx * 0.4 / (0.8 * g.px), 0, 1) * inside * (f < 0.92)
    img = img + s * air * (0.0 - img)
    return img + 0.4 * s * line


def draw_pleural_effusion(img, g, s, rng):
    """Fluid filling one costophrenic angle with a meniscus rising laterally."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    depth = 2 * lung.ry * (0.24 + 0.08 * rng.random()) * (0.55 + 0.45 * s)
    lat = np.clip((g.a - lung.cx) * lung.lateral / lung.rx, -1, 1)  # -1 medial .. 1 lateral
    level = lung.bottom - depth - 0.05 * ((lat + 1) / 2) ** 2  # meniscus: climbs the lateral wall
    fluid = _soft(level - g.b, 1.5 * g.px) * g.visible[i]
    return img + fluid * (0.62 - img)


def draw_pleural_other(img, g, s, rng):
    """Thickened pleura along the lateral chest wall of one lung (mid zone)."""
    i = int(rng.integers(2))
    lung = g.lungs[i]
    f = g.lung_f[i]
    lat = (g.a - lung.cx) * lung.lateral > 0.35 * lung.rx
    rim = (f > 0.3) * lat * (np.abs(g.b - lung.cy) < 0.7 * lung.ry)
    return img + 0.55 * s * rim * g.visible[i]


def draw_fracture(img, g, s, rng):
    """A lateral rib fracture: bulky callus with a dark fracture cleft and a step between the fragments."""
    side = -1.0 if rng.random() < 0.5 else 1.0
    k = int(rng.integers(3, 7))
    r = rng.uniform(0.28, 0.33)
    a = 0.5 + side * r
    b = 0.12 + (k + 0.5) * 0.06 + 0.9 * (r - 0.12) ** 2
    callus = _soft(_ellipse_sd(g, a, b, 0.065, 0.04), g.px)
    cleft = _soft(np.abs(g.a - a) - 0.006, g.px) * callus
    step = _soft(np.maximum(np.abs(g.b - b - 0.018) - 0.01, side * (a - g.a)), g.px)  # displaced fragment
    step = step * (np.abs(g.a - a) < 0.07)
    return img + s * (0.5 * callus - 0.45 * cleft + 0.25 * step)


def draw_support_devices(img, g, s, rng):
    """Endotracheal tube, subclavian central line, ECG electrodes with leads (radio-opaque: brightest)."""
    d = np.full(img.shape, np.inf, np.float32)
    kinds = rng.random(3) < (0.65, 0.6, 0.7)
    if not kinds.any():
        kinds[int(rng.integers(3))] = True
    if kinds[0]:  # ETT down the trachea, tip above the carina
        tip = rng.uniform(0.26, 0.32)
        d = np.minimum(d, np.maximum(np.abs(g.a - 0.5 - 0.004) - 0.009, g.b - tip))
    if kinds[1]:  # subclavian CVC: along the clavicle, then a quarter turn down into the SVC
        sd = -1.0 if rng.random() < 0.5 else 1.0
        tip_a, tip_b, R = 0.5 - 0.035, rng.uniform(0.40, 0.46), rng.uniform(0.2, 0.26)
        cx, cy = tip_a + sd * R, tip_b
        arc = np.abs(np.hypot(g.a - cx, g.b - cy) - R)
        arc = np.where(((g.a - cx) * sd <= 0) & (g.b <= cy), arc, np.inf)
        along = np.where((g.a - cx) * sd >= 0, np.abs(g.b - (cy - R)), np.inf)
        d = np.minimum(d, np.minimum(arc, along) - 0.006)
    if kinds[2]:  # ECG electrodes: bright rings with a lead running off the side
        for _ in range(int(rng.integers(2, 5))):
            side = rng.choice([-1.0, 1.0])
            ex = 0.5 + side * rng.uniform(0.25, 0.4)
            ey = rng.uniform(0.05, 0.25) if rng.random() < 0.6 else rng.uniform(0.8, 0.95)
            r = np.hypot(g.a - ex, g.b - ey)
            ring = np.minimum(np.abs(r - 0.022) - 0.006, r - 0.007)
            slope = rng.uniform(-0.5, 0.5)
            lead = np.where((g.a - ex) * side > 0.02, np.abs(g.b - ey - slope * (g.a - ex)) - 0.004, np.inf)
            d = np.minimum(d, np.minimum(ring, lead))
    m = _soft(d, g.px)
    return img + s * m * (1.0 - img)


def draw_emphysema(img, g, s, rng):
    """Hyperlucent lungs: fewer markings, darker fields (NIH only)."""
    for m in g.visible:
        img = img - 0.09 * s * m
    return img


def draw_fibrosis(img, g, s, rng):
    """Reticular lines over both lower zones (NIH only)."""
    add = np.zeros_like(img)
    for i, lung in enumerate(g.lungs):
        net = np.abs(np.sin((g.a - lung.cx) * 90.0 + rng.uniform(0, 6))) * np.abs(np.sin(g.b * 80.0))
        lower = np.clip((g.b - lung.cy) / lung.ry + 0.2, 0, 1)
        add += (net < 0.15) * lower * g.visible[i]
    return img + 0.22 * s * add


def draw_hernia(img, g, s, rng):
    """Hiatal hernia: a round soft-tissue density behind the lower heart, with an air-fluid level (NIH only)."""
    cx, cy, r = 0.5 + rng.uniform(-0.02, 0.02), 0.74, rng.uniform(0.055, 0.07)
    sac = _soft(np.hypot(g.a - cx, g.b - cy) - r, g.px)
    air = sac * (g.b < cy - 0.3 * r)
    return img + s * (0.28 * sac - 0.35 * air)


FINDINGS = {
    # drawing order: fluid and air first, then parenchyma, then bone, devices on top
    "Pleural Effusion": draw_pleural_effusion,
    "Pneumothorax": draw_pneumothorax,
    "Pleural Other": draw_pleural_other,
    "Lung Opacity": draw_lung_opacity,
    "Edema": draw_edema,
    "Consolidation": draw_consolidation,
    "Pneumonia": draw_pneumonia,
    "Atelectasis": draw_atelectasis,
    "Lung Lesion": draw_lung_lesion,
    "Fracture": draw_fracture,
    "Support Devices": draw_support_devices,
    # findings only NIH labels: no CheXpert state draws them
    "Emphysema": draw_emphysema,
    "Fibrosis": draw_fibrosis,
    "Hernia": draw_hernia,
}


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure (gain/offset) jitter and quantum noise."""
    gain = rng.uniform(0.9, 1.08)
    offset = rng.uniform(-0.04, 0.04)
    img = img * gain + offset + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def draw_frontal(
    rng: np.random.Generator,
    h: int,
    w: int,
    findings: dict[str, float] | None = None,
    finding_rng: np.random.Generator | None = None,
    regions: dict | None = None,
) -> np.ndarray:
    """A frontal (PA/AP) phantom, float32 ``h`` x ``w`` in [0, 1] (bone bright).

    ``findings`` maps observation names to a drawing strength (1 positive, 0.5 a faint uncertain one);
    ``finding_rng`` chooses their side/placement (pass the study's generator so that all images of a
    study show the same finding), default ``rng``. ``regions``, when given, receives the ``heart`` mask (for
    tests of localisation: Grad-CAM on a cardiomegaly).
    """
    findings = findings or {}
    frng = finding_rng if finding_rng is not None else rng
    g = _frame(rng, h, w)
    img = draw_body(g, rng)
    img = draw_lungs(img, g, rng)
    img = draw_ribs(img, g)
    img = draw_clavicles(img, g)
    widen = findings.get("Enlarged Cardiomediastinum", 0.0)
    img = draw_mediastinum(img, g, width=rng.uniform(0.05, 0.06) + 0.07 * widen)
    img = draw_heart(img, g, rng, enlarge=findings.get("Cardiomegaly", 0.0))
    for name, draw in FINDINGS.items():
        if findings.get(name):
            img = draw(img, g, findings[name], frng)
    if regions is not None:
        regions["heart"] = g.heart
    return _finish(img, rng)


def draw_lateral(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A crude lateral phantom: body, one lung field, heart in front, spine behind. No findings."""
    g = _frame(rng, h, w)
    img = np.full(g.a.shape, 0.03, np.float32)
    body = _soft(_ellipse_sd(g, 0.5, 0.62, 0.32, 0.6), g.px)
    img = img + body * (0.52 - img)
    lung = _soft(_ellipse_sd(g, 0.5, 0.45, 0.2, 0.28), g.px)
    img = img + lung * (0.2 - img)
    heart = _soft(_ellipse_sd(g, 0.38, 0.6, 0.12, 0.12), g.px)
    img = img + heart * (0.62 - img)
    spine = _soft(np.abs(g.a - 0.76) - 0.04, g.px) * (g.b > 0.05)
    img = img + spine * (0.85 - img)
    return _finish(img, rng)


# ============================================================================================ DICOM

DICOM_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "j2k": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "jls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless (needs pyjpegls to encode)
}
_CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
_DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _encodable_syntaxes() -> list[str]:
    from pydicom.pixels.encoders.base import get_encoder

    names = []
    for name, uid in DICOM_SYNTAXES.items():
        if name == "explicit":
            names.append(name)
            continue
        try:
            if get_encoder(uid).is_available:
                names.append(name)
        except Exception:
            pass
    return names


def write_dicom(
    path,
    img01: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 16,
    syntax: str = "explicit",
    rescale: tuple[float, float] | None = None,
    window: bool = True,
    uid_seed: str = "0",
    modality: str = "DX",
    view: str = "PA",
    subject_id: int = 10000000,
    study_id: int = 50000000,
    study_date: str = "21800101",
    study_time: str = "120000",
) -> None:
    """Write ``img01`` (float [0, 1], bone bright) as a single-frame DICOM Part 10 file.

    ``bits`` is BitsStored (BitsAllocated 16); MONOCHROME1 stores inverted values; ``rescale`` =
    (slope, intercept) adds a modality LUT; ``window`` adds WindowCenter/Width covering the stored range
    (so read_dicom gives ``img01`` back up to quantisation). Patient tags hold FAKE values only.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if not 8 < bits <= 16:
        raise ValueError(f"bits must be in 9..16, not {bits}")
    maxval = (1 << bits) - 1
    v = np.clip(np.asarray(img01, np.float64), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        v = 1.0 - v
    stored = np.rint(v * maxval).astype(np.uint16)

    sop_class = _DX if modality == "DX" else _CR

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["cxrdist-synth", uid_seed, kind])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["cxrdist-synth-study", str(study_id)])
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = modality
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = f"SYNTH{study_id}"
    ds.InstitutionName = "SYNTHETIC HOSPITAL"
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.PatientName = f"SYNTH^PATIENT^{subject_id}"
    ds.PatientID = f"SYNTH{subject_id}"
    ds.PatientBirthDate = "19000101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyID = str(study_id)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    slope, intercept = rescale if rescale else (1.0, 0.0)
    if rescale:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if window:  # LINEAR window mapping the whole stored range onto the display range
        ds.WindowCenter = f"{intercept + slope * maxval / 2 + 0.5:.1f}"
        ds.WindowWidth = f"{slope * maxval + 1:.1f}"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    if syntax != "explicit":
        ds.compress(DICOM_SYNTAXES[syntax], stored, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


# ============================================================================================ layouts


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _canvas(rng: np.random.Generator, size: int, landscape: bool) -> tuple[int, int]:
    """(h, w) with the long side ``size``: CheXpert-like portrait (~0.82), some AP films landscape."""
    short = max(8, int(round(size * rng.uniform(0.8, 0.86))))
    return (short, size) if landscape else (size, short)


def _save_jpg(path: Path, img01: np.ndarray) -> None:
    Image.fromarray(np.rint(img01 * 255).astype(np.uint8)).save(path, format="JPEG", quality=92)


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    if gz:
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as z:
            z.write(data)
    else:
        path.write_bytes(data)


def _study_images(rng: np.random.Generator, weights=(0.55, 0.35, 0.10)) -> int:
    return int(rng.choice(len(weights), p=weights)) + 1


def _synth_chexpert(out: Path, n: int, size: int, seed: int) -> Path:
    root = out / CHEXPERT_DIR
    rng = _rng(seed, 1)
    # Plan patients -> studies -> images until n image rows; ~1% of patients (one study each) go to valid.
    n_valid_pat = max(1, int(round(0.01 * n / 3.5))) if n >= 4 else 0
    plan = []  # (split, patient_no, study_no, [(view_no, lateral)])
    count = 0
    for p in range(n_valid_pat):
        k = min(_study_images(rng, (0.8, 0.2, 0.0)), n - count)
        plan.append(("valid", CHEXPERT_FIRST_VALID_PATIENT + p, 1, k))
        count += k
    pat = 0
    while count < n:
        pat += 1
        n_studies = int(rng.choice([1, 2, 3, 4], p=(0.35, 0.25, 0.2, 0.2)))
        for st in range(1, n_studies + 1):
            if count >= n:
                break
            k = min(_study_images(rng), n - count)
            plan.append(("train", pat, st, k))
            count += k
    rows_info = []  # per image: split, patient, study, view_no, lateral
    for split, p, st, k in plan:
        for v in range(1, k + 1):
            lateral = v > 1 and rng.random() < 0.42
            rows_info.append((split, p, st, v, lateral))
    N = len(rows_info)
    states = sample_labels(rng, N)
    is_valid = np.array([r[0] == "valid" for r in rows_info])
    if is_valid.any():
        states[is_valid] = _resolve_uncertain(states[is_valid], rng)
    cell_rng = _rng(seed, 2)
    train_rows, valid_rows = [], []
    sex_of, age_of = {}, {}
    for i, (split, p, st, v, lateral) in enumerate(rows_info):
        key = (split, p)
        if key not in sex_of:
            u = rng.random()
            sex_of[key] = "Male" if u < 0.59 else ("Female" if u < 0.995 else "Unknown")
            age_of[key] = int(rng.integers(18, 86))
        age = min(90, age_of[key] + (st - 1))
        if lateral:
            fl, appa = "Lateral", ""
        else:
            fl = "Frontal"
            u = rng.random()
            appa = "AP" if u < 0.745 else ("PA" if u < 0.993 else ("LL" if u < 0.997 else "RL"))
        rel = f"{split}/patient{p:05d}/study{st}/view{v}_{fl.lower()}.jpg"
        labels = _cells(states[i : i + 1], cell_rng, valid=(split == "valid"))[0]
        row = [f"{CHEXPERT_DIR}/{rel}", sex_of[key], age, fl, appa, *labels]
        (valid_rows if split == "valid" else train_rows).append(row)
        img_rng = _rng(seed, 3, i)
        h, w = _canvas(img_rng, size, landscape=(appa == "AP" and img_rng.random() < 0.15))
        if lateral:
            img = draw_lateral(img_rng, h, w)
        else:
            img = draw_frontal(img_rng, h, w, _strengths(states[i], img_rng))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_jpg(path, img)
    root.mkdir(parents=True, exist_ok=True)
    _write_csv(root / "train.csv", CHEXPERT_HEADER, train_rows)
    _write_csv(root / "valid.csv", CHEXPERT_HEADER, valid_rows)
    return root


_VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "AP AXIAL": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "": "",
}


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(rng.bytes(4).hex() for _ in range(5))


def _synth_mimic(out: Path, n: int, size: int, seed: int, ext: str) -> Path:
    rng = _rng(seed, 11)
    subjects: list[int] = []
    studies = []  # (subject, study_id, n_images)
    count = 0
    used_subjects, used_studies, used_dicoms = set(), set(), set()
    while count < n:
        subj = int(rng.integers(10_000_000, 20_000_000))
        if subj in used_subjects:
            continue
        used_subjects.add(subj)
        subjects.append(subj)
        for _ in range(int(rng.choice([1, 2, 3, 4, 5, 6], p=(0.3, 0.2, 0.15, 0.15, 0.1, 0.1)))):
            if count >= n:
                break
            study = int(rng.integers(50_000_000, 60_000_000))
            while study in used_studies:
                study = int(rng.integers(50_000_000, 60_000_000))
            used_studies.add(study)
            k = min(_study_images(rng, (0.45, 0.45, 0.10)), n - count)
            studies.append((subj, study, k))
            count += k
    # split by subject: ~98 / 1 / 1, at least one subject each when there are 3 or more
    order = rng.permutation(len(subjects))
    n_small = max(1, int(round(0.01 * len(subjects)))) if len(subjects) >= 3 else 0
    split_of = {s: "train" for s in subjects}
    for j in order[:n_small]:
        split_of[subjects[j]] = "validate"
    for j in order[n_small : 2 * n_small]:
        split_of[subjects[j]] = "test"

    states = sample_labels(rng, len(studies))
    cell_rng = _rng(seed, 12)
    label_rows, meta_rows, split_rows = [], [], []
    encodable = _encodable_syntaxes() if ext == "dcm" else []
    img_i = 0
    for si, (subj, study, k) in enumerate(studies):
        cells = _cells(states[si : si + 1], cell_rng)[0]
        by_name = dict(zip(OBSERVATIONS, cells))
        label_rows.append([subj, study, *[by_name[o] for o in MIMIC_LABELS]])
        study_rng = _rng(seed, 13, si)
        strengths = _strengths(states[si], study_rng)
        year = 2110 + int(study_rng.integers(0, 90))
        date = f"{year}{int(study_rng.integers(1, 13)):02d}{int(study_rng.integers(1, 29)):02d}"
        time_ = (
            f"{int(study_rng.integers(0, 24)):02d}{int(study_rng.integers(0, 60)):02d}"
            f"{int(study_rng.integers(0, 60)):02d}.{int(study_rng.integers(0, 1000)):03d}"
        )
        portable = study_rng.random() < 0.55
        for j in range(k):
            img_rng = _rng(seed, 14, img_i)
            img_i += 1
            u = img_rng.random()
            if j == 0:
                view = ("AP" if portable else "PA") if u < 0.95 else ("AP AXIAL" if u < 0.975 else "")
            else:
                view = "LATERAL" if u < 0.75 else ("LL" if u < 0.9 else ("AP" if portable else "PA"))
            lateral = view in ("LATERAL", "LL")
            proc = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
            orient = "" if img_rng.random() < 0.05 else ("Recumbent" if portable and not lateral else "Erect")
            h, w = _canvas(img_rng, size, landscape=(view == "AP" and img_rng.random() < 0.2))
            if lateral:
                img = draw_lateral(img_rng, h, w)
            else:
                img = draw_frontal(img_rng, h, w, strengths, finding_rng=_rng(seed, 15, si))
            did = _dicom_id(img_rng)
            while did in used_dicoms:
                did = _dicom_id(img_rng)
            used_dicoms.add(did)
            folder = out / "files" / f"p{str(subj)[:2]}" / f"p{subj}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            if ext == "jpg":
                _save_jpg(folder / f"{did}.jpg", img)
            else:
                _write_mimic_dicom(
                    folder / f"{did}.dcm", img, img_rng, encodable, did, view, subj, study, date, time_.split(".")[0]
                )
            meta_rows.append([did, subj, study, proc, view, h, w, date, time_, proc, _VIEW_MEANING[view], orient])
            split_rows.append([did, study, subj, split_of[subj]])
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / f"{MIMIC_PREFIX}metadata.csv.gz", MIMIC_METADATA_COLUMNS, meta_rows, gz=True)
    _write_csv(out / f"{MIMIC_PREFIX}chexpert.csv.gz", ["subject_id", "study_id", *MIMIC_LABELS], label_rows, gz=True)
    _write_csv(
        out / f"{MIMIC_PREFIX}split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True
    )
    return out


def _write_mimic_dicom(path, img, rng, encodable, did, view, subj, study, date, time_) -> None:
    """One MIMIC-like DICOM with a random mix of photometric, bit depth, rescale, window and syntax."""
    photometric = "MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2"
    bits = int(rng.choice([12, 14, 15, 16]))
    u = rng.random()
    rescale = None if u < 0.6 else ((1.0, -1024.0) if u < 0.8 else (0.5, 0.0))
    window = rng.random() < 0.8
    syntax = str(rng.choice(encodable))
    write_dicom(
        path,
        img,
        photometric=photometric,
        bits=bits,
        syntax=syntax,
        rescale=rescale,
        window=window,
        uid_seed=did,
        modality="DX" if rng.random() < 0.7 else "CR",
        view=view,
        subject_id=subj,
        study_id=study,
        study_date=date,
        study_time=time_,
    )


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
NIH_HEADER = [  # as the real file spells it: the bracketed pairs hold a comma, so they are four CSV fields
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]
NIH_ARCHIVES = 12  # images_001 ... images_012, each unpacking to images/
# the phantom finding that draws each NIH label (the others share their CheXpert name)
_NIH_DRAWN_AS = {
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
}


def _synth_nih(out: Path, n: int, size: int, seed: int) -> Path:
    """Data_Entry_2017_v2020.csv, images_001..012/images/<Image Index>.png (square 8-bit, ~1% RGBA as in the
    real set), and the official train_val_list.txt / test_list.txt (patient-disjoint, ~23% test)."""
    rng = _rng(seed, 21)
    images = []  # (patient, follow-up)
    patient = 0
    while len(images) < n:
        patient += 1
        visits = min(int(rng.geometric(0.45)), n - len(images))
        images += [(patient, fu) for fu in range(visits)]
    hf = {"Edema": 0.6, "Effusion": 0.45, "Cardiomegaly": 0.5}
    states = sample_labels(rng, n, names=NIH, prevalence=NIH_PREVALENCE, heart_failure=hf, clear=None)
    test_patients = {p for p in range(1, patient + 1) if rng.random() < 0.23}
    per_archive = -(-n // NIH_ARCHIVES)
    rows, train_val, test = [], [], []
    sex_of = {p: ("M" if rng.random() < 0.56 else "F") for p in range(1, patient + 1)}
    age_of = {p: int(rng.integers(1, 90)) for p in range(1, patient + 1)}
    for i, (p, fu) in enumerate(images):
        name = f"{p:08d}_{fu:03d}.png"
        found = sorted(NIH[j] for j in np.flatnonzero(states[i] == 1))
        img_rng = _rng(seed, 22, i)
        view = "PA" if img_rng.random() < 0.6 else "AP"
        w0 = int(img_rng.integers(2500, 3056))
        spacing = "0.143" if img_rng.random() < 0.7 else "0.168"
        age = min(age_of[p] + fu // 4, 95)
        rows.append([name, "|".join(found) or "No Finding", fu, p, age, sex_of[p], view, w0, w0, spacing, spacing])
        (test if p in test_patients else train_val).append(name)
        strengths = {_NIH_DRAWN_AS.get(f, f): 1.0 for f in found}
        img = draw_frontal(img_rng, size, size, strengths)
        folder = out / f"images_{i // per_archive + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(np.rint(img * 255).astype(np.uint8))
        (pil.convert("RGBA") if img_rng.random() < 0.01 else pil).save(folder / name)
    _write_csv(out / "Data_Entry_2017_v2020.csv", NIH_HEADER, rows)
    (out / "train_val_list.txt").write_text("".join(f"{x}\n" for x in train_val))
    (out / "test_list.txt").write_text("".join(f"{x}\n" for x in test))
    return out


LAYOUTS = {
    "chexpert": lambda out, n, size, seed: _synth_chexpert(out, n, size, seed),
    "mimic-jpg": lambda out, n, size, seed: _synth_mimic(out, n, size, seed, "jpg"),
    "mimic-dicom": lambda out, n, size, seed: _synth_mimic(out, n, size, seed, "dcm"),
    "nih": _synth_nih,
}


def synthesize(layout: str, out, n: int, size: int = 256, seed: int = 0) -> Path:
    """Write a synthetic data set of ``n`` images in ``layout`` under ``out``; return the root to pass to
    ``cxrdist shard --root`` (``out/CheXpert-v1.0-small`` for chexpert, ``out`` for MIMIC and NIH)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if n < 1:
        raise UserError(f"n must be at least 1, not {n}")
    if size < 16:
        raise UserError(f"size must be at least 16 pixels, not {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return LAYOUTS[layout](out, n, size, seed)
