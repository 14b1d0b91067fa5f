"""Label sets (CheXpert's 14 observations, NIH ChestX-ray14's 14 findings), the mapping between them, and the
uncertainty policies.

A shard folder's ``manifest.json`` names its labels (in order); from there they go into the model head, the
loss mask, metrics, reports, checkpoints and ``predict``. Labels are always addressed by *name*: CheXpert's
CSVs list them in the order below, MIMIC-CXR's ``chexpert.csv`` alphabetically, NIH's ``Finding Labels`` as
``|``-separated names. Raw cells are ``1.0`` (positive), ``0.0`` (negative), ``-1.0`` (uncertain) or blank
(not mentioned).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cxrdist.errors import UserError

CHEXPERT: tuple[str, ...] = (
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
# NIH ChestX-ray14 (Wang et al. 2017), in the order of the paper's tables; "No Finding" is the absence of all
NIH: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
# Google's adjudicated labels for 4,376 NIH images (Majkowska et al. 2019; sources/nih_expert.py)
NIH_EXPERT: tuple[str, ...] = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
# RSNA Pneumonia Detection (sources/rsna.py): its Target, "lung opacity suspicious for pneumonia"
RSNA: tuple[str, ...] = ("Lung Opacity",)
# PadChest (sources/padchest.py, which says which of its terms make each label positive): torchxrayvision's PadChest
# pathologies, named as NIH or CheXpert name the same finding so that --map-labels and overlap() work across sets
# with no new pair: NIH's 14 in NIH's order, CheXpert's Fracture and Support Devices, then PadChest's own
PADCHEST: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    "Fracture",
    "Support Devices",
    "Granuloma",
    "Flattened Diaphragm",
    "Bronchiectasis",
    "Aortic Elongation",
    "Scoliosis",
    "Hilar Enlargement",
    "Tuberculosis",
    "Air Trapping",
    "Costophrenic Angle Blunting",
    "Aortic Atheromatosis",
    "Hemidiaphragm Elevation",
)
LABEL_SETS: dict[str, tuple[str, ...]] = {
    "chexpert": CHEXPERT,
    "nih": NIH,
    "nih-expert": NIH_EXPERT,
    "padchest": PADCHEST,
    "rsna": RSNA,
}
# The CheXpert competition's five (Irvin et al. 2019, Table 2): the mean papers compare on valid.csv
COMPETITION5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
OBSERVATIONS = CHEXPERT  # the CheXpert and MIMIC-CXR sources' own labels; the poster's head
NUM_CLASSES = len(CHEXPERT)

# Names in two sets that mean the same finding. Identical names (Atelectasis, Cardiomegaly, Consolidation,
# Edema, Pneumonia, Pneumothorax) match by themselves. Deliberately absent: Mass/Nodule vs Lung Lesion and
# Infiltration vs Lung Opacity (one is a part of the other, not the same finding), Pleural_Thickening vs
# Pleural Other (CheXpert's is broader).
SAME_FINDING: tuple[tuple[str, str], ...] = (("Effusion", "Pleural Effusion"),)
# The nearest finding between two *registered* sets, keyed by their names (``set_name``) and consulted by
# ``overlap`` only (a model of one set scored on shards of the other: ``eval --map-labels``), never by
# ``counterpart`` (so never by ``--labels``). RSNA's Target was made by re-reading NIH ChestX-ray14 images
# with pneumonia-related findings, so NIH's Pneumonia is its nearest; CheXpert's Lung Opacity and NIH's
# Pneumonia are not the same finding, so the pair is not in SAME_FINDING (CheXpert <-> NIH stays at 7).
NEAREST: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("rsna", "nih"): (("Lung Opacity", "Pneumonia"),),
    ("rsna", "padchest"): (("Lung Opacity", "Pneumonia"),),  # PadChest names NIH's findings as NIH does
}

# a label name becomes a table column and a json key: printable, no separators that other files use
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _().+-]{0,63}$")
RESERVED = {"key", "path", "patient_id", "study_id", "view", "sex", "age", "split"}

POLICIES: tuple[str, ...] = ("u-zeros", "u-ones", "u-ignore")
DEFAULT_POLICY = "u-zeros"  # the poster's


def counterpart(name: str, available) -> str | None:
    """The name in ``available`` for the finding ``name`` (itself, or its SAME_FINDING partner); None."""
    available = set(available)
    if name in available:
        return name
    for a, b in SAME_FINDING:
        if name == a and b in available:
            return b
        if name == b and a in available:
            return a
    return None


def union(sets) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """Several sources' label sets as one (a mixed run's head): the first set's names in order, then each later
    set's findings that no earlier set holds (the same finding: ``counterpart``, never ``NEAREST``, which is for
    scoring only); with, per set, the union's column of each of its labels."""
    names: list[str] = []
    columns = []
    for labels in sets:
        cols = []
        for name in labels:
            have = counterpart(name, names)
            if have is None:
                names.append(name)
                have = name
            cols.append(names.index(have))
        if len(set(cols)) != len(cols):
            raise UserError(f"labels {describe(labels)} name one finding twice (by SAME_FINDING): cannot mix them")
        columns.append(tuple(cols))
    return tuple(names), columns


def overlap(wanted, have) -> list[tuple[str, str]]:
    """(name in ``wanted``, name in ``have``) for every finding both sets hold, in ``wanted``'s order: the same
    finding (``counterpart``), else, between two registered sets with a ``NEAREST`` entry, its nearest."""
    near = nearest(wanted, have)
    pairs = [(w, counterpart(w, have) or near.get(w)) for w in wanted]
    return [(w, h) for w, h in pairs if h is not None]


def nearest(wanted, have) -> dict[str, str]:
    """{name in ``wanted``: name in ``have``} from ``NEAREST`` for exactly these two sets, either way round."""
    a, b = set_name(wanted), set_name(have)
    return dict(NEAREST.get((a, b), ())) | {h: w for w, h in NEAREST.get((b, a), ())}


def resolve(spec: str) -> tuple[str, ...]:
    """``--labels``: a registered set's name (``LABEL_SETS``) or a text file with one label per line
    (blank lines and ``#`` comments ignored). Raises UserError naming the file and line of a bad name."""
    if spec in LABEL_SETS:
        return LABEL_SETS[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"--labels {spec}: neither a label set ({', '.join(LABEL_SETS)}) nor a file")
    names: list[str] = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not _NAME.match(name) or name in RESERVED:
            raise UserError(f"{path}:{n}: {name!r} is not a usable label name (letters, digits, ' _().+-')")
        if name in names:
            raise UserError(f"{path}:{n}: label {name!r} is listed twice")
        names.append(name)
    if not names:
        raise UserError(f"{path}: no label names (one per line)")
    return tuple(names)


def set_name(names) -> str:
    """The registered set's name (``chexpert``, ``nih``, ...) when ``names`` is exactly one, else ``custom``."""
    return next((k for k, v in LABEL_SETS.items() if tuple(names) == v), "custom")


def describe(names) -> str:
    """A label set in one line for error messages: its registered name, or the names themselves."""
    names = tuple(names)
    name = set_name(names)
    return f"{name} ({len(names)} labels)" if name != "custom" else f"[{', '.join(names)}]"


def check_same(expected, got, *, what: str, against: str) -> None:
    """Refuse (UserError naming both sets) when two label sets differ in names or order."""
    if list(expected) != list(got):
        raise UserError(
            f"{what} has labels {describe(got)}, but {against} has {describe(expected)}: they must be the same "
            "set in the same order"
        )


def checkpoint_labels(client: dict) -> tuple[str, ...]:
    """The label set a checkpoint's client state was trained on (checkpoints before label sets: CheXpert's)."""
    return tuple((client.get("data") or {}).get("labels") or CHEXPERT)


def apply_policy(raw: np.ndarray, policy: str = DEFAULT_POLICY) -> tuple[np.ndarray, np.ndarray]:
    """Map raw label cells (N x L floats: 1, 0, -1, NaN) to (labels float32, mask int8).

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
