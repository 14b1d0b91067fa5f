"""The NIH ChestX-ray14 layout: ``Data_Entry_2017_v2020.csv`` + ``images_001..012/images/PPPPPPPP_FFF.png`` +
``train_val_list.txt`` / ``test_list.txt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cxrdist.labels import NIH
from cxrdist.synth.common import _rng, _write_csv
from cxrdist.synth.labels import (
    NIH_PREVALENCE,
    sample_labels,
)
from cxrdist.synth.phantom import draw_frontal

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


BBOX, BBOX_HEADER = "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""]
BBOX_FRAME = 1024  # NIH's boxes are in the 1024 x 1024 frame of its PNGs, whatever size these are drawn at
BBOX_SPELLING = {"Infiltration": "Infiltrate"}  # as the real box file spells it


def finding_boxes(found: list[str], regions: dict, size: int) -> list[list]:
    """[Finding Label, x, y, w, h] in the 1024 frame for each found finding the phantom says where it drew
    (``draw_frontal``'s ``regions``): the heart mask's bounding box for Cardiomegaly, else the finding's boxes."""
    k = BBOX_FRAME / size
    out = []
    for f in found:
        if f == "Cardiomegaly":
            ys, xs = np.nonzero(regions["heart"] > 0.5)
            drawn = [(xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())] if len(xs) else []
        else:
            drawn = regions.get(_NIH_DRAWN_AS.get(f, f), ())
        label = BBOX_SPELLING.get(f, f)
        out += [[label, *(round(float(v) * k, 6) for v in box)] for box in drawn]
    return out


def synth_nih(out: Path, n: int, size: int, seed: int) -> Path:
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
    rows, train_val, test, boxes = [], [], [], []
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
        regions: dict = {}
        img = draw_frontal(img_rng, size, size, strengths, regions=regions)
        boxes += [[name, *box] for box in finding_boxes(found, regions, size)]
        folder = out / f"images_{i // per_archive + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(np.rint(img * 255).astype(np.uint8))
        (pil.convert("RGBA") if img_rng.random() < 0.01 else pil).save(folder / name)
    _write_csv(out / "Data_Entry_2017_v2020.csv", NIH_HEADER, rows)
    # the real header is broken: the box's four columns are named `Bbox [x`, `y`, `w`, `h]`, three empty follow
    _write_csv(out / BBOX, BBOX_HEADER, [[*b, "", "", ""] for b in boxes])
    (out / "train_val_list.txt").write_text("".join(f"{x}\n" for x in train_val))
    (out / "test_list.txt").write_text("".join(f"{x}\n" for x in test))
    return out
