"""Grad-CAM (Selvaraju et al. 2017) through captum's ``LayerGradCam``, on the last feature map of any model
cxrdist builds (``models.cam_layer``), fused demographics included; the overlay PNG has the geometry of the
model's input (the packed, resized image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxrdist.models import cam_layer, uses_demographics


def gradcam(model: torch.nn.Module, x: torch.Tensor, target: int, *, size=None, age=None, sex=None) -> np.ndarray:
    """The H x W class-activation map of output ``target`` for one input ``x`` (1 x C x H x W), ReLU'd,
    upsampled bilinearly to ``size`` (default the input's) and scaled to [0, 1] (all zero when no region
    raises the logit)."""
    from captum.attr import LayerAttribution, LayerGradCam

    model.eval()
    fused = uses_demographics(model)
    forward = (lambda t: model(t, age, sex)) if fused else model
    cam = LayerGradCam(forward, cam_layer(model))
    with torch.enable_grad():
        attr = cam.attribute(x.float().requires_grad_(True), target=int(target), relu_attributions=True)
    up = LayerAttribution.interpolate(attr.detach(), tuple(size or x.shape[-2:]), interpolate_mode="bilinear")
    heat = up[0, 0].clamp_min(0).numpy()
    top = float(heat.max())
    return heat / top if top > 0 else heat


def write_overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str, boxes: list[dict] = ()) -> None:
    """The grey input with the heat map (jet, alpha 0.4) over it, as a PNG of the input's size; ``boxes``
    ({x, y, w, h} in the image's pixels: a radiologist's) outlined in white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, cmap="gray", interpolation="nearest")
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1, interpolation="bilinear")
    for b in boxes:
        ax.add_patch(plt.Rectangle((b["x"] - 0.5, b["y"] - 0.5), b["w"], b["h"], fill=False, ec="white", lw=1))
    ax.text(2, 2, title, color="white", fontsize=max(4, h // 40), va="top")
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
