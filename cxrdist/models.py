"""The poster's DenseNet-121 variants (Table 2), from timm, with a head for the shard folder's label set.

- ``densenet121``: one 7x7 stem convolution, max-pool downsampling.
- ``densenet121d``: timm's DenseNet-121 with ``stem_type='deep'`` (three 3x3 convolutions).
- ``densenetblur121d``: the deep stem plus a BlurPool before *every* downsampling step, as the poster
  says (Relu∘Conv(k,s) -> BlurPool(m,s)∘Relu∘Conv(k,1)): the stem and the three transitions, four blur
  filters. timm's registered ``densenetblur121d`` blurs only the stem (``aa_stem_only=True``); we pass
  ``aa_stem_only=False``.
Weights are never fetched from a hub at run time: ``pretrained`` is a local file.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.layers import BlurPool2d
from torch import nn

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
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    model = timm.create_model(
        "densenet121",
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=drop_rate,
        **VARIANTS[name],
    )
    if pretrained:
        load_pretrained(model, pretrained, in_chans=in_chans)
    if fuse_demographics:
        model = DemographicsFusion(model, num_classes)
    return model


def uses_demographics(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP / DataParallel / DeepSpeed wrap the module
    return isinstance(inner, DemographicsFusion)


def load_pretrained(model: nn.Module, path: str | Path, in_chans: int = 1) -> None:
    """Load a local backbone checkpoint (a state dict or a cxrdist checkpoint), skipping the classifier
    when its size differs and summing RGB stem weights into one channel for grey input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file (weights are never downloaded at run time)")
    state = torch.load(path, map_location="cpu", weights_only=True)
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
