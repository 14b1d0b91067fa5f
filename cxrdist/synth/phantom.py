"""The phantom radiograph: anatomy in the patient's frame after a random pose, and each finding drawn where a
radiologist would look."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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


def drawn_boxes(change: np.ndarray, g: Frame, floor: float = 0.2) -> tuple[tuple[float, float, float, float], ...]:
    """Where a finding changed the image: pixel boxes (x, y, w, h) around the pixels it changed by at least
    ``floor`` of its largest change (a haze's faint rim is not where a reader would box it), one per side of
    the patient's midline (image left, then right: each lung's), so a bilateral finding gets two boxes."""
    d = np.abs(change)
    peak = float(d.max()) if d.size else 0.0
    if not peak > 0:
        return ()
    hit = d >= floor * peak
    boxes = []
    for side in (g.a < 0.5, g.a >= 0.5):
        ys, xs = np.nonzero(hit & side)
        if len(xs):
            x0, y0 = int(xs.min()), int(ys.min())
            boxes.append((float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)))
    return tuple(boxes)


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
    tests of localisation: Grad-CAM on a cardiomegaly) and, per finding drawn, where it was drawn: a tuple
    of pixel boxes (x, y, w, h), one per side of the midline it touches (``drawn_boxes``).
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
            before = img
            img = draw(img, g, findings[name], frng)
            if regions is not None:
                regions[name] = drawn_boxes(img - before, g)
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
