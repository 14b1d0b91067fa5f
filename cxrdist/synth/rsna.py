"""The RSNA Pneumonia Detection layout: ``stage_2_train_labels.csv`` + ``stage_2_detailed_class_info.csv`` +
``stage_2_train_images/<patientId>.dcm``."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np

from cxrdist.synth.common import _rng, _write_csv
from cxrdist.synth.dicom import write_dicom
from cxrdist.synth.phantom import draw_frontal

RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
RSNA_IMAGES = "stage_2_train_images"
RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]
# The real set: 6,012 of 26,684 images positive, of them about half with two boxes or more; of the 20,672
# negatives 11,821 "No Lung Opacity / Not Normal" (another finding), 8,851 "Normal".
POSITIVE = 0.225
TWO_BOXES = 0.55
NOT_NORMAL = 0.57
AP = (0.4, 0.7)  # P(AP) for negatives, positives: the sick are mostly portable AP films
# How a positive is drawn: one box, an opacity in one lung (haze or patchy airspace disease); two boxes,
# bilateral perihilar opacities (one box a lung). `draw_frontal(regions=)` says where each was drawn.
ONE_BOX = ("Lung Opacity", "Pneumonia")
TWO_BOX = "Edema"
OTHER = ("Cardiomegaly", "Pleural Effusion", "Lung Lesion", "Pneumothorax")  # Not Normal, no opacity


def _patient_id(rng: np.random.Generator) -> str:
    """A uuid4-like patientId ('0004cfab-14fd-4e49-80ba-63a80b6bddd6'), from the seeded generator."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _draw(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, list[tuple], str]:
    """One image: (pixels, its opacity boxes (x, y, w, h), its detailed class)."""
    if positive:
        findings = {TWO_BOX if rng.random() < TWO_BOXES else str(rng.choice(ONE_BOX)): 1.0}
    elif rng.random() < NOT_NORMAL:
        findings = {str(rng.choice(OTHER)): 1.0}
    else:
        findings = {}
    regions: dict = {}
    img = draw_frontal(rng, size, size, findings, regions=regions)
    boxes = [b for name in findings if name in (*ONE_BOX, TWO_BOX) for b in regions.get(name, ())]
    cls = "Lung Opacity" if boxes else ("No Lung Opacity / Not Normal" if findings else "Normal")
    return img, boxes, cls


def write_rsna_dicom(path, img01: np.ndarray, pid: str, *, view: str, sex: str, age: int) -> None:
    """One DICOM as RSNA ships them: MONOCHROME2, 8-bit, lossy JPEG (baseline), the patientId as PatientName
    and PatientID, ViewPosition, PatientSex and a bare PatientAge ('51', where DICOM writes '051Y').
    ``write_dicom`` makes the dataset (UIDs, modality, view); its pixels and patient tags are then replaced."""
    import pydicom
    from PIL import Image
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    write_dicom(buf, img01, window=False, uid_seed=pid, modality="CR", view=view)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    jpeg = io.BytesIO()
    Image.fromarray(np.rint(np.clip(img01, 0, 1) * 255).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PatientName = ds.PatientID = pid
    ds.PatientSex = sex
    # RSNA's bare '51' is not a valid AS value: written as the real files have it, without pydicom's warning
    ds[0x00101010] = DataElement(0x00101010, "AS", str(age), validation_mode=config.IGNORE)
    ds.save_as(path, enforce_file_format=True)


def synth_rsna(out: Path, n: int, size: int, seed: int) -> Path:
    """stage_2_train_labels.csv (one row per box of a positive, one box-less row per negative),
    stage_2_detailed_class_info.csv (its row-for-row class) and stage_2_train_images/<patientId>.dcm
    (square ``size`` px, MONOCHROME2 8-bit JPEG baseline, view/sex/age in the header); ~22% positive."""
    rng = _rng(seed, 31)
    positive = np.zeros(n, bool)
    positive[rng.permutation(n)[: int(round(POSITIVE * n))]] = True
    folder = out / RSNA_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    rows, classes = [], []
    for i in range(n):
        img_rng = _rng(seed, 32, i)
        pid = _patient_id(img_rng)
        img, boxes, cls = _draw(img_rng, size, bool(positive[i]))
        view = "AP" if img_rng.random() < AP[bool(boxes)] else "PA"
        sex = "M" if img_rng.random() < 0.57 else "F"
        age = int(np.clip(img_rng.normal(47, 16.5), 1, 92))
        write_rsna_dicom(folder / f"{pid}.dcm", img, pid, view=view, sex=sex, age=age)
        # a positive drawn too faint to box at a tiny size is written as what it shows: a negative
        mine = [[pid, x, y, w, h, 1] for x, y, w, h in boxes] or [[pid, "", "", "", "", 0]]
        rows += mine
        classes += [[pid, cls]] * len(mine)
    _write_csv(out / RSNA_LABELS, RSNA_HEADER, rows)
    _write_csv(out / RSNA_CLASSES, ["patientId", "class"], classes)
    return out
