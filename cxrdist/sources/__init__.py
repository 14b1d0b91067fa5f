"""Dataset sources -> the one sample table (docs/ARCHITECTURE.md, "The sample table")."""

from __future__ import annotations

from pathlib import Path

from cxrdist.sources.table import COLUMNS, MASK_COLUMNS, SourceTable, check_choices, finish

__all__ = ["build_table", "SourceTable", "COLUMNS", "MASK_COLUMNS"]


def build_table(
    source: str,
    root,
    *,
    views: str = "frontal",
    policy: str = "u-zeros",
    split: str = "patient",
    seed: int = 0,
    image_ext: str | None = None,
) -> SourceTable:
    """Read a CheXpert or MIMIC-CXR dataset's CSVs into the sample table: one row per image, labels by
    name with the uncertainty policy applied, views filtered, every row in train/val/test. Touches no
    image (MIMIC's extension probe only checks which files exist)."""
    check_choices(source, views, policy, split)
    root = Path(root).expanduser()
    if source == "chexpert":
        from cxrdist.sources.chexpert import read_chexpert

        raw = read_chexpert(root, official=split == "official")
    else:
        from cxrdist.sources.mimic import read_mimic

        raw = read_mimic(root, official=split == "official", image_ext=image_ext)
    return finish(raw, root=root, source=source, views=views, policy=policy, split=split, seed=seed)
