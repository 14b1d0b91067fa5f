"""Dataset sources -> the one sample table (docs/ARCHITECTURE.md, "The sample table").

Adding a dataset is one module here (a reader that registers a ``registry.Source``) plus its import below
and its ``cxrdist synth`` layout; nothing else in cxrdist names it.
"""

from __future__ import annotations

from pathlib import Path

# registration order is the order help lists them in
from cxrdist.sources import (
    chexpert,  # noqa: F401, I001
    mimic,  # noqa: F401
    nih,  # noqa: F401
    padchest,  # noqa: F401
    rsna,  # noqa: F401
)
from cxrdist.sources.registry import REGISTRY, Source, for_layout, get, names, register
from cxrdist.sources.table import SourceTable, check_choices, check_options, finish, label_columns

__all__ = [
    "build_table",
    "SourceTable",
    "label_columns",
    "REGISTRY",
    "Source",
    "for_layout",
    "get",
    "names",
    "register",
]


def build_table(
    source: str,
    root,
    *,
    views: str = "frontal",
    policy: str = "u-zeros",
    split: str = "patient",
    seed: int = 0,
    labels: str | tuple[str, ...] | None = None,
    **options,
) -> SourceTable:
    """Read a dataset's CSVs into the sample table: one row per image, the chosen labels by name with the
    uncertainty policy applied, views filtered, every row in train/val/test. Touches no image.

    ``labels``: a label set's name, a file of names, or the names; default the source's own. Labels the
    source cannot provide (neither the name nor its counterpart, ``labels.SAME_FINDING``) are masked out
    everywhere and listed in the table's notes. ``options`` go to the source's reader (MIMIC: ``image_ext``).
    """
    src = get(source)
    check_choices(views, policy, split)
    check_options(src, options)
    root = Path(root).expanduser()
    raw = src.read(root, official=split == "official", **options)
    return finish(raw, source=src, root=root, labels=labels, views=views, policy=policy, split=split, seed=seed)
