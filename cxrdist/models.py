"""The poster's DenseNet-121 variants (Table 2), and any other timm model, with a head for the shard folder's
label set.

- ``densenet121``: one 7x7 stem convolution, max-pool downsampling.
- ``densenet121d``: timm's DenseNet-121 with ``stem_type='deep'`` (three 3x3 convolutions).
- ``densenetblur121d``: the deep stem plus a BlurPool before *every* downsampling step, as the poster
  says (Relu∘Conv(k,s) -> BlurPool(m,s)∘Relu∘Conv(k,1)): the stem and the three transitions, four blur
  filters. timm's registered ``densenetblur121d`` blurs only the stem (``aa_stem_only=True``); we pass
  ``aa_stem_only=False``.
Any other ``--model`` is a timm model name (``resnet50``, ``convnext_tiny``, ``efficientnet_b0``, ...) built by
``timm.create_model`` with the same head, input channels and dropout; an unknown name is refused with timm's
closest names.

``pretrained``: a local file (a state dict in .pt/.pth/.bin/.safetensors, or a cxrdist checkpoint), or
``timm`` / ``imagenet``: the model's ImageNet weights through timm itself, from the Hugging Face cache
(``HF_HOME``; offline with ``HF_HUB_OFFLINE=1``), the stem adapted by timm (``adapt_input_conv``) and the
classifier re-initialised. The poster's variants take ``densenet121.tv_in1k`` (``densenet121``,
``densenet121d``: its deep stem has no ImageNet weights and stays random) and ``densenetblur121d.ra_in1k``;
every tensor whose name and shape match is loaded, and what stayed random is reported (``pretrained_info``).
"""

from __future__ import annotations

import difflib
import pickle
from pathlib import Path

import timm
import torch
from timm.layers import BlurPool2d
from torch import nn

from cxrdist.config import PRETRAINED_WORDS
from cxrdist.errors import UserError
from cxrdist.labels import NUM_CLASSES, checkpoint_labels

VARIANTS: dict[str, dict] = {
    "densenet121": dict(stem_type=""),
    "densenet121d": dict(stem_type="deep"),
    "densenetblur121d": dict(stem_type="deep", aa_layer=BlurPool2d, aa_stem_only=False),
}


class DemographicsFusion(nn.Module):
    """Backbone features ⊕ (age/100, sex) -> linear head: the poster's future work.

    ``forward(x, age, sex)``: age in years (NaN unknown -> 0 with an "unknown" indicator), sex 1 M / 0 F /
    0.5 unknown. Without demographics the wrapper is not used at all.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.backbone.reset_classifier(0)
        self.classifier = nn.Linear(backbone.num_features + 3, num_classes)

    def forward(self, x: torch.Tensor, age: torch.Tensor | None = None, sex: torch.Tensor | None = None):
        feats = self.backbone(x)
        n = feats.shape[0]
        age = torch.full((n,), float("nan"), device=feats.device) if age is None else age.to(feats.device)
        sex = torch.full((n,), 0.5, device=feats.device) if sex is None else sex.to(feats.device)
        known = ~torch.isnan(age)
        demo = torch.stack([torch.where(known, age / 100.0, torch.zeros_like(age)), known.float(), sex.float()], 1)
        return self.classifier(torch.cat([feats, demo.to(feats.dtype)], 1))


class TinyCXR(nn.Module):
    """``cxrtiny``: a ~100k-parameter CNN with BatchNorm for plumbing tests and CPU dry runs, registered in
    timm like any model (``--model cxrtiny``); not a model for radiographs.

    A stem and three stride-2 conv-BN-ReLU stages, global average pooling, dropout, a linear head, with the
    timm interface the rest of cxrdist uses (``num_features``, ``reset_classifier``, ``feature_info`` for
    Grad-CAM). A training step at 32 px takes ~5 ms on one core where DenseNet-121 takes ~215 ms, and
    torch.compile builds it in ~18 s where timm's ``test_resnet`` takes ~50 s: the tests that prove plumbing
    (backends, resume, streaming, launchers, compile) pay for the plumbing, not for a model.
    """

    def __init__(
        self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, widths=(16, 32, 64, 128), **_
    ):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = block(in_chans, widths[0])
        self.stages = nn.Sequential(*(block(a, b) for a, b in zip(widths, widths[1:])))
        self.num_features = widths[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            {"num_chs": w, "reduction": 2 ** (i + 1), "module": "stem" if i == 0 else f"stages.{i - 1}"}
            for i, w in enumerate(widths)
        ]
        self.pretrained_cfg = {"classifier": "fc", "input_size": (in_chans, 32, 32)}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@timm.models.register_model
def cxrtiny(pretrained: bool = False, **kwargs) -> TinyCXR:
    if pretrained:
        raise UserError("cxrtiny has no pretrained weights (it is the tests' plumbing model)")
    return TinyCXR(**kwargs)


POSTER_TAGS = {"densenet121": "densenet121.tv_in1k", "densenet121d": "densenet121.tv_in1k"}
POSTER_TAGS["densenetblur121d"] = "densenetblur121d.ra_in1k"


DESCRIPTIONS = {
    "densenet121": "DenseNet-121: 7x7 stem, max-pool downsampling",
    "densenet121d": "DenseNet-121d: deep stem (three 3x3 convolutions)",
    "densenetblur121d": "DenseNet-121d + BlurPool before every downsampling (anti-aliased)",
    "cxrtiny": "cxrtiny: a ~100k-parameter CNN for plumbing tests and dry runs (not for radiographs)",
}


def model_info(name: str, model: nn.Module) -> dict:
    """What a run's summary says about its model (the report's Table 2 columns)."""
    return {
        "name": name,
        "description": DESCRIPTIONS.get(name, f"timm {name}"),
        "params": int(sum(p.numel() for p in model.parameters())),
    }


def check_model_name(name: str) -> None:
    """A poster variant or a timm model name; otherwise a UserError with timm's closest names."""
    if name in VARIANTS or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, list(VARIANTS) + timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise UserError(
        f"--model {name}: neither one of the poster's ({', '.join(VARIANTS)}) nor a timm model{hint} "
        "(python -c \"import timm; print(timm.list_models('*resnet*'))\" lists them)"
    )


def build_model(
    name: str = "densenetblur121d",
    num_classes: int = NUM_CLASSES,
    in_chans: int = 1,
    *,
    pretrained: str | Path | None = None,
    fuse_demographics: bool = False,
    drop_rate: float = 0.0,
) -> nn.Module:
    """The ``nn.Module`` training uses: ``model(images)`` or, fused, ``model(images, age, sex)`` -> logits."""
    check_model_name(name)
    arch, options = ("densenet121", VARIANTS[name]) if name in VARIANTS else (name, {})
    model = timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **options
    )
    info = None
    if str(pretrained or "").lower() in PRETRAINED_WORDS:
        info = load_timm_pretrained(model, name, num_classes, in_chans)
    elif pretrained:
        load_pretrained(model, pretrained, in_chans=in_chans)
        info = {"source": str(pretrained)}
    if fuse_demographics:
        model = DemographicsFusion(model, num_classes)
    model.pretrained_info = info  # what was loaded from where (the run's summary records it)
    return model


def _offline_hint(tag: str) -> str:
    import os

    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return (
        f"--pretrained timm: the weights of {tag} are not in the Hugging Face cache ({home}) and the hub cannot be "
        f"reached here; on a login node with network and the same HF_HOME run: "
        f"python -c \"import timm; timm.create_model('{tag}', pretrained=True)\" "
        f"(or: huggingface-cli download timm/{tag})"
    )


def load_timm_pretrained(model: nn.Module, name: str, num_classes: int, in_chans: int) -> dict:
    """Copy timm's pretrained weights for ``name`` into ``model`` where name and shape match; timm itself
    fetches them (Hugging Face cache first) and adapts the stem to ``in_chans``. The classifier keeps its
    fresh initialisation. Returns what was loaded from where, and which tensors stayed random."""
    from huggingface_hub.errors import HfHubHTTPError

    tag = POSTER_TAGS.get(name, name)
    try:
        source = timm.create_model(tag, pretrained=True, num_classes=num_classes, in_chans=in_chans)
    except (OSError, HfHubHTTPError) as e:  # LocalEntryNotFoundError is an OSError: not cached, offline
        raise UserError(_offline_hint(tag)) from e
    head = str(source.pretrained_cfg.get("classifier") or "classifier")
    own, theirs = model.state_dict(), source.state_dict()
    take = {
        k: v
        for k, v in theirs.items()
        if k in own and own[k].shape == v.shape and not (k == head or k.startswith(head + "."))
    }
    model.load_state_dict(take, strict=False)
    random = [k for k in own if k not in take and not k.endswith("num_batches_tracked")]
    hub = source.pretrained_cfg.get("hf_hub_id") or tag
    return {"source": f"timm:{hub}", "loaded": len(take), "random": random}


def uses_demographics(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP / DataParallel / DeepSpeed wrap the module
    return isinstance(inner, DemographicsFusion)


def load_pretrained(model: nn.Module, path: str | Path, in_chans: int = 1) -> None:
    """Load a local backbone checkpoint (a state dict or a cxrdist checkpoint), skipping the classifier
    when its size differs and summing RGB stem weights into one channel for grey input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file (or --pretrained timm for timm's ImageNet weights)")
    state = _read_state(path)
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.state_dict()
    for k, v in list(state.items()):
        if k not in own:
            continue
        if v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == in_chans == 1:
            state[k] = v.sum(1, keepdim=True)
        elif v.shape != own[k].shape:
            del state[k]  # e.g. an ImageNet 1000-way classifier
    missing, _ = model.load_state_dict(state, strict=False)
    if any(not m.startswith("classifier") for m in missing):
        raise UserError(
            f"--pretrained {path}: not a {type(model).__name__} checkpoint "
            f"(missing {len(missing)} tensors, e.g. {missing[0]})"
        )


def _read_state(path: Path) -> dict:
    """A state dict from .safetensors (safetensors) or a torch file (``weights_only=True``), one line if not."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: cxrdist never does that
        raise UserError(
            f"--pretrained {path}: refused: it holds objects other than tensors and plain containers, and cxrdist "
            "never runs pickled code from a weights file (save a plain state dict, or .safetensors)"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many kinds for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--pretrained {path}: not a readable weights file ({first[:200]})") from None


def count_blur_filters(model: nn.Module) -> int:
    return sum(isinstance(m, BlurPool2d) for m in model.modules())


def model_from_client(client: dict) -> nn.Module:
    """The (untrained) model a checkpoint's client state describes: its config's architecture and a head for
    the label set it was trained on."""
    from cxrdist.config import TrainConfig

    cfg = TrainConfig.from_dict(client["config"])
    return build_model(
        cfg.model.name,
        num_classes=len(checkpoint_labels(client)),
        in_chans=cfg.model.in_chans,
        fuse_demographics=cfg.model.fuse_demographics,
        drop_rate=cfg.model.drop_rate,
    )


def cam_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the backbone's last feature map (timm's ``feature_info``): where Grad-CAM
    looks. For DenseNet ``features.norm5``."""
    inner = getattr(model, "module", model)
    backbone = inner.backbone if isinstance(inner, DemographicsFusion) else inner
    return backbone.get_submodule(backbone.feature_info[-1]["module"])
