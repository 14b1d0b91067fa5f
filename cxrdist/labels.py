"""The 14 CheXpert observations and the uncertainty policies.

Labels are always addressed by *name*: CheXpert's CSVs list them in the order below, MIMIC-CXR's
``chexpert.csv`` alphabetically. Raw cells are ``1.0`` (positive), ``0.0`` (negative), ``-1.0``
(uncertain) or blank (not mentioned).
"""

from __future__ import annotations

import numpy as np

OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_CLASSES = len(OBSERVATIONS)

POLICIES: tuple[str, ...] = ("u-zeros", "u-ones", "u-ignore")
DEFAULT_POLICY = "u-zeros"  # the poster's


def apply_policy(raw: np.ndarray, policy: str = DEFAULT_POLICY) -> tuple[np.ndarray, np.ndarray]:
    """Map raw label cells (N x 14 floats: 1, 0, -1, NaN) to (labels float32, mask int8).

    Blank -> 0 (mask 1). Uncertain -> 0 (u-zeros), 1 (u-ones) or masked out (u-ignore: label 0,
    mask 0, so it counts in neither loss nor metrics).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown uncertainty policy {policy!r}; choose one of {', '.join(POLICIES)}")
    raw = np.asarray(raw, dtype=np.float32)
    uncertain = raw == -1.0
    labels = np.where(raw == 1.0, 1.0, 0.0).astype(np.float32)
    mask = np.ones(raw.shape, dtype=np.int8)
    if policy == "u-ones":
        labels[uncertain] = 1.0
    elif policy == "u-ignore":
        mask[uncertain] = 0
    return labels, mask
