"""`cxrdist predict`: a checkpoint's calibrated probabilities for DICOM, JPEG or PNG files, the labels that
pass their operating thresholds, and optionally Grad-CAM overlays.

Files are read by ``imaging.load_for_model``: the same reading, windowing, resizing and quantisation as
packing, so the model sees what it saw in training. The temperature and thresholds are the ones
``cxrdist eval`` fitted on the run's val split (``RUN/operating_points.json``); without them the raw
probabilities and 0.5 are used, and the output says so. One unreadable file is one error line; the rest
are still predicted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from cxrdist import log
from cxrdist.config import TrainConfig
from cxrdist.data.transforms import Augment
from cxrdist.errors import UserError
from cxrdist.evaluate.run import load_checkpoint, model_from_checkpoint
from cxrdist.labels import checkpoint_labels
from cxrdist.runfolder import RunFolder


def operating_points(checkpoint: Path, names: list[str]) -> dict:
    """The run's stored operating points (the checkpoint's run folder: itself, or one or two levels up),
    checked against the checkpoint's labels; a neutral set (T = 1, thresholds 0.5) when there are none."""
    path = Path(checkpoint)
    for folder in (path, path.parent, path.parent.parent):
        points = RunFolder(folder).read_operating_points()
        if points is not None:
            if points.get("labels", names) != names:
                raise UserError(f"{folder}/operating_points.json: fitted for other labels than the checkpoint's")
            return points | {"source": str(folder / "operating_points.json")}
    return {"temperature": 1.0, "thresholds": dict.fromkeys(names, 0.5), "source": None}


def _read(f: Path, meta: dict):
    from cxrdist.config import MIN_IMAGE_SIZE
    from cxrdist.imaging import UnusableImage, load_for_model

    if Path(f).is_dir():
        return None, "a folder, not an image file"
    try:
        arr = load_for_model(f, meta["size"], meta["encoding"], min_side=MIN_IMAGE_SIZE)
    except UnusableImage as e:
        return None, str(e)
    return torch.from_numpy(arr.astype(np.int32 if arr.dtype == np.uint16 else arr.dtype))[None, None], None


def cam_targets(names: list[str], positive: list[str], wanted: list[str] | None) -> list[int]:
    """Which outputs get a heat map: ``--cam-labels`` when given (names checked), else the positive calls."""
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise UserError(
                f"--cam-labels {', '.join(unknown)}: not among the checkpoint's labels ({', '.join(names)})"
            )
        return [names.index(w) for w in wanted]
    return [names.index(n) for n in positive]


def predict_files(
    checkpoint: Path,
    files: list[Path],
    as_json: bool = False,
    cam_dir: Path | None = None,
    cam_labels: list[str] | None = None,
) -> list[dict]:
    from cxrdist.evaluate.cam import gradcam, write_overlay
    from cxrdist.models import uses_demographics

    weights, state = load_checkpoint(checkpoint, "best")
    cfg = TrainConfig.from_dict(state["config"])
    meta, names = state["data"], list(checkpoint_labels(state))
    points = operating_points(checkpoint, names)
    model = model_from_checkpoint(weights, state)
    augment = Augment(meta["image_size"], train=False, in_chans=cfg.model.in_chans)
    fused = uses_demographics(model)
    if cam_dir is not None:
        cam_targets(names, [], cam_labels)  # unknown names: refused before any file is read
        Path(cam_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for f in files:
        raw, error = _read(f, meta)
        if error:
            results.append({"file": str(f), "error": error})
            continue
        with torch.no_grad():
            x = augment(raw)
            logits = (model(x, None, None) if fused else model(x))[0].float()
        probs = torch.sigmoid(logits / points["temperature"]).tolist()
        thr = points["thresholds"]
        positive = [n for n, p in zip(names, probs) if thr.get(n) is not None and p >= thr[n]]
        result = {"file": str(f), "probabilities": dict(zip(names, probs)), "positive": positive}
        if cam_dir is not None:
            result["cam"] = []
            for j in cam_targets(names, positive, cam_labels):
                out = Path(cam_dir) / f"{Path(f).stem}.{names[j].replace(' ', '_')}.png"
                heat = gradcam(model, x, j, size=tuple(raw.shape[-2:]))
                write_overlay(out, raw[0, 0].float().numpy(), heat, f"{names[j]} p={probs[j]:.2f}")
                result["cam"].append(str(out))
        results.append(result)
    _show(results, names, points, checkpoint, as_json)
    return results


def _show(results: list[dict], names: list[str], points: dict, checkpoint: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    source = points["source"] or "none: raw probabilities, threshold 0.5 (run `cxrdist eval` to fit them on val)"
    table = Table(title=f"cxrdist predict ({Path(checkpoint).name})", caption=f"operating points: {source}")
    table.add_column("label")
    for r in results:
        table.add_column(Path(r["file"]).name, justify="right")
    for name in names:
        cells = []
        for r in results:
            if "probabilities" not in r:
                cells.append("-")
                continue
            mark = " *" if name in r["positive"] else ""
            cells.append(f"{r['probabilities'][name]:.3f}{mark}")
        table.add_row(name, *cells)
    log.console().print(table)
    for r in results:
        if "error" in r:
            log.console(stderr=True).print(f"[red]{r['file']}: {r['error']}")
