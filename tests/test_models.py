"""The poster's Table 2 variants, local pretrained weights, demographics fusion, and predict on files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import BlurPool2d

from cxrdist.errors import UserError
from cxrdist.models import build_model, count_blur_filters


def test_variants_differ_where_the_poster_says():
    plain, deep, blur = (build_model(n) for n in ("densenet121", "densenet121d", "densenetblur121d"))
    assert plain.features.conv0.kernel_size == (7, 7)
    assert deep.features.conv0.kernel_size == (3, 3) and deep.features.conv2.kernel_size == (3, 3)
    assert count_blur_filters(deep) == 0 and count_blur_filters(plain) == 0
    # a blur filter before every downsampling step: the stem and the three transitions
    assert count_blur_filters(blur) == 4
    assert all(isinstance(blur.features.get_submodule(f"transition{i}").pool, BlurPool2d) for i in (1, 2, 3))
    for m in (plain, deep, blur):
        assert m(torch.randn(2, 1, 64, 64)).shape == (2, 14)
    assert build_model("densenet121", in_chans=3)(torch.randn(1, 3, 64, 64)).shape == (1, 14)


def test_pretrained_loads_a_local_file_and_sums_rgb_stems(tmp_path):
    src = build_model("densenet121", num_classes=1000, in_chans=3)
    path = tmp_path / "imagenet.pth"
    torch.save(src.state_dict(), path)
    model = build_model("densenet121", in_chans=1, pretrained=path)
    assert torch.allclose(model.features.conv0.weight, src.features.conv0.weight.sum(1, keepdim=True))
    assert torch.equal(
        model.features.denseblock4.denselayer16.conv2.weight, src.features.denseblock4.denselayer16.conv2.weight
    )
    with pytest.raises(UserError, match="no such file"):
        build_model("densenet121", pretrained=tmp_path / "missing.pth")


def test_fused_demographics_change_the_logits():
    torch.manual_seed(0)
    model = build_model("densenet121", fuse_demographics=True).eval()
    x = torch.randn(2, 1, 64, 64)
    a = model(x, torch.tensor([30.0, 80.0]), torch.tensor([1.0, 0.0]))
    b = model(x, torch.tensor([80.0, 30.0]), torch.tensor([0.0, 1.0]))
    assert a.shape == (2, 14) and not torch.allclose(a, b)


def test_predict_reads_dicom_jpeg_and_png_like_packing(tiny_shards, tmp_path):
    from pydicom.data import get_testdata_file

    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxrdist.cli",
            "train",
            "--shards",
            str(tiny_shards["shards"]),
            "--out",
            str(run),
            "--backend",
            "single",
            "--epochs",
            "1",
            "--model",
            "densenet121",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--max-steps",
            "2",
            "--no-test",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jpg = next(tiny_shards["root"].rglob("*frontal.jpg"))
    png = tmp_path / "x.png"
    Image.fromarray((np.linspace(0, 65535, 100 * 120).reshape(100, 120)).astype(np.uint16)).save(png)
    dcm = get_testdata_file("RG1_UNCR.dcm")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(jpg.read_bytes()[:200])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxrdist.cli",
            "predict",
            "--json",
            "--checkpoint",
            str(run / "checkpoints" / "last.pt"),
            str(dcm),
            str(jpg),
            str(png),
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout[out.stdout.index("[") :])
    assert [len(r.get("probabilities", {})) for r in results] == [14, 14, 14, 0]
    assert all(0 <= p <= 1 for r in results[:3] for p in r["probabilities"].values())
    assert "error" in results[3]  # a truncated file is named with its reason, not a crash
