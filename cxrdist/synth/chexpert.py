"""The CheXpert-v1.0-small layout: ``{train,valid}.csv`` + ``{train,valid}/patientNNNNN/studyK/viewJ_*.jpg``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrdist.labels import OBSERVATIONS
from cxrdist.synth.common import _canvas, _rng, _save_jpg, _study_images, _write_csv
from cxrdist.synth.labels import (
    _cells,
    _resolve_uncertain,
    _strengths,
    sample_labels,
)
from cxrdist.synth.phantom import draw_frontal, draw_lateral

CHEXPERT_DIR = "CheXpert-v1.0-small"
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
CHEXPERT_FIRST_VALID_PATIENT = 64541


def synth_chexpert(out: Path, n: int, size: int, seed: int) -> Path:
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
