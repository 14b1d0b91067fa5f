"""Session fixtures: synthetic datasets in the real layouts and the shards packed from them.

Registered in conftest.py (``pytest_plugins``). Built once per test session under a temp folder; tests
that change shards copy them first.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _pack(
    tmp: Path,
    name: str,
    *,
    layout: str,
    n: int,
    size: int,
    pack_size: int,
    samples_per_shard: int,
    min_shards: int,
    source: str,
) -> dict:
    from cxrdist.shards.pack import synth_shards

    root, out = synth_shards(
        tmp,
        n=n,
        raw_size=size,
        size=pack_size,
        layout=layout,
        source=source,
        name=name,
        workers=1,
        samples_per_shard=samples_per_shard,
        min_shards=min_shards,
        quiet=False,
    )
    return {"root": root, "shards": out}


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> dict:
    """~300 CheXpert-layout images packed at 32 px: for trainer/launcher plumbing tests."""
    return _pack(
        tmp_path_factory.mktemp("tiny"),
        "tiny",
        layout="chexpert",
        n=300,
        size=64,
        pack_size=32,
        samples_per_shard=40,
        min_shards=4,
        source="chexpert",
    )


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory) -> dict:
    """The demo-sized dataset packed at 64 px: for the accuracy test."""
    return _pack(
        tmp_path_factory.mktemp("learn"),
        "learn",
        layout="chexpert",
        n=2400,
        size=128,
        pack_size=64,
        samples_per_shard=200,
        min_shards=8,
        source="chexpert",
    )


@pytest.fixture(scope="session")
def nih_shards(tmp_path_factory) -> dict:
    """~400 NIH ChestX-ray14-layout images (Data_Entry_2017_v2020.csv + images_0NN/images/) packed at 32 px."""
    return _pack(
        tmp_path_factory.mktemp("nih"),
        "nih",
        layout="nih",
        n=400,
        size=64,
        pack_size=32,
        samples_per_shard=40,
        min_shards=4,
        source="nih",
    )
