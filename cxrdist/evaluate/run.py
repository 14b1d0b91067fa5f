"""`cxrdist eval` (a run's checkpoint on a split, of its own shards or another dataset's) and
`cxrdist predict` (the checkpoint's label probabilities for files).

Both load checkpoints with ``weights_only=True``. ``predict`` reads DICOM, JPEG or PNG through
``imaging.load_for_model``: the same reading, windowing, resizing and quantisation as packing. A model is
scored on shards with another label set only with ``map_labels``, over the findings both sets hold
(``labels.overlap``: Effusion <-> Pleural Effusion and the shared names); otherwise the sets must match.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from cxrdist import dist, log
from cxrdist.config import TrainConfig
from cxrdist.data.transforms import Augment
from cxrdist.engine.backends import read_weights
from cxrdist.engine.evaluation import gather_and_score, predict_loader, select
from cxrdist.engine.inputs import Loaders, check_inputs
from cxrdist.errors import UserError
from cxrdist.labels import check_same, checkpoint_labels, describe, overlap
from cxrdist.metrics import fmt
from cxrdist.models import model_from_client, uses_demographics
from cxrdist.shards import location


def load_checkpoint(path: Path, tag: str = "best", backend: str | None = None) -> tuple[dict, dict]:
    """(model state dict, client state with config and data meta) from a run folder, its checkpoints folder
    (``best``/``last``) or a checkpoint, in whichever backend's format it was written (the registry asks
    each backend; ``backend`` first)."""
    return read_weights(Path(path), tag, backend=backend)


def model_from_checkpoint(state_dict: dict, client: dict) -> torch.nn.Module:
    model = model_from_client(client)
    model.load_state_dict(state_dict)
    return model.eval()


def label_pairs(trained, shards, *, map_labels: bool, where: str) -> list[tuple[int, int]]:
    """(model output, shard label) column pairs to score. Same sets: all of them. Different sets: refused,
    naming both, unless ``map_labels``; then the overlap (refused if there is none)."""
    trained, shards = tuple(trained), tuple(shards)
    if trained == shards:
        return [(j, j) for j in range(len(trained))]
    if not map_labels:
        check_same(trained, shards, what=where, against="the checkpoint")
    pairs = overlap(trained, shards)
    if not pairs:
        raise UserError(
            f"{where}: labels {describe(shards)} share no finding with the checkpoint's {describe(trained)}"
        )
    return [(trained.index(a), shards.index(b)) for a, b in pairs]


def evaluate_run(
    run: Path,
    split: str = "test",
    checkpoint: str = "best",
    *,
    shards: str | Path | None = None,
    map_labels: bool = False,
) -> dict:
    """Score a run's checkpoint on ``split`` of its own shards, or of ``shards`` (another folder, perhaps
    another dataset); writes ``RUN/eval_<split>.json`` (``eval_<split>@<folder>.json`` for other shards)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder")
    cfg = TrainConfig.load(run / "config.yaml")
    if shards is not None:
        cfg = replace(cfg, data=replace(cfg.data, shards=str(shards)))
        check_inputs(cfg)
    tag = checkpoint if checkpoint in ("best", "last") else "best"
    weights, client = load_checkpoint(
        run if checkpoint in ("best", "last") else Path(checkpoint), tag, cfg.dist.backend
    )
    model = model_from_checkpoint(weights, client)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loaders = Loaders(cfg, dist.DistEnv(), device, batch_size=cfg.optim.batch_size)
    trained = checkpoint_labels(client)
    pairs = label_pairs(trained, loaders.labels, map_labels=map_labels, where=f"{cfg.data.shards}/manifest.json")
    names = [loaders.labels[b] for _, b in pairs]

    def prepare(batch):
        return loaders.augment(False)(batch["image"].to(device))

    part = predict_loader(model, loaders.eval(split), prepare, torch.no_grad, len(trained))
    result = gather_and_score(select(part, pairs), names, expected=loaders.samples(split))
    result.update(split=split, checkpoint=checkpoint, shards=str(cfg.data.shards))
    if names != list(trained):
        result["label_map"] = {trained[a]: loaders.labels[b] for a, b in pairs}
    name = f"eval_{split}.json" if shards is None else f"eval_{split}@{location.parse(shards).name}.json"
    (run / name).write_text(json.dumps(result, indent=1))
    _print_scores(result, f"{run.name}: {split} of {cfg.data.shards} ({result['n']} images, checkpoint {checkpoint})")
    return result


def _print_scores(result: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("label")
    table.add_column("AUC", justify="right")
    table.add_column("accuracy", justify="right")
    for name in result["labels"]:
        table.add_row(name, fmt(result["auc"][name]), fmt(result["accuracy"][name]))
    table.add_row("[bold]mean", fmt(result["auc_mean"]), fmt(result["accuracy_mean"]))
    log.console().print(table)


def predict_files(checkpoint: Path, files: list[Path], as_json: bool = False) -> list[dict]:
    from cxrdist.imaging import UnusableImage, load_for_model

    weights, state = load_checkpoint(checkpoint, "best")
    cfg = TrainConfig.from_dict(state["config"])
    meta = state["data"]
    names = checkpoint_labels(state)
    model = model_from_checkpoint(weights, state)
    augment = Augment(meta["image_size"], train=False, in_chans=cfg.model.in_chans)
    results = []
    for f in files:
        if Path(f).is_dir():
            results.append({"file": str(f), "error": "a folder, not an image file"})
            continue
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
        results.append({"file": str(f), "probabilities": dict(zip(names, probs))})
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        table = Table(title=f"cxrdist predict ({Path(checkpoint).name})")
        table.add_column("label")
        for r in results:
            table.add_column(Path(r["file"]).name, justify="right")
        for name in names:
            table.add_row(name, *[f"{r['probabilities'][name]:.3f}" if "probabilities" in r else "-" for r in results])
        log.console().print(table)
        for r in results:
            if "error" in r:
                log.console(stderr=True).print(f"[red]{r['file']}: {r['error']}")
    return results
