"""cxrdist.imaging on real radiographs (pydicom-data / pydicom test files) and real JPEG/PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from cxrdist import imaging
from cxrdist.imaging import UnusableImage

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402


def data_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


def corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


# ------------------------------------------------------------------------------------- real chest CR


@pytest.fixture(scope="module")
def rg1():
    """The same PA chest CR (MONOCHROME1, 15-bit, window 15000/30000) stored three ways, at 256 px."""
    return {
        name: imaging.fit_square(imaging.read_dicom(data_file(f"RG1_{name}.dcm")), 256)
        for name in ("UNCR", "J2KR", "J2KI")
    }


def test_chest_cr_renders_alike_across_transfer_syntaxes(rg1):
    ref = rg1["UNCR"]
    assert ref.shape == (256, 256) and ref.dtype == np.float32
    assert 0.0 <= ref.min() and ref.max() <= 1.0 and ref.std() > 0.1
    np.testing.assert_array_equal(rg1["J2KR"], ref)  # lossless JPEG 2000: identical
    assert corr(rg1["J2KI"], ref) > 0.98  # lossy JPEG 2000: alike
    assert np.abs(rg1["J2KI"] - ref).mean() < 0.02


def test_chest_cr_right_way_round(rg1):
    """MONOCHROME1 is inverted: mediastinum/spine bright, both lungs dark."""
    img = rg1["UNCR"]  # 1955 x 1841 -> 256 rows x 241 columns, centred
    centre = img[60:160, 118:138].mean()
    right_lung = img[70:150, 50:90].mean()
    left_lung = img[70:150, 165:205].mean()
    assert centre > right_lung + 0.15
    assert centre > left_lung + 0.15


def test_window_is_applied():
    """RG1 carries WindowCenter/Width 15000/30000: output must equal the LINEAR window of the raw data."""
    ds = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1.0 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # MONOCHROME1
    got = imaging.read_dicom(data_file("RG1_UNCR.dcm"))
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ------------------------------------------------------------------------------ compressed syntaxes


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_lossless_syntaxes_match_uncompressed(name):
    ref = imaging.read_dicom(data_file("MR_small.dcm"))  # signed 16-bit with a window
    got = imaging.read_dicom(data_file(name))
    assert got.shape == (64, 64) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert ref.std() > 0.1


@pytest.mark.parametrize(
    "name, shape",
    [("JPEG-LL.dcm", (1024, 256)), ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024))],
)
def test_jpeg_lossless_decodes(name, shape):
    img = imaging.read_dicom(data_file(name))
    assert img.shape == shape and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() - img.min() > 0.5


def test_voi_lut_sequence_and_modality_lut():
    for name in ("vlut_04.dcm", "mlut_18.dcm"):
        img = imaging.read_dicom(data_file(name))
        assert img.shape == (512, 512)
        assert img.min() == 0.0 and img.max() == 1.0 and 0.3 < img.mean() < 0.7


def test_voi_lut_sequence_is_used():
    """vlut_04's VOI LUT is not the identity: the output must follow the LUT, not a min-max stretch."""
    ds = pydicom.dcmread(data_file("vlut_04.dcm"))
    from pydicom.pixels import apply_voi

    lut = apply_voi(ds.pixel_array, ds).astype(np.float64)
    expected = (lut - lut.min()) / (lut.max() - lut.min())
    got = imaging.read_dicom(data_file("vlut_04.dcm"))
    assert corr(got, expected) > 0.999


@pytest.mark.parametrize(
    "name, reason",
    [
        ("emri_small.dcm", "multi-frame DICOM (NumberOfFrames=10)"),
        ("SC_rgb.dcm", "colour image (PhotometricInterpretation=RGB)"),
        ("OBXXXX1A_rle.dcm", "colour image (PhotometricInterpretation=PALETTE COLOR)"),
    ],
)
def test_unusable_dicoms(name, reason):
    with pytest.raises(UnusableImage) as exc:
        imaging.read_image(data_file(name))
    assert str(exc.value) == reason


def test_missing_and_not_dicom(tmp_path):
    with pytest.raises(UnusableImage, match="missing file"):
        imaging.read_image(tmp_path / "nope.dcm")
    with pytest.raises(UnusableImage, match="missing file"):
        imaging.read_image(tmp_path / "nope.jpg")
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"this is not dicom at all" * 20)
    with pytest.raises(UnusableImage):
        imaging.read_dicom(bogus)


def test_no_pixel_data(tmp_path):
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(UnusableImage, match="^no pixel data$"):
        imaging.read_image(tmp_path / "empty.dcm")


def test_dicom_without_suffix_is_detected(tmp_path):
    target = tmp_path / "IM0001"
    target.write_bytes(open(data_file("MR_small.dcm"), "rb").read())
    assert imaging.is_dicom(target)
    np.testing.assert_array_equal(imaging.read_image(target), imaging.read_dicom(data_file("MR_small.dcm")))


# ------------------------------------------------------------------------------------- JPEG / PNG


def smooth_image(h=96, w=80) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (0.5 + 0.4 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.float32)


def test_read_image_8bit_16bit_and_rgb(tmp_path):
    img = smooth_image()
    u8 = np.rint(img * 255).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    np.testing.assert_allclose(imaging.read_image(tmp_path / "a.png"), u8 / 255.0, atol=1e-6)

    u16 = np.rint(img * 65535).astype(np.uint16)
    Image.fromarray(u16).save(tmp_path / "b.png")
    got = imaging.read_image(tmp_path / "b.png")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, u16 / 65535.0, atol=1e-6)

    Image.fromarray(np.stack([u8] * 3, axis=-1)).save(tmp_path / "c.jpg", quality=98)
    grey = imaging.read_image(tmp_path / "c.jpg")
    assert grey.shape == img.shape
    assert np.abs(grey - img).max() < 4 / 255


def test_truncated_jpeg_raises(tmp_path):
    _, data = imaging.encode(smooth_image(256, 256), "jpg")
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: len(data) // 2])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        for flag in (False, True):  # even when some library switched lenient loading on
            ImageFile.LOAD_TRUNCATED_IMAGES = flag
            with pytest.raises(UnusableImage, match="truncated or corrupt JPEG"):
                imaging.read_image(path)
            assert ImageFile.LOAD_TRUNCATED_IMAGES is flag
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    with pytest.raises(UnusableImage, match="truncated or corrupt JPEG"):
        imaging.decode(data[: len(data) // 2], "jpg")


def test_corrupt_bytes_raise():
    for ext in ("jpg", "png"):
        with pytest.raises(UnusableImage):
            imaging.decode(b"\x00\x01garbage" * 50, ext)


# -------------------------------------------------------------------------------- encode / decode


def test_png16_round_trip_is_lossless():
    img = np.random.default_rng(0).random((64, 48)).astype(np.float32)
    ext, data = imaging.encode(img, "png16")
    assert ext == "png"
    out = imaging.decode(data, ext)
    assert out.dtype == np.uint16 and out.shape == (64, 48)
    np.testing.assert_array_equal(out, np.rint(img * 65535).astype(np.uint16))


def test_jpg_round_trip_within_a_few_grey_levels():
    img = smooth_image()
    ext, data = imaging.encode(img, "jpg")
    assert ext == "jpg" and data[:2] == b"\xff\xd8"
    out = imaging.decode(data, ext)
    assert out.dtype == np.uint8 and out.shape == img.shape
    diff = np.abs(out.astype(np.int16) - np.rint(img * 255).astype(np.int16))
    assert diff.max() <= 4 and diff.mean() < 1.0
    assert Image.open(io.BytesIO(data)).mode == "L"


def test_encode_rounds_rather_than_truncates():
    flat = np.full((16, 16), 10.6 / 255, np.float32)
    assert (imaging.decode(imaging.encode(flat, "jpg")[1], "jpg") == 11).all()
    flat16 = np.full((16, 16), 1000.6 / 65535, np.float32)
    assert (imaging.decode(imaging.encode(flat16, "png16")[1], "png") == 1001).all()
    with pytest.raises(ValueError):
        imaging.encode(flat, "webp")


# ---------------------------------------------------------------------------------------- geometry


def test_fit_square_keeps_aspect_with_zero_bars():
    wide = np.ones((100, 200), np.float32)
    out = imaging.fit_square(wide, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert (out[:16] == 0).all() and (out[48:] == 0).all()
    np.testing.assert_allclose(out[16:48], 1.0, atol=1e-6)

    tall = np.ones((200, 100), np.float32)
    out = imaging.fit_square(tall, 64)
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    np.testing.assert_allclose(out[:, 16:48], 1.0, atol=1e-6)


def test_fit_square_antialiases():
    """A 1-px checkerboard downsampled 8x must average to grey, not alias to black/white stripes."""
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    out = imaging.fit_square(checker, 64)
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.05


def test_load_for_model_is_what_packing_stores():
    path = data_file("RG1_UNCR.dcm")
    for enc, dtype in (("jpg", np.uint8), ("png16", np.uint16)):
        got = imaging.load_for_model(path, 128, enc)
        ext, data = imaging.encode(imaging.fit_square(imaging.read_image(path), 128), enc)
        assert got.dtype == dtype and got.shape == (128, 128)
        np.testing.assert_array_equal(got, imaging.decode(data, ext))
