"""`cxrdist eval` (a run's checkpoint on a split, of its own shards or another dataset's) and
`cxrdist predict` (the checkpoint's label probabilities for files).

Both load checkpoints with ``weights_only=True``. ``predict`` reads DICOM, JPEG or PNG through
``imaging.load_for_model``: the same reading, windowing, resizing and quantisation as packing. A model is
scored on shards with another label set only with ``map_labels``, over the findings both sets hold
(``labels.overlap``: Effusion <-> Pleural Effusion and the shared names); otherwise the sets must match.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from cxrdist import dist, metrics
from cxrdist.atomic import atomic_write_bytes
from cxrdist.config import TrainConfig, refuse_pipe
from cxrdist.engine.backends import read_weights
from cxrdist.engine.evaluation import gather_parts, merge, predict_loader, select
from cxrdist.engine.inputs import Loaders, loader_workers, open_shards, run_world
from cxrdist.errors import UserError
from cxrdist.evaluate.plots import all_plots
from cxrdist.evaluate.record import Predictions, by_source, fit_operating_points, score
from cxrdist.evaluate.render import markdown, print_table
from cxrdist.labels import check_same, checkpoint_labels, describe, overlap
from cxrdist.models import model_from_client
from cxrdist.runfolder import RunFolder
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


def _predict(model, loaders: Loaders, split: str, pairs, device) -> Predictions:
    """The model's predictions on one split, each sample once (``pairs``: output column, shard label column)."""
    if not loaders.samples(split):
        raise UserError(f"{loaders.cfg.data.shards}: the {split} split holds no samples; nothing to evaluate")

    def prepare(batch):
        return loaders.augment(False)(batch["image"].to(device))

    part = predict_loader(
        model, loaders.eval(split), prepare, eval_autocast(loaders.cfg, device), max(a for a, _ in pairs) + 1
    )
    whole = merge(gather_parts(select(part, pairs)) or [], expected=loaders.samples(split))
    return Predictions.from_merged(whole, [loaders.labels[b] for _, b in pairs])


def eval_autocast(cfg: TrainConfig, device: torch.device):
    """The run's own compute precision, as the trainer evaluated it (its numbers and these must agree); fp16
    only on a GPU (a bf16 or fp32 run evaluated on a laptop's CPU keeps its precision)."""
    import contextlib

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision)
    if dtype is None or (dtype is torch.float16 and device.type != "cuda"):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def protocol(manifest: dict) -> str:
    """How the shards were split, the way the report names it next to every number."""
    return str(manifest.get("protocol") or f"{manifest.get('source', '?')}/{manifest.get('split', '?')}")


def evaluate_run(
    run: Path,
    split: str = "test",
    checkpoint: str = "best",
    *,
    shards: str | Path | None = None,
    map_labels: bool = False,
    rule: str = "youden",
    replicates: int = metrics.REPLICATES,
    seed: int = 0,
    plots: bool = True,
    allow_pipe: bool = False,
    cam: bool = False,
) -> dict:
    """Score a run's checkpoint on ``split`` of its own shards, or of ``shards`` (another location, perhaps
    another dataset), with operating points and the temperature fitted on the run's own val split.

    Writes ``RUN/operating_points.json`` (what ``predict`` applies) and ``RUN/eval/<split>/`` (``<split>@<name>``
    for other shards): predictions.csv, metrics.json, report.md and the plots. ``cam``: Grad-CAM scored against
    the split's boxes (``localize``), overlays in ``cam/``. Returns metrics.json's dict.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder")
    folder = RunFolder(run)
    cfg = TrainConfig.load(folder.config_path)
    if not allow_pipe:  # a colleague's run folder must not run its command here
        refuse_pipe(cfg.data.shards, f"{folder.config_path}: data.shards", "pass --allow-pipe")
    tag = checkpoint if checkpoint in ("best", "last") else "best"
    weights, client = load_checkpoint(
        run if checkpoint in ("best", "last") else Path(checkpoint), tag, cfg.dist.backend
    )
    model = model_from_checkpoint(weights, client)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    trained = checkpoint_labels(client)
    env = dist.DistEnv()  # one process: every sample of a split once
    world = run_world(replace(cfg, optim=replace(cfg.optim, global_batch_size=0, accumulate=1)), env,
                      loader_workers(cfg, env, device))  # fmt: skip
    own = Loaders(cfg, world, device, open_shards(cfg))
    own_pairs = label_pairs(trained, own.labels, map_labels=False, where=f"{cfg.data.shards}/manifest.json")
    val = _predict(model, own, "val", own_pairs, device)
    points = fit_operating_points(val, rule) | {"checkpoint": str(checkpoint), "labels": list(trained)}
    folder.write_operating_points(points)

    target, pairs, out = own, own_pairs, folder.eval_dir(split)
    if shards is not None:
        other = replace(cfg, data=replace(cfg.data, shards=str(shards), mix=""))
        target = Loaders(other, world, device, open_shards(other))
        pairs = label_pairs(trained, target.labels, map_labels=map_labels, where=f"{shards}/manifest.json")
        out = folder.eval_dir(f"{split}@{location.parse(shards).name}")
    pred = val if target is own and split == "val" else _predict(model, target, split, pairs, device)
    # thresholds travel with the finding: a model's Pleural Effusion threshold applies to NIH's Effusion
    mapped = {target.labels[b]: points["thresholds"][trained[a]] for a, b in pairs}
    t0 = time.perf_counter()
    result = score(
        pred,
        points | {"thresholds": mapped},
        protocol=protocol(target.shards.manifest),
        split=split,
        replicates=replicates,
        seed=seed,
    )
    if target.shards.parts:
        result["by_source"] = by_source(pred, [p.name for p in target.shards.parts], replicates, seed)
    if cam:
        result["localization"] = localization(model, target, split, pairs, device, out / "cam", replicates, seed)
    result["scoring_s"] = round(time.perf_counter() - t0, 2)
    result |= {"checkpoint": str(checkpoint), "shards": str(target.cfg.data.shards)}
    if [target.labels[b] for _, b in pairs] != list(trained):
        result["label_map"] = {trained[a]: target.labels[b] for a, b in pairs}
    _write(out, pred, result, f"{run.name}: {split} of {target.cfg.data.shards} (checkpoint {checkpoint})", plots)
    return result


def localization(model, loaders: Loaders, split, pairs, device, overlays: Path, replicates: int, seed: int) -> dict:
    """``localize.score_boxes`` on the split's boxed samples; refused when the split holds none."""
    from cxrdist.evaluate.localize import boxed_samples, score_boxes

    samples = boxed_samples(loaders.shards, split)
    if not samples:
        raise UserError(f"--cam: no sample of the {split} split of {loaders.cfg.data.shards} has boxes")
    outputs = {loaders.labels[b]: a for a, b in pairs}
    return score_boxes(model, samples, outputs, loaders.augment(False), device, replicates=replicates, seed=seed,
                       overlays=overlays)  # fmt: skip


def _write(out: Path, pred: Predictions, result: dict, title: str, plots: bool) -> None:
    from cxrdist.redact import redact, redact_tree

    result, title = redact_tree(result), redact(title)  # what is written never holds a location's credentials
    out.mkdir(parents=True, exist_ok=True)
    pred.to_csv(out / "predictions.csv")
    names = all_plots(pred, result, out) if plots else []
    atomic_write_bytes(out / "metrics.json", json.dumps(result, indent=1).encode())
    atomic_write_bytes(out / "report.md", markdown(result, title, names).encode())
    print_table(result, title)
