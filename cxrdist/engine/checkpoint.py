"""Atomic checkpoints: a kill mid-save leaves the previous checkpoint loadable.

A ``.pt`` file is written through ``cxrdist.atomic.atomic_file`` (temporary file, fsync, ``os.replace``),
after checking that the file system has room for it; ``last.pt`` keeps its previous version beside it
(``last.prev.pt``), which a resume falls back to when ``last.pt`` is unreadable. Everything stored is tensors
and plain containers, so it loads with ``torch.load(weights_only=True)``: no pickled code ever runs on load,
and a file that needs more is refused, naming it (never with advice to load it unsafely).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrdist.atomic import atomic_file
from cxrdist.errors import UserError

logger = logging.getLogger(__name__)
HEADROOM = 1.05, 1 << 20  # a checkpoint file is its tensors' bytes plus a little: want 5% + 1 MB spare


class CheckpointError(UserError):
    """A checkpoint that cannot be written (no space) or read (truncated, refused); the message names it."""


def previous(path: Path) -> Path:
    """Where the version before ``path`` is kept (``last.pt`` -> ``last.prev.pt``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested state (dicts, lists, tuples): what ``torch.save`` writes, bar
    a small header per tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def space_problem(path: Path, need: int) -> str | None:
    """Why ``need`` bytes cannot be written at ``path`` (its file system lacks the room), or None."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:  # a checkpoints folder not made yet
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    want = int(need * HEADROOM[0]) + HEADROOM[1]
    if free >= want:
        return None
    return (
        f"{path}: not written: no space left on device (about {mb(want)} needed, {mb(free)} free); "
        f"the previous checkpoint is intact"
    )


def check_space(path: Path, need: int) -> None:
    """Refuse to start writing ``need`` bytes at ``path`` where the file system has no room for them."""
    problem = space_problem(path, need)
    if problem:
        raise CheckpointError(problem)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A full disk met while writing (torch says only "unexpected pos" or "file write failed") becomes a
    CheckpointError naming the path."""
    try:
        yield
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        text = str(e)
        full = getattr(e, "errno", None) == errno.ENOSPC or any(
            t in text for t in ("No space left on device", "unexpected pos", "file write failed")
        )
        if not full:
            raise
        free = shutil.disk_usage(Path(path).parent).free
        raise CheckpointError(
            f"{path}: not written: no space left on device ({mb(free)} free); the previous checkpoint is intact"
        ) from None


def atomic_torch_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """Save ``obj`` at ``path`` atomically, after checking for room; ``keep_previous``: the replaced file
    moves to ``previous(path)``."""
    path = Path(path)
    check_space(path, tensor_bytes(obj))
    with writing(path), atomic_file(path, keep=previous(path) if keep_previous else None) as f:
        torch.save(obj, f)


def load(path: Path, map_location="cpu") -> dict:
    """A checkpoint's state (weights_only). An unreadable or refused file is a CheckpointError naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError:  # torch's text here advises weights_only=False: never pass that on
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain containers, and cxrdist never "
            f"runs pickled code from a checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or not a torch file ({first})") from None


def set_aside_if_damaged(path: Path) -> None:
    """Before a resume, on one rank: an unreadable ``path`` whose previous version is kept moves to
    ``<name>.damaged``, so every rank resumes from the previous one, and the next save keeps that good file
    as the previous version instead of the damaged one."""
    path, prev = Path(path), previous(path)
    if not (path.is_file() and prev.is_file()):
        return
    try:
        load(path)
    except CheckpointError as e:
        damaged = path.with_name(path.name + ".damaged")
        os.replace(path, damaged)
        logger.warning("%s; moved to %s: resuming from %s, the checkpoint saved before it", e, damaged.name, prev.name)


def load_or_previous(path: Path, map_location="cpu") -> dict | None:
    """``path``'s state, or, where it is missing or unreadable and the previous version is kept, that one
    (with a warning naming both); None when neither exists."""
    path, prev = Path(path), previous(path)
    if not path.is_file() and not prev.is_file():
        return None
    if not path.is_file():  # set aside, or a save interrupted between its two renames
        logger.warning("%s: not there; resuming from %s, the checkpoint saved before it", path, prev.name)
        return load(prev, map_location)
    try:
        return load(path, map_location)
    except CheckpointError as e:
        if not prev.is_file():
            raise
        logger.warning("%s; resuming from %s, the checkpoint saved before it", e, prev.name)
        return load(prev, map_location)


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
