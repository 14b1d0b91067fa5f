"""Floor 4: loaders that yield the Batches contract, and the one batched augmentation.

- :func:`cxrdist.data.stream.make_loader`: WebDataset shards (the fast path; DDP-exact epochs, resumable).
- :func:`cxrdist.data.files.make_file_loader`: the original JPEG / DICOM files (the Table 4 comparison).
- :class:`cxrdist.data.transforms.Augment`: uint8/int32 batch -> normalised float, on any device.

Which loader a run uses, and where augmentation runs, is the engine's choice (cxrdist.engine.inputs).
"""

from __future__ import annotations

from cxrdist.data.files import FileError, FileLoader, make_file_loader
from cxrdist.data.stream import ShardError, ShardLoader, batch_generator, make_loader
from cxrdist.data.transforms import Augment, to_float

__all__ = [
    "Augment",
    "FileError",
    "FileLoader",
    "ShardError",
    "ShardLoader",
    "batch_generator",
    "make_file_loader",
    "make_loader",
    "to_float",
]
