"""Chest radiographs in, normalised greyscale arrays out (floor 1).

``read_image`` / ``read_dicom`` turn a DICOM, JPEG or PNG into a float32 2-D array in [0, 1] with bone
bright and lungs dark; ``fit_square`` brings it to the packed size; ``encode`` / ``decode`` are the bytes a
shard stores; ``load_for_model`` chains them so that prediction on a file sees exactly what packing stored.

Anything that cannot become one greyscale radiograph raises :class:`UnusableImage` with a short reason;
callers record it as a skipped sample. No patient tag is ever read from a DICOM: only the pixel module,
the modality/VOI LUT attributes and the pixel data are parsed (``dcmread(specific_tags=...)``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "UnusableImage",
    "ENCODINGS",
    "is_dicom",
    "read_dicom",
    "read_image",
    "fit_square",
    "encode",
    "decode",
    "load_for_model",
]

ENCODINGS = ("jpg", "png16")  # encode() names -> the file extension a shard stores: jpg, png
JPEG_QUALITY = 95
DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")

# The only DICOM attributes ever parsed: pixel module, modality LUT, VOI LUT, pixel data.
_DICOM_TAGS = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
]


class UnusableImage(Exception):
    """The file cannot be used as one greyscale radiograph; ``str(exc)`` is a short human reason."""


# ----------------------------------------------------------------------------------------------- DICOM


def is_dicom(path) -> bool:
    """True if the file starts with a DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first(value) -> float:
    """First value of a possibly multi-valued DS/IS element."""
    if value is None:
        raise ValueError("empty")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        y = (x - center) / width + 0.5
    else:  # LINEAR
        y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(y, 0.0, 1.0)


def _auto_range(x: np.ndarray) -> np.ndarray:
    """No VOI in the file: stretch the 0.5th..99.5th percentile (min..max if that is flat) to [0, 1]."""
    step = max(1, int(np.sqrt(x.size / 250_000)))  # ~250k pixels are plenty for percentiles
    sample = x[::step, ::step]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path) -> np.ndarray:
    """Read one single-frame greyscale DICOM as float32 2-D in [0, 1], bone bright / lungs dark.

    Pixel data is decoded by pydicom (JPEG Lossless, JPEG-LS, JPEG 2000 and RLE through the pylibjpeg /
    pyjpegls plugins). Then the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then the
    VOI: a VOI LUT Sequence if present, else the first WindowCenter/WindowWidth (honouring VOILUTFunction),
    else the 0.5..99.5 percentile range of the image. MONOCHROME1 is inverted last. Multi-frame, colour,
    1-bit or >16-bit data raise :class:`UnusableImage`.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi

    path = Path(path)
    if not path.is_file():
        raise UnusableImage("missing file")
    try:
        ds = pydicom.dcmread(path, specific_tags=_DICOM_TAGS)
    except InvalidDicomError:
        raise UnusableImage("not a DICOM file") from None
    except Exception as e:  # truncated header, bad element lengths, ...
        raise UnusableImage(f"corrupt DICOM: {type(e).__name__}: {e}") from None

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnusableImage("no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnusableImage(f"multi-frame DICOM (NumberOfFrames={frames})")
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    spp = int(ds.get("SamplesPerPixel") or 1)
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnusableImage(f"colour image (PhotometricInterpretation={pi or 'missing'})")
    bits = int(ds.get("BitsAllocated") or 0)
    if bits not in (8, 16):
        raise UnusableImage(f"unsupported bit depth (BitsAllocated={bits})")

    try:
        arr = ds.pixel_array
    except Exception as e:  # missing plugin, corrupt or truncated codestream
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise UnusableImage(f"cannot decode pixel data ({name}): {type(e).__name__}: {e}") from None
    if arr.ndim != 2:
        raise UnusableImage(f"not a 2-D image (pixel array shape {arr.shape})")

    try:
        x = apply_modality_lut(arr, ds)
    except Exception as e:
        raise UnusableImage(f"bad modality LUT: {e}") from None
    x = np.asarray(x, dtype=np.float64)

    y = None
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        try:
            # The LUT's own output range: map every possible 16-bit input (signed or not) through it;
            # inputs outside the LUT clamp to its first/last entry.
            domain = np.arange(-32768, 65536, dtype=np.int64)
            lut_out = np.asarray(apply_voi(domain, ds, index=0), dtype=np.float64)
            lo, hi = float(lut_out.min()), float(lut_out.max())
            if hi > lo:  # the LUT indexes integer input values
                xi = np.rint(x).astype(np.int64)
                y = (np.asarray(apply_voi(xi, ds, index=0), dtype=np.float64) - lo) / (hi - lo)
        except Exception:
            y = None  # a broken LUT: fall through to the window / auto range
    if y is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (ValueError, TypeError, IndexError):
            center, width = 0.0, 0.0
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if width > 1.0 or (width > 0 and function.upper() != "LINEAR"):
            y = _window(x, center, width, function)
    if y is None:
        y = _auto_range(x)

    y = np.clip(y, 0.0, 1.0).astype(np.float32)
    if pi == "MONOCHROME1":
        y = 1.0 - y
    return y


# ------------------------------------------------------------------------------------- JPEG / PNG


@contextlib.contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files even if some other library switched LOAD_TRUNCATED_IMAGES on."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _pil_to_float(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "I":  # 16-bit PNGs on some Pillow versions; values are 0..65535
        a = np.asarray(img)
        scale = 65535.0 if a.max() > 255 or img.format == "PNG" else 255.0
        return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if mode != "L":  # RGB(A), P, LA, CMYK, YCbCr, 1 -> luminance
        img = img.convert("L")
    return np.asarray(img).astype(np.float32) / 255.0


def _open_raster(fp, kind: str, formats=None) -> Image.Image:
    try:
        with _strict_truncation():
            img = Image.open(fp, formats=formats)
            img.load()  # PIL decodes lazily: force it so truncation is seen here
    except FileNotFoundError:
        raise UnusableImage("missing file") from None
    except Image.DecompressionBombError as e:
        raise UnusableImage(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnusableImage(f"truncated or corrupt {kind}: {e}") from None
    return img


def read_image(path) -> np.ndarray:
    """Read a radiograph file as float32 2-D in [0, 1] (bone bright).

    ``.dcm`` (or any file with a DICOM preamble) -> :func:`read_dicom`; ``.jpg``/``.jpeg``/``.png`` -> PIL,
    8-bit scaled by 255 and 16-bit by 65535, colour converted to luminance.
    """
    path = Path(path)
    if not path.is_file():
        raise UnusableImage("missing file")
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return read_dicom(path)
    if suffix in RASTER_SUFFIXES:
        kind = "PNG" if suffix == ".png" else "JPEG"
        with _open_raster(path, kind) as img:
            a = _pil_to_float(img)
        if a.ndim != 2:
            raise UnusableImage(f"not a 2-D image (shape {a.shape})")
        return a
    if is_dicom(path):
        return read_dicom(path)
    raise UnusableImage(f"unsupported file type {suffix or '(no suffix)'!r}")


# ---------------------------------------------------------------------------------------- geometry


def square_frame(h: int, w: int, size: int) -> tuple[float, int, int, int, int]:
    """Where ``fit_square`` puts an h x w image: (scale, top, left, new h, new w)."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return scale, (size - nh) // 2, (size - nw) // 2, nh, nw


def fit_boxes(boxes, h: int, w: int, size: int) -> list[dict]:
    """Boxes -> the same boxes in ``fit_square``'s frame for an h x w image, as the json a sample carries
    ({label, x, y, w, h}, rounded to 0.01 px). A box is (label, x, y, w, h) in the file's pixels, or
    (label, x, y, w, h, frame_w, frame_h) in a stated frame: NIH's boxes are in the 1024 x 1024 frame its
    PNGs ship in, and stay right for a copy of the images resized to another size."""
    scale, top, left, nh, nw = square_frame(h, w, size)
    out = []
    for lab, x, y, bw, bh, *frame in boxes:
        fw, fh = frame or (w, h)
        sx, sy = nw / fw, nh / fh  # the rounded new size, exactly as the pixels were resampled
        out.append({"label": str(lab), "x": round(left + x * sx, 2), "y": round(top + y * sy, 2),
                    "w": round(bw * sx, 2), "h": round(bh * sy, 2)})  # fmt: skip
    return out


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """Letterbox ``img`` into a float32 ``size`` x ``size`` array.

    The longer side is resized to ``size`` (bilinear with antialiasing, so downscaling a 2-3k radiograph
    does not alias) and the shorter side is padded with 0 (black) equally on both sides. Padding rather
    than a centre crop is deliberate: a landscape AP film centre-cropped to a square loses the lateral
    chest walls and both costophrenic angles, which is where effusions and pneumothoraces are seen.
    """
    import torch
    import torch.nn.functional as F

    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"fit_square expects a 2-D image, got shape {img.shape}")
    size = int(size)
    h, w = img.shape
    if h == 0 or w == 0:
        raise UnusableImage("empty image")
    scale, top, left, nh, nw = square_frame(h, w, size)
    if (nh, nw) == (h, w):
        resized = img
    else:
        t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
        resized = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        resized = resized[0, 0].numpy()
    out = np.zeros((size, size), np.float32)
    out[top : top + nh, left : left + nw] = np.clip(resized, 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------- encode / decode


def encode(img01: np.ndarray, encoding: str) -> tuple[str, bytes]:
    """Encode a [0, 1] float image for a shard: ``"jpg"`` -> ("jpg", 8-bit grey JPEG, quality 95),
    ``"png16"`` -> ("png", 16-bit grey PNG). Values are rounded, not truncated."""
    a = np.clip(np.asarray(img01, dtype=np.float32), 0.0, 1.0)
    if a.ndim != 2:
        raise ValueError(f"encode expects a 2-D image, got shape {a.shape}")
    buf = io.BytesIO()
    if encoding == "jpg":
        Image.fromarray(np.rint(a * 255.0).astype(np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buf.getvalue()
    if encoding == "png16":
        Image.fromarray(np.rint(a * 65535.0).astype(np.uint16)).save(buf, format="PNG")
        return "png", buf.getvalue()
    raise ValueError(f"unknown image encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


_decode_jpeg = None  # chosen on first use: torchvision's libjpeg-turbo op if it works here, else PIL


def _jpeg_decoder():
    """The faster of the two JPEG decoders measured on a 256-px grey JPEG (torchvision's op ~1.2-1.5x PIL).

    The op is called directly (``torch.ops.image.decode_jpeg``): torchvision 0.29's Python wrapper adds
    a deprecation warning and bookkeeping per call. It is checked once on a real JPEG; if torchvision or
    the op is missing, changed or broken, PIL is used.
    """
    global _decode_jpeg
    if _decode_jpeg is None:
        _decode_jpeg = _pil_decode_jpeg
        try:
            import torch
            import torchvision.io.image as tv_image

            op = torch.ops.image.decode_jpeg
            gray = tv_image.ImageReadMode.GRAY.value

            def tv_decode(data: bytes) -> np.ndarray:
                t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return op(t, gray, False)[0].numpy()

            probe = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
            buf = io.BytesIO()
            Image.fromarray(probe).save(buf, format="JPEG", quality=JPEG_QUALITY)
            if np.array_equal(tv_decode(buf.getvalue()), _pil_decode_jpeg(buf.getvalue())):
                _decode_jpeg = tv_decode
        except Exception:  # no torchvision, no image ops, or a changed op signature
            pass
    return _decode_jpeg


def _pil_decode_jpeg(data: bytes) -> np.ndarray:
    with _open_raster(io.BytesIO(data), "JPEG", ("JPEG",)) as img:
        if img.mode != "L":
            img = img.convert("L")
        return np.asarray(img)


def decode(data: bytes, ext: str) -> np.ndarray:
    """Decode shard bytes: ``"jpg"`` -> uint8 H x W, ``"png"`` -> uint16 H x W (an 8-bit PNG is scaled
    by 257 so that 255 -> 65535). Corrupt bytes raise :class:`UnusableImage`."""
    ext = ext.lower().lstrip(".")
    if ext in ("jpg", "jpeg"):
        try:
            return _jpeg_decoder()(data)
        except UnusableImage:
            raise
        except Exception as e:  # torchvision raises RuntimeError on corrupt / truncated data
            raise UnusableImage(f"truncated or corrupt JPEG: {e}") from None
    if ext == "png":
        with _open_raster(io.BytesIO(data), "PNG", ("PNG",)) as img:
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                a = np.asarray(img)
                return np.clip(a, 0, 65535).astype(np.uint16) if a.dtype != np.uint16 else a.copy()
            if img.mode != "L":
                img = img.convert("L")
            return np.asarray(img).astype(np.uint16) * np.uint16(257)
    raise ValueError(f"unknown image extension {ext!r}; expected jpg or png")


def load_for_model(path, size: int, encoding: str = "jpg", min_side: int = 0) -> np.ndarray:
    """read_image -> fit_square -> encode -> decode: exactly the pixels a shard would hold for ``path``
    (uint8 for ``jpg``, uint16 for ``png16``). ``min_side``: a smaller image is UnusableImage (a 1x1 file
    would otherwise be upscaled and scored as if it were a radiograph)."""
    img = read_image(path)
    if min(img.shape) < min_side:
        raise UnusableImage(
            f"too small: {img.shape[1]}x{img.shape[0]} px, a radiograph is at least {min_side} px a side"
        )
    ext, data = encode(fit_square(img, size), encoding)
    return decode(data, ext)
