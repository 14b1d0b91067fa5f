"""Synthetic chest X-ray datasets in the real CheXpert / MIMIC-CXR / NIH ChestX-ray14 layouts (floor 2).

``synthesize(layout, out, n)`` writes ``n`` phantom radiographs plus the CSVs exactly as the real data sets
ship them, so every source reader, packer and loader can be exercised end to end without patient data:

- ``chexpert``: ``out/CheXpert-v1.0-small/{train,valid}.csv`` + ``{train,valid}/patientNNNNN/studyK/viewJ_*.jpg``
- ``mimic-jpg`` / ``mimic-dicom``: ``out/mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz`` +
  ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.{jpg,dcm}``
- ``nih``: ``out/Data_Entry_2017_v2020.csv`` + ``images_001..012/images/PPPPPPPP_FFF.png`` +
  ``train_val_list.txt`` / ``test_list.txt``
- ``padchest``: ``out/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (the real columns, first header
  empty; Labels as list literals) + ``out/<ImageDir 0..54>/<ImageID>.png`` 16-bit PNGs, laterals included and
  ~1% of the frontal ones broken as some real ones are
- ``rsna``: ``out/stage_2_train_labels.csv`` (a row per opacity box, one box-less row per negative) +
  ``stage_2_detailed_class_info.csv`` + ``stage_2_train_images/<patientId>.dcm`` (8-bit JPEG baseline DICOMs)

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

Everything is a deterministic function of ``seed``. One module per layout (``chexpert``, ``mimic``, ``nih``, ...),
built from ``labels`` (prevalences and co-occurrence), ``phantom`` (the drawing) and ``dicom``.
"""

from __future__ import annotations

from pathlib import Path

from cxrdist.errors import UserError
from cxrdist.synth.chexpert import CHEXPERT_HEADER, synth_chexpert
from cxrdist.synth.dicom import DICOM_SYNTAXES, write_dicom
from cxrdist.synth.labels import NIH_PREVALENCE, PREVALENCE, sample_labels
from cxrdist.synth.mimic import MIMIC_LABELS, MIMIC_METADATA_COLUMNS, synth_mimic
from cxrdist.synth.nih import NIH_HEADER, synth_nih
from cxrdist.synth.padchest import PADCHEST_HEADER, synth_padchest
from cxrdist.synth.phantom import draw_frontal, draw_lateral
from cxrdist.synth.rsna import synth_rsna

__all__ = [
    "LAYOUTS",
    "PREVALENCE",
    "NIH_PREVALENCE",
    "NIH_HEADER",
    "PADCHEST_HEADER",
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


LAYOUTS = {
    "chexpert": synth_chexpert,
    "mimic-jpg": lambda out, n, size, seed: synth_mimic(out, n, size, seed, "jpg"),
    "mimic-dicom": lambda out, n, size, seed: synth_mimic(out, n, size, seed, "dcm"),
    "nih": synth_nih,
    "padchest": synth_padchest,
    "rsna": synth_rsna,
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
