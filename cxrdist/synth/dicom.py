"""Synthetic DICOM files in the transfer syntaxes the installed encoders can write."""

from __future__ import annotations

import numpy as np

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
