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


@pytest.mark.slow
def test_predict_reads_dicom_jpeg_and_png_like_packing(tiny_shards, tiny_run, tmp_path):
    from pydicom.data import get_testdata_file

    from runs import in_process

    run = tiny_run
    jpg = next(tiny_shards["root"].rglob("*frontal.jpg"))
    png = tmp_path / "x.png"
    Image.fromarray((np.linspace(0, 65535, 100 * 120).reshape(100, 120)).astype(np.uint16)).save(png)
    dcm = get_testdata_file("RG1_UNCR.dcm")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(jpg.read_bytes()[:200])
    files = [dcm, jpg, png, bad]
    out = in_process("predict", "--json", "--checkpoint", run / "checkpoints" / "last.pt", *files)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout[out.stdout.index("[") :])
    assert [len(r.get("probabilities", {})) for r in results] == [14, 14, 14, 0]
    assert all(0 <= p <= 1 for r in results[:3] for p in r["probabilities"].values())
    assert "error" in results[3]  # a truncated file is named with its reason, not a crash


def test_any_timm_model_is_built_and_an_unknown_name_gets_timms_closest():
    for name in ("resnet18", "efficientnet_b0"):
        model = build_model(name, num_classes=14, in_chans=1)
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 14)
        fused = build_model(name, num_classes=5, in_chans=1, fuse_demographics=True)
        assert fused(torch.randn(2, 1, 32, 32), torch.tensor([50.0, float("nan")]), None).shape == (2, 5)
    with pytest.raises(UserError, match=r"--model resnet5: neither .* closest: .*resnet50"):
        build_model("resnet5")


def test_the_plumbing_model_is_a_timm_model_with_the_interfaces_cxrdist_uses():
    """cxrtiny: registered in timm (so --model, check_model_name and timm.create_model take it), ~100k
    parameters with BatchNorm, a head sized by the label set, Grad-CAM's layer, demographics fusion."""
    import timm
    import torch

    from cxrdist.models import build_model, cam_layer, model_info

    assert timm.is_model("cxrtiny")
    model = build_model("cxrtiny", num_classes=5, in_chans=1, drop_rate=0.2)
    assert 80_000 < model_info("cxrtiny", model)["params"] < 120_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5) and cam_layer(model) is model.stages[-1]
    fused = build_model("cxrtiny", num_classes=3, fuse_demographics=True)
    assert fused(torch.randn(2, 1, 32, 32), torch.tensor([50.0, float("nan")]), torch.ones(2)).shape == (2, 3)
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("cxrtiny", pretrained=True)


def test_no_weight_decay_on_norm_and_bias_parameters():
    from cxrdist.config import TrainConfig
    from cxrdist.engine.optim import make_optimizer

    model = build_model("densenet121", num_classes=14)
    opt = make_optimizer(model, TrainConfig())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed and all(names[i].endswith("weight") and model.get_parameter(names[i]).ndim > 1 for i in decayed)
    undecayed = [n for n, p in model.named_parameters() if id(p) not in decayed]
    assert "features.norm5.weight" in undecayed and "classifier.bias" in undecayed
    assert "features.conv0.weight" not in undecayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_a_timm_backbone_trains_one_tiny_epoch(name, tiny_shards, tmp_path):
    from runs import TINY_CPU, in_process, summary

    run = tmp_path / name  # a few steps prove the backbone trains; the test split is still scored
    args = ["--shards", tiny_shards["shards"], "--backend", "single", "--model", name, "--epochs", "1"]
    in_process("train", *args, "--max-steps", "3", "--out", run, *TINY_CPU, check=True)
    s = summary(run)
    assert s["status"] == "completed" and s["config"]["model"]["name"] == name
    assert s["test"]["n"] > 0 and s["epochs"][0]["train_loss"] > 0


def _hf_cache(home, tag: str, state: dict) -> None:
    """A Hugging Face hub cache holding timm/<tag>'s model.safetensors, laid out as huggingface_hub writes it."""
    from safetensors.torch import save_file

    repo = home / "hub" / f"models--timm--{tag}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


PRETRAINED_CHECK = """
import json, sys, torch, timm
from timm.models import adapt_input_conv
from cxrdist.models import build_model
src = torch.load(sys.argv[1], weights_only=True)
out = {}
for name in ("densenet121", "densenet121d"):
    m = build_model(name, num_classes=14, in_chans=1, pretrained="timm")
    own = m.state_dict()
    stem = own["features.conv0.weight"]
    out[name] = {
        "info": m.pretrained_info,
        "stem_adapted": bool(torch.allclose(stem, adapt_input_conv(1, src["features.conv0.weight"])))
        if stem.shape[-1] == 7 else None,
        "block_equal": bool(torch.equal(own["features.denseblock4.denselayer16.conv2.weight"],
                                        src["features.denseblock4.denselayer16.conv2.weight"])),
        "head_fresh": not torch.equal(own["classifier.weight"][:14], src["classifier.weight"][:14]),
    }
print(json.dumps(out))
"""


def test_pretrained_timm_loads_imagenet_weights_from_an_offline_hugging_face_cache(tmp_path, tiny_shards):
    """timm fetches the weights from the cache laid out here (HF_HUB_OFFLINE=1: no network is tried); the
    grey stem is timm's adaptation of the RGB one, the blocks are the source's, the head is new; the deep-stem
    variant reports its stem as left random. Without the cache: one line saying how to fetch them."""
    import os

    import timm

    src = timm.create_model("densenet121", num_classes=1000, in_chans=3)  # stands in for the ImageNet weights
    _hf_cache(tmp_path / "hf", "densenet121.tv_in1k", src.state_dict())
    torch.save(src.state_dict(), tmp_path / "src.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", PRETRAINED_CHECK, str(tmp_path / "src.pt")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    plain, deep = got["densenet121"], got["densenet121d"]
    assert plain["info"]["source"] == "timm:timm/densenet121.tv_in1k" and plain["stem_adapted"]
    assert plain["block_equal"] and plain["head_fresh"]
    assert set(plain["info"]["random"]) == {"classifier.weight", "classifier.bias"}
    assert deep["block_equal"] and "features.conv0.weight" in deep["info"]["random"]
    env["HF_HOME"] = str(tmp_path / "empty")  # offline, not cached: one line saying how to fetch them
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxrdist.cli",
            "train",
            "--pretrained",
            "timm",
            "--model",
            "densenet121",
            "--out",
            str(tmp_path / "r"),
            "--shards",
            str(tiny_shards["shards"]),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode == 2, missing.stderr[-2000:]
    last = missing.stderr.strip().splitlines()[-1]
    assert "not in the Hugging Face cache" in last and "huggingface-cli download timm/densenet121.tv_in1k" in last
