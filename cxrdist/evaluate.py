"""`cxrdist eval` (a run's checkpoint on a split) and `cxrdist predict` (the 14 probabilities for files).

Both load checkpoints with ``weights_only=True``. ``predict`` reads DICOM, JPEG or PNG through
``imaging.load_for_model``: the same reading, windowing, resizing and quantisation as packing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from cxrdist import dist, log
from cxrdist.config import TrainConfig
from cxrdist.data.transforms import Augment
from cxrdist.engine.backends import read_weights
from cxrdist.engine.evaluation import gather_and_score, predict_loader
from cxrdist.engine.inputs import Loaders
from cxrdist.labels import OBSERVATIONS
from cxrdist.metrics import fmt
from cxrdist.models import build_model, uses_demographics


def load_checkpoint(path: Path, tag: str = "best", backend: str | None = None) -> tuple[dict, dict]:
    """(model state dict, client state with config and data meta) from a run folder, its checkpoints folder
    (``best``/``last``) or a checkpoint, in whichever backend's format it was written (the registry asks
    each backend; ``backend`` first)."""
    return read_weights(Path(path), tag, backend=backend)


def model_from_checkpoint(state_dict: dict, cfg: TrainConfig) -> torch.nn.Module:
    model = build_model(cfg.model.name, in_chans=cfg.model.in_chans, fuse_demographics=cfg.model.fuse_demographics)
    model.load_state_dict(state_dict)
    return model.eval()


def evaluate_run(run: Path, split: str = "test", checkpoint: str = "best") -> dict:
    run = Path(run)
    cfg = TrainConfig.load(run / "config.yaml")
    tag = checkpoint if checkpoint in ("best", "last") else "best"
    weights, _ = load_checkpoint(run if checkpoint in ("best", "last") else Path(checkpoint), tag, cfg.dist.backend)
    model = model_from_checkpoint(weights, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loaders = Loaders(cfg, dist.DistEnv(), device, batch_size=cfg.optim.batch_size)
    loader = loaders.eval(split)

    def prepare(batch):
        return loaders.augment(False)(batch["image"].to(device))

    part = predict_loader(model, loader, prepare, torch.no_grad)
    result = gather_and_score(part, expected=loaders.samples(split))
    result.update(split=split, checkpoint=checkpoint)
    (run / f"eval_{split}.json").write_text(json.dumps(result, indent=1))
    table = Table(title=f"{run.name}: {split} ({result['n']} images, checkpoint {checkpoint})")
    table.add_column("observation")
    table.add_column("AUC", justify="right")
    table.add_column("accuracy", justify="right")
    for name in OBSERVATIONS:
        table.add_row(name, fmt(result["auc"][name]), fmt(result["accuracy"][name]))
    table.add_row("[bold]mean", fmt(result["auc_mean"]), fmt(result["accuracy_mean"]))
    log.console().print(table)
    return result


def predict_files(checkpoint: Path, files: list[Path], as_json: bool = False) -> list[dict]:
    from cxrdist.imaging import UnusableImage, load_for_model

    weights, state = load_checkpoint(checkpoint, "best")
    cfg = TrainConfig.from_dict(state["config"])
    meta = state["data"]
    model = model_from_checkpoint(weights, cfg)
    augment = Augment(meta["image_size"], train=False, in_chans=cfg.model.in_chans)
    results = []
    for f in files:
        try:
            arr = load_for_model(f, meta["size"], meta["encoding"])
        except UnusableImage as e:
            results.append({"file": str(f), "error": str(e)})
            continue
        x = torch.from_numpy(arr.astype(np.int32 if arr.dtype == np.uint16 else arr.dtype))[None, None]
        with torch.no_grad():
            x = augment(x)
            logits = model(x) if not uses_demographics(model) else model(x, None, None)
        probs = torch.sigmoid(logits.float())[0].tolist()
        results.append({"file": str(f), "probabilities": dict(zip(OBSERVATIONS, probs))})
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        table = Table(title=f"cxrdist predict ({Path(checkpoint).name})")
        table.add_column("observation")
        for r in results:
            table.add_column(Path(r["file"]).name, justify="right")
        for name in OBSERVATIONS:
            table.add_row(name, *[f"{r['probabilities'][name]:.3f}" if "probabilities" in r else "-" for r in results])
        log.console().print(table)
        for r in results:
            if "error" in r:
                log.console(stderr=True).print(f"[red]{r['file']}: {r['error']}")
    return results
