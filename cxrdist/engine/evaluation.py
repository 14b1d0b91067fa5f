"""Evaluation over an exact-once loader, gathered across ranks by key, scored once on rank 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist

from cxrdist import metrics
from cxrdist.models import uses_demographics
from cxrdist.shards.mix import of_source


@torch.no_grad()
def predict_loader(module, loader, prepare, autocast, n_labels: int) -> dict:
    """Run the (unwrapped) model over this rank's share; returns numpy arrays (N x ``n_labels``) + keys."""
    was_training = module.training
    module.eval()
    # evaluation batches end short (one shape per loader worker): cuDNN's benchmark mode would time its
    # algorithms again for each new shape, so evaluation runs with its default choice
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        return _predict(module, loader, prepare, autocast, n_labels)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        module.train(was_training)


def _predict(module, loader, prepare, autocast, n_labels: int) -> dict:
    fuse = uses_demographics(module)
    dtype = next(module.parameters()).dtype  # half under DeepSpeed's fp16 engine, else float32
    out = {"key": [], "patient_id": [], "view": [], "prob": [], "labels": [], "mask": [], "sex": [], "age": []}
    for batch in loader:
        x = prepare(batch).to(dtype)
        with autocast():
            logits = module(x, batch["age"], batch["sex"]) if fuse else module(x)
        out["prob"].append(torch.sigmoid(logits.float()).cpu().numpy())
        out["key"] += list(batch["key"])
        out["patient_id"] += list(batch.get("patient_id", batch["key"]))
        out["view"] += list(batch.get("view", [""] * len(batch["key"])))
        for k in ("labels", "mask", "sex", "age"):
            out[k].append(batch[k].numpy())
    for k in ("prob", "labels", "mask"):
        out[k] = np.concatenate(out[k]) if out[k] else np.zeros((0, n_labels), np.float32)
    for k in ("sex", "age"):
        out[k] = np.concatenate(out[k]) if out[k] else np.zeros((0,), np.float32)
    return out


def select(part: dict, pairs: list[tuple[int, int]]) -> dict:
    """Keep (model output column, shard label column) pairs: scoring one label set's model on another's
    shards over the findings both hold (``labels.overlap``)."""
    out_cols, lab_cols = [a for a, _ in pairs], [b for _, b in pairs]
    return {
        **part,
        "prob": part["prob"][:, out_cols],
        "labels": part["labels"][:, lab_cols],
        "mask": part["mask"][:, lab_cols],
    }


def gather_parts(part: dict) -> list[dict] | None:
    """Every rank's predictions as a list on rank 0, None on the others (collective: all ranks call it)."""
    if not _distributed():
        return [part]
    parts = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, part)
    return parts if tdist.get_rank() == 0 else None


def merge(parts: list[dict], expected: int | None = None) -> dict:
    """The ranks' predictions as one split ordered by key, each sample exactly once.

    ``expected``: the split's sample count from the manifest; a mismatch or a key seen twice is an error,
    never a silently partial evaluation.
    """
    keys = [k for p in parts for k in p["key"]]
    if expected is not None and len(keys) != expected:
        raise RuntimeError(f"evaluation saw {len(keys)} samples, the manifest lists {expected}")
    if len(set(keys)) != len(keys):
        dup = len(keys) - len(set(keys))
        raise RuntimeError(f"evaluation saw {dup} samples more than once; the eval loader must be exact-once")
    order = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")
    out = {"key": [keys[i] for i in order]}
    for k in ("patient_id", "view"):
        values = [v for p in parts for v in p[k]]
        out[k] = [values[i] for i in order]
    for k in ("prob", "labels", "mask", "sex", "age"):
        out[k] = np.concatenate([p[k] for p in parts])[order]
    return out


def on_rank0(compute):
    """``compute()`` on rank 0, its result (or its error) broadcast to every rank: a failure there must reach
    the others, not leave them waiting in the broadcast until the timeout."""
    result = None
    if not _distributed() or tdist.get_rank() == 0:
        try:
            result = {"ok": compute()}
        except RuntimeError as e:
            result = {"error": str(e)}
    if _distributed():
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["ok"]


def gather_and_score(part: dict, names, expected: int | None = None, replicates: int = 0, sources=()) -> dict:
    """All ranks' predictions scored once on rank 0 (``names``: the label of each column), the scores on
    every rank; ``replicates`` > 0 adds patient-bootstrap intervals to the means. ``sources``: a mixed run's
    source names; the pooled scores then come with each source's own under ``by_source``."""
    parts = gather_parts(part)
    return on_rank0(lambda: score(merge(parts, expected), names, replicates, sources))


def score(whole: dict, names, replicates: int = 0, sources=()) -> dict:
    """A merged split's scores; with ``sources``, each source's rows (keys ``<source>/...``) scored apart too."""
    result = metrics.evaluate_arrays(whole, names, replicates=replicates)
    if sources:
        result["by_source"] = {s: metrics.evaluate_arrays(rows(whole, s), names, replicates) for s in sources}
    return result


def rows(whole: dict, source: str) -> dict:
    """A mixed split's rows of one source (its keys start with ``<source>/``)."""
    keep = of_source(whole["key"], source)
    idx = np.flatnonzero(keep)
    out = {k: [v[i] for i in idx] for k, v in whole.items() if isinstance(v, list)}
    return out | {k: v[keep] for k, v in whole.items() if isinstance(v, np.ndarray)}


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
