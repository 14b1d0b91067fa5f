"""The PadChest layout: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` + ``<ImageDir>/<ImageID>``
16-bit greyscale PNGs, ImageDir spread over the real 0..54."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cxrdist.labels import PADCHEST
from cxrdist.synth.common import _canvas, _rng, _write_csv
from cxrdist.synth.labels import sample_labels
from cxrdist.synth.phantom import draw_frontal, draw_lateral

# the real file's columns in its order; the first header is empty (the pandas index it was saved with)
PADCHEST_HEADER = [
    "",
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM",
    "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM",
    "BitsStored_DICOM",
    "WindowCenter_DICOM",
    "WindowWidth_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
    "XRayTubeCurrent_DICOM",
    "Exposure_DICOM",
    "ExposureInuAs_DICOM",
    "ExposureTime",
    "RelativeXRayExposure_DICOM",
    "ReportID",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
]
IMAGE_DIRS = 55  # the zips 0..54 unpack to folders of those names
# Projection per image in the real table: PA 91,728, L 49,579, AP_horizontal 14,346, AP 4,559, the rest (649)
# COSTAL / EXCLUDE / UNK. Here per study: one frontal (these shares), a lateral beside most PAs, rarely another.
FRONTAL_MIX = {"PA": 0.829, "AP_horizontal": 0.130, "AP": 0.041}
LATERAL_WITH_PA = 0.54
OTHER_VIEWS, OTHER_SHARE = ("COSTAL", "EXCLUDE", "UNK"), 0.006
VIEW_POSITION = {"PA": "POSTEROANTERIOR", "L": "LATERAL", "AP": "AP", "AP_horizontal": "AP"}  # the DICOM tag's text
PHYSICIAN = 0.27  # of reports labelled by hand (Bustos et al. 2020); the rest by their RNN
NO_TERMS, NO_BIRTH, CORRUPT = 0.01, 0.02, 0.01  # '[]' reports, blank PatientBirth, broken PNGs (as shipped)
# Share of studies positive per label: illustrative, in the paper's order of frequency, not measured counts
PADCHEST_PREVALENCE: dict[str, tuple[float, float]] = {
    "Infiltration": (0.10, 0.0),
    "Aortic Elongation": (0.08, 0.0),
    "Atelectasis": (0.06, 0.0),
    "Effusion": (0.06, 0.0),
    "Pleural_Thickening": (0.05, 0.0),
    "Scoliosis": (0.05, 0.0),
    "Cardiomegaly": (0.04, 0.0),
    "Support Devices": (0.04, 0.0),
    "Hemidiaphragm Elevation": (0.03, 0.0),
    "Air Trapping": (0.03, 0.0),
    "Aortic Atheromatosis": (0.03, 0.0),
    "Pneumonia": (0.025, 0.0),
    "Nodule": (0.025, 0.0),
    "Costophrenic Angle Blunting": (0.02, 0.0),
    "Consolidation": (0.02, 0.0),
    "Fibrosis": (0.02, 0.0),
    "Granuloma": (0.02, 0.0),
    "Hilar Enlargement": (0.02, 0.0),
    "Fracture": (0.02, 0.0),
    "Hernia": (0.015, 0.0),
    "Bronchiectasis": (0.01, 0.0),
    "Tuberculosis": (0.01, 0.0),
    "Emphysema": (0.01, 0.0),
    "Flattened Diaphragm": (0.01, 0.0),
    "Mass": (0.005, 0.0),
    "Edema": (0.005, 0.0),
    "Pneumothorax": (0.003, 0.0),
}
# the phantom finding (and strength) that draws each label; the others (scoliosis, aortic atheromatosis, ...)
# are labels the phantom cannot draw, as unlearnable here as a finding too small to see
_PADCHEST_DRAWN_AS: dict[str, tuple[str, float]] = {
    "Atelectasis": ("Atelectasis", 1.0),
    "Cardiomegaly": ("Cardiomegaly", 1.0),
    "Effusion": ("Pleural Effusion", 1.0),
    "Infiltration": ("Lung Opacity", 1.0),
    "Mass": ("Lung Lesion", 1.0),
    "Nodule": ("Lung Lesion", 0.7),
    "Pneumonia": ("Pneumonia", 1.0),
    "Pneumothorax": ("Pneumothorax", 1.0),
    "Consolidation": ("Consolidation", 1.0),
    "Edema": ("Edema", 1.0),
    "Emphysema": ("Emphysema", 1.0),
    "Fibrosis": ("Fibrosis", 1.0),
    "Pleural_Thickening": ("Pleural Other", 1.0),
    "Hernia": ("Hernia", 1.0),
    "Fracture": ("Fracture", 1.0),
    "Support Devices": ("Support Devices", 1.0),
    "Costophrenic Angle Blunting": ("Pleural Effusion", 0.5),  # a small effusion
    "Aortic Elongation": ("Enlarged Cardiomediastinum", 0.5),  # a wider upper mediastinum
    "Flattened Diaphragm": ("Emphysema", 0.5),  # hyperinflation
    "Air Trapping": ("Emphysema", 0.5),
}
# terms outside the label set, some of which a substring match would wrongly take for one of its findings
OTHER_TERMS = ("chronic changes", "kyphosis", "pseudonodule", "nipple shadow", "pericardial effusion",
               "subcutaneous emphysema", "unchanged", "COPD signs")  # fmt: skip


def _terms(states: np.ndarray, rng: np.random.Generator, terms_of: dict) -> list[str]:
    """A study's Labels list: a term per positive label (the label's first, sometimes another), now and then
    one outside the set, 'normal' when nothing is positive, and stray spaces as in the real cells."""
    terms = []
    for j in np.flatnonzero(states == 1):
        own = terms_of[PADCHEST[j]]
        terms.append(own[0] if rng.random() < 0.7 else own[int(rng.integers(len(own)))])
    if rng.random() < 0.15:
        terms.append(OTHER_TERMS[int(rng.integers(len(OTHER_TERMS)))])
    if not (states == 1).any() or rng.random() < 0.03:
        terms.insert(0, "normal")
    return [(" " + t if rng.random() < 0.1 else t) for t in dict.fromkeys(terms)]


def _strengths(terms: list[str], label_of: dict[str, str]) -> dict[str, float]:
    """The phantom findings the written terms ask for (a variant term may set a second label, e.g.
    'consolidation' for Infiltration is also Consolidation): drawn from the terms, as the reader reads them."""
    out: dict[str, float] = {}
    for t in terms:
        label = label_of.get(t.strip())
        if label in _PADCHEST_DRAWN_AS:
            finding, s = _PADCHEST_DRAWN_AS[label]
            out[finding] = max(out.get(finding, 0.0), s)
    return out


def _studies(rng: np.random.Generator, n: int) -> list[tuple[int, list[str]]]:
    """(patient, projections) per study until ``n`` images: a frontal, a lateral beside most PAs, rarely another."""
    studies, patient, total = [], 0, 0
    while total < n:
        patient += 1
        for _ in range(min(int(rng.geometric(0.6)), 6)):
            views = [str(rng.choice(list(FRONTAL_MIX), p=list(FRONTAL_MIX.values())))]
            if views[0] == "PA" and rng.random() < LATERAL_WITH_PA:
                views.append("L")
            if rng.random() < OTHER_SHARE:
                views.append(OTHER_VIEWS[int(rng.integers(len(OTHER_VIEWS)))])
            views = views[: n - total]
            studies.append((patient, views))
            total += len(views)
            if total >= n:
                break
    return studies


def _write_png16(path: Path, img01: np.ndarray, broken: int) -> None:
    """A 16-bit greyscale PNG; ``broken`` 1: cut in half (truncated), 2: a chunk header zeroed, as some of the
    real ones are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(img01 * 65535).astype(np.uint16)).save(path)
    if broken:
        data = bytearray(path.read_bytes())
        if broken == 1:
            data = data[: len(data) // 2]
        else:
            data[33:41] = bytes(8)  # the chunk after IHDR: length and type zero
        path.write_bytes(bytes(data))


def _cui(term: str) -> str:
    """A stand-in UMLS CUI for a term (labelCUIS; never read): the same for the same term, in any process."""
    return f"C{zlib.crc32(term.strip().encode()) % 10**7:07d}"


def _dicom_cells(rng: np.random.Generator, view: str, age: float) -> list:
    """ViewPosition_DICOM ... RelativeXRayExposure_DICOM: plausible acquisition values (never read)."""
    rows, cols = (2828, 2320) if rng.random() < 0.6 else (2544, 3056)
    return [VIEW_POSITION.get(view, ""), view, "Manual review of DICOM fields", "PED" if age < 18 else "No",
            "CR" if rng.random() < 0.7 else "DX",
            ("PhilipsMedicalSystems", "ImagingDynamicsCompanyLtd", "GEHealthcare")[int(rng.integers(3))],
            "MONOCHROME2", 0, "", 0.139, 12, 2048, 4096, rows, cols, int(rng.integers(160, 500)),
            int(rng.integers(2, 40)), int(rng.integers(2000, 40000)), int(rng.integers(5, 80)),
            int(rng.integers(100, 3000))]  # fmt: skip


def synth_padchest(out: Path, n: int, size: int, seed: int) -> Path:
    """The table (the real column set and order) and ``<ImageDir>/<ImageID>`` 16-bit PNGs: per study one frontal
    image (PA, AP_horizontal or AP), a lateral beside most PAs; labels by the phantom; 27% Physician rows,
    ~1% '[]' reports, ~2% blank PatientBirth, ~1% of the frontal images broken (at least two)."""
    from cxrdist.sources.padchest import CSV, TERMS  # here: the reader brings pandas, `import cxrdist.synth` does not

    label_of = {t: name for name in PADCHEST for t in TERMS[name]}
    rng = _rng(seed, 31)
    studies = _studies(rng, n)
    hf = {"Edema": 0.6, "Effusion": 0.45, "Cardiomegaly": 0.5, "Costophrenic Angle Blunting": 0.3}
    states = sample_labels(rng, len(studies), names=PADCHEST, prevalence=PADCHEST_PREVALENCE, heart_failure=hf,
                           clear=None)  # fmt: skip
    patients = studies[-1][0]
    sex = rng.choice(["M", "F", "O"], size=patients + 1, p=[0.49, 0.505, 0.005])
    birth = rng.normal(1950, 18, patients + 1).clip(1915, 2015).round()
    no_birth = np.zeros(patients + 1, bool)  # a few, and at least one: the reader's blank-year path
    no_birth[1 + rng.choice(patients, max(1, round(NO_BIRTH * patients)), replace=False)] = True
    empty = rng.random(len(studies)) < NO_TERMS
    frontal = [(si, k) for si, (_, views) in enumerate(studies) for k, v in enumerate(views) if v in FRONTAL_MIX]
    eligible = [f for f in frontal if not empty[f[0]]]
    n_broken = min(len(eligible), max(2, round(CORRUPT * len(eligible))))  # both kinds, even in a small set
    broken = {eligible[i]: 1 + j % 2 for j, i in enumerate(rng.choice(len(eligible), n_broken, replace=False))}
    rows = []
    for si, (p, views) in enumerate(studies):
        study_rng = _rng(seed, 32, si)
        terms = [] if empty[si] else _terms(states[si], study_rng, TERMS)
        year = int(study_rng.integers(2009, 2018))
        date = f"{year}{int(study_rng.integers(1, 13)):02d}{int(study_rng.integers(1, 29)):02d}"
        age = year - birth[p]
        report = "informe sintetico: " + " . ".join(t.strip() for t in terms) if terms else "sin informe"
        method = "Physician" if study_rng.random() < PHYSICIAN else "RNN_model"
        locs = ["loc left", "loc basal"] if (states[si] == 1).any() and terms else []
        for k, view in enumerate(views):
            img_rng = _rng(seed, 33, si, k)
            image_id = f"216840111366964{seed % 10}{si:014d}{k:015d}_{si % 100:02d}-{k:03d}-{p % 1000:03d}.png"
            folder = int(img_rng.integers(IMAGE_DIRS))
            rows.append([len(rows), image_id, folder, date, f"{si:06d}{p:032d}", f"{p:036d}",
                         "" if no_birth[p] else f"{birth[p]:.1f}", sex[p], *_dicom_cells(img_rng, view, age),
                         4_000_000 + si, report, method, str(terms), str(locs),
                         str([[t.strip()] for t in terms]), str([_cui(t) for t in terms]), "[]"])  # fmt: skip
            if view in FRONTAL_MIX:
                h, w = _canvas(img_rng, size, landscape=view == "AP_horizontal" and img_rng.random() < 0.3)
                img = draw_frontal(img_rng, h, w, _strengths(terms, label_of), finding_rng=_rng(seed, 34, si))
            else:
                img = draw_lateral(img_rng, *_canvas(img_rng, size, landscape=False))
            _write_png16(out / str(folder) / image_id, img, broken.get((si, k), 0))
    _write_csv(out / CSV, PADCHEST_HEADER, rows)
    return out
