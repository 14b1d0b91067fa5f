"""Evaluation over an exact-once loader, gathered across ranks by key, scored once on rank 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist

from cxrdist import metrics
from cxrdist.models import uses_demographics


@torch.no_grad()
def predict_loader(module, loader, prepare, autocast, n_labels: int) -> dict:
    """Run the (unwrapped) model over this rank's share; returns numpy arrays (N x ``n_labels``) + keys."""
    was_training = module.training
    module.eval()
    fuse = uses_demographics(module)
    dtype = next(module.parameters()).dtype  # half under DeepSpeed's fp16 engine, else float32
    out = {"key": [], "prob": [], "labels": [], "mask": [], "sex": [], "age": []}
    for batch in loader:
        x = prepare(batch).to(dtype)
        with autocast():
            logits = module(x, batch["age"], batch["sex"]) if fuse else module(x)
        out["prob"].append(torch.sigmoid(logits.float()).cpu().numpy())
        out["key"] += list(batch["key"])
        for k in ("labels", "mask", "sex", "age"):
            out[k].append(batch[k].numpy())
    module.train(was_training)
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


def gather_and_score(part: dict, names, expected: int | None = None) -> dict:
    """All ranks' predictions to rank 0 (ordered by key), scored there, result broadcast to all ranks.
    ``names``: the label of each column.

    ``expected``: the split's sample count from the manifest; a mismatch is an error, never a silently
    partial evaluation.
    """
    distributed = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    parts = [part]
    if distributed:
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, part)
    result = None
    if not distributed or tdist.get_rank() == 0:
        try:
            result = _score(parts, names, expected)
        except RuntimeError as e:  # every rank must learn it, not wait in the broadcast until the timeout
            result = {"error": str(e)}
    if distributed:
        box = [result]
        tdist.broadcast_object_list(box, src=0)
        result = box[0]
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def _score(parts: list[dict], names, expected: int | None) -> dict:
    keys = [k for p in parts for k in p["key"]]
    if expected is not None and len(keys) != expected:
        raise RuntimeError(f"evaluation saw {len(keys)} samples, the manifest lists {expected}")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("prob", "labels", "mask", "sex", "age")}
    order = np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")
    keys = [keys[i] for i in order]
    cat = {k: v[order] for k, v in cat.items()}
    return metrics.evaluate_arrays(keys, names, cat["prob"], cat["labels"], cat["mask"], cat["sex"], cat["age"])
