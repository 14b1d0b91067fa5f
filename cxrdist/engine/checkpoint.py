"""Atomic checkpoints: a kill mid-save leaves the previous checkpoint loadable.

A ``.pt`` file is written through ``cxrdist.atomic.atomic_file`` (temporary file, fsync, ``os.replace``).
Everything stored is tensors and plain containers, so it loads with ``torch.load(weights_only=True)``: no
pickled code ever runs on load.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdist.atomic import atomic_file


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def load(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> dict:
    """Python, NumPy, torch (CPU and this rank's CUDA device) generator states as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's own device only: a requeued task may see fewer GPUs (one per task) than the first run
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
