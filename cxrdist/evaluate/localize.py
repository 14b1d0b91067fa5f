"""Grad-CAM scored against radiologists' boxes (`cxrdist eval --cam`): does the model look where the finding is?

For every sample of the split whose json carries boxes (RSNA's, NIH's BBox_List; ``imaging.fit_boxes`` put
them in the stored image's frame) and every boxed label the model scores, the label's Grad-CAM at the stored
image's size is compared with the union of that label's boxes:

- **pointing game** (Zhang et al. 2016): a hit when the map's maximum lies inside a box;
- **mass ratio**: the share of the map's mass inside the boxes divided by the boxes' share of the image
  (1: no better than a flat map; the energy-based pointing game of Score-CAM, normalised by area);
- **IoU** of the map thresholded at ``CAM_THRESHOLD`` of its maximum with the boxes.

Each comes per label with a percentile-bootstrap interval over patients (``metrics.patient_weights``), beside
the same metrics for random maps: uniform noise on a coarse grid upsampled bilinearly like a CAM, the
chance level a map with a CAM's smoothness reaches. Overlays of a few hits and misses show the boxes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrdist import metrics

CAM_THRESHOLD = 0.5  # IoU: a pixel is "on" at half the (max-normalised) map's peak, as in Wang et al. 2017
RANDOM_MAPS = 8  # random maps per (sample, label): the baseline's own noise is then far below the CAM's
RANDOM_GRID = 4  # the random maps' grid: about the feature-map side of a CAM at the sizes cxrdist trains
OVERLAYS = 4  # hits and misses drawn, each
MEASURES = ("pointing", "mass_ratio", "iou")


@dataclass
class Boxed:
    """One sample with boxes, as read from its shard."""

    key: str
    patient: str
    image: np.ndarray  # H x W as stored (uint8 / uint16)
    boxes: list[dict]  # {label, x, y, w, h} in the stored frame
    age: float
    sex: float


def boxed_samples(shards, split: str) -> list[Boxed]:
    """The samples of ``split`` that carry boxes, read once from the shard set's shards (sha256 checked)."""
    from cxrdist import imaging
    from cxrdist.data.stream import IMAGE_EXTS, sex_code
    from cxrdist.shards.tario import iter_shard

    found = []
    for shard in shards.shards(split):
        for _, key, members in iter_shard(shard):
            meta = json.loads(members["json"])
            if not meta.get("boxes"):
                continue
            ext = next(e for e in IMAGE_EXTS if e in members)
            age = meta.get("age")
            found.append(
                Boxed(
                    key,
                    str(meta.get("patient_id", key)),
                    imaging.decode(members[ext], ext),
                    meta["boxes"],
                    np.nan if age is None else float(age),
                    sex_code(meta.get("sex")),
                )  # fmt: skip
            )
    return found


def box_mask(boxes: list[dict], label: str, shape: tuple[int, int]) -> np.ndarray:
    """The pixels inside any of ``label``'s boxes (a pixel is in when its centre is)."""
    h, w = shape
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    mask = np.zeros(shape, bool)
    for b in boxes:
        if b["label"] == label:
            mask |= (xs >= b["x"]) & (xs < b["x"] + b["w"]) & (ys >= b["y"]) & (ys < b["y"] + b["h"])
    return mask


def measure(heat: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(pointing hit 0/1, mass ratio, IoU) of one map against one label's box mask. A map that is zero
    everywhere (no region raises the logit) points nowhere: a miss, mass ratio 0, IoU 0."""
    area = mask.mean()
    total = float(heat.sum())
    if total <= 0 or area == 0:
        return 0.0, 0.0, 0.0
    hit = float(mask.flat[int(np.argmax(heat))])
    ratio = float(heat[mask].sum()) / total / area
    on = heat >= CAM_THRESHOLD * heat.max()
    iou = float((on & mask).sum()) / float((on | mask).sum())
    return hit, ratio, iou


def random_maps(rng: np.random.Generator, n: int, shape: tuple[int, int]) -> np.ndarray:
    """``n`` random CAM-like maps: uniform noise on a RANDOM_GRID grid, upsampled bilinearly, max 1."""
    import torch.nn.functional as F

    grid = torch.from_numpy(rng.random((n, 1, RANDOM_GRID, RANDOM_GRID)).astype(np.float32))
    up = F.interpolate(grid, size=shape, mode="bilinear", align_corners=False)[:, 0].numpy()
    return up / up.reshape(n, -1).max(1)[:, None, None]


def summarise(values: np.ndarray, patients: list[str], replicates: int, seed: int) -> dict:
    """Per measure [point, low, high]: the mean over (sample, label) pairs, bootstrapped over patients."""
    w = metrics.patient_weights(patients, replicates, seed)
    rows = (w @ values) / np.maximum(w.sum(1, keepdims=True), 1e-12)
    return {m: metrics.interval(rows[:, j]) for j, m in enumerate(MEASURES)}


def score_boxes(model, samples: list[Boxed], outputs: dict[str, int], prepare, device, *, replicates: int,
                seed: int, overlays: Path | None = None) -> dict:  # fmt: skip
    """The localisation block of metrics.json. ``outputs``: box label -> the model output scored for it
    (the shard label's pair, so NIH's Effusion boxes are scored on a CheXpert model's Pleural Effusion)."""
    from cxrdist.evaluate.cam import gradcam, write_overlay

    rng = np.random.default_rng(seed)
    per_label: dict[str, dict[str, list]] = {}
    unscored = 0
    for s in samples:
        pixels = s.image.astype(np.int32) if s.image.dtype == np.uint16 else s.image  # as stream.collate
        x = prepare(torch.from_numpy(pixels)[None, None].to(device))
        age, sex = torch.tensor([s.age]), torch.tensor([s.sex])
        for label in sorted({b["label"] for b in s.boxes}):
            if label not in outputs:
                unscored += 1
                continue
            mask = box_mask(s.boxes, label, s.image.shape)
            heat = gradcam(model, x, outputs[label], size=s.image.shape, age=age.to(device), sex=sex.to(device))
            base = np.mean([measure(r, mask) for r in random_maps(rng, RANDOM_MAPS, s.image.shape)], 0)
            got = per_label.setdefault(label, {"cam": [], "random": [], "patients": [], "drawn": []})
            got["cam"].append(measure(heat, mask))
            got["random"].append(base)
            got["patients"].append(s.patient)
            got["drawn"].append((s, heat))
    out = {"threshold": CAM_THRESHOLD, "random_maps": RANDOM_MAPS, "unscored_boxes": unscored, "labels": {}}
    for label, got in per_label.items():
        cam, base = np.asarray(got["cam"]), np.asarray(got["random"])
        out["labels"][label] = {
            "n": len(cam),
            "cam": summarise(cam, got["patients"], replicates, seed),
            "random": summarise(base, got["patients"], replicates, seed),
        }
        if overlays is not None:
            _draw(overlays, label, got["drawn"], cam[:, 0], write_overlay)
    return out


def _draw(folder: Path, label: str, drawn: list, hits: np.ndarray, write_overlay) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, which in (("hit", hits == 1), ("miss", hits == 0)):
        for i in np.flatnonzero(which)[:OVERLAYS]:
            s, heat = drawn[i]
            image = s.image.astype(np.float32) / (65535.0 if s.image.dtype == np.uint16 else 255.0)
            boxes = [b for b in s.boxes if b["label"] == label]
            write_overlay(folder / f"{kind}.{label.replace(' ', '_')}.{s.key}.png", image, heat, f"{label}: {kind}",
                          boxes=boxes)  # fmt: skip
