"""What every synthetic layout writes with: seeded generators, canvases, JPEGs and CSVs."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

# ============================================================================================ layouts


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _canvas(rng: np.random.Generator, size: int, landscape: bool) -> tuple[int, int]:
    """(h, w) with the long side ``size``: CheXpert-like portrait (~0.82), some AP films landscape."""
    short = max(8, int(round(size * rng.uniform(0.8, 0.86))))
    return (short, size) if landscape else (size, short)


def _save_jpg(path: Path, img01: np.ndarray) -> None:
    Image.fromarray(np.rint(img01 * 255).astype(np.uint8)).save(path, format="JPEG", quality=92)


def _write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    if gz:
        with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as z:
            z.write(data)
    else:
        path.write_bytes(data)


def _study_images(rng: np.random.Generator, weights=(0.55, 0.35, 0.10)) -> int:
    return int(rng.choice(len(weights), p=weights)) + 1
