"""Floor 4: loaders that yield the Batches contract, and the one batched augmentation.

A loader takes the run's two values: a ``cxrdist.shards.shardset.ShardSet`` (what the location and manifest
say, read once) and a ``cxrdist.data.world.World`` (the geometry).

- :func:`cxrdist.data.stream.train_loader` / :func:`~cxrdist.data.stream.eval_loader`: WebDataset shards
  (the fast path; the same global batches on any cluster, resumable on another topology, exact-once eval).
- :func:`cxrdist.data.files.file_train_loader` / :func:`~cxrdist.data.files.file_eval_loader`: the original
  JPEG / DICOM files (the Table 4 comparison), the same samples in the same global batches.
- :mod:`cxrdist.data.shuffle`, :mod:`cxrdist.data.partition`: the epoch's order and who trains what (pure).
- :class:`cxrdist.data.transforms.Augment`: uint8/int32 batch -> normalised float, on any device.

Which loader a run uses, and where augmentation runs, is the engine's choice (cxrdist.engine.inputs).
"""

from __future__ import annotations

from cxrdist.data.files import FileError, FileLoader, file_eval_loader, file_train_loader
from cxrdist.data.stream import ShardError, ShardLoader, batch_generator, eval_loader, train_loader
from cxrdist.data.transforms import Augment, to_float
from cxrdist.data.world import World

__all__ = [
    "Augment",
    "FileError",
    "FileLoader",
    "ShardError",
    "ShardLoader",
    "World",
    "batch_generator",
    "eval_loader",
    "file_eval_loader",
    "file_train_loader",
    "to_float",
    "train_loader",
]
