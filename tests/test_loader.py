"""The shard loader (DDP-exact epochs, resume, damaged shards, safe decoding) and the loose-file loaders.

The shard folder is written here in the contract format (webdataset.TarWriter, PIL JPEGs, manifest.json),
with the same images also stored as loose files under a source root, so the file loaders can be compared
against the shard loader sample by sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cxrdist.data import Augment, ShardError, make_file_loader, make_loader
from cxrdist.labels import OBSERVATIONS

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

SIZE = 64
PER_SHARD = 12
SPLITS = {"train": 120, "val": 40, "test": 10}  # train: 10 shards, val: 4 (12, 12, 12, 4), test: 1
BS = 8


def _image(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    base = 100 + 60 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
    return np.clip(base + rng.normal(0, 10, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shard_entry(path: Path, samples: int) -> dict:
    data = path.read_bytes()
    return {"name": path.name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_dataset(out: Path, root: Path, seed: int = 0, plant: dict | None = None) -> dict:
    """Shards + manifest in ``out`` and the same JPEGs as loose files under ``root``.

    ``plant``: extra raw members (``{ext: bytes}``) added to the first sample of the first train shard.
    Returns ``{split: [keys in shard order]}`` and the labels by key.
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    labels: dict[str, list[float]] = {}
    splits = {}
    pid = 0
    for split, n in SPLITS.items():
        keys[split], shards = [], []
        for s in range(0, n, PER_SHARD):
            path = out / f"{split}-{s // PER_SHARD:06d}.tar"
            count = min(PER_SHARD, n - s)
            with wds.TarWriter(str(path)) as w:
                for _ in range(count):
                    pid += 1
                    key = f"patient{pid:05d}_study1_view1_frontal"
                    rel = f"{split}/patient{pid:05d}/study1/view1_frontal.jpg"
                    jpg = _jpeg(_image(rng))
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes(jpg)
                    lab = rng.integers(0, 2, len(OBSERVATIONS)).astype(float).tolist()
                    meta = {
                        "labels": lab,
                        "mask": [1] * len(OBSERVATIONS),
                        "patient_id": f"patient{pid:05d}",
                        "study_id": "study1",
                        "view": "PA",
                        "sex": "MFU"[pid % 3],
                        "age": None if pid % 5 == 0 else float(20 + pid % 60),
                        "source": rel,
                    }
                    sample = {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}
                    if plant and split == "train" and s == 0 and _ == 0:
                        sample.update(plant)
                    w.write(sample)
                    keys[split].append(key)
                    labels[key] = lab
            shards.append(_shard_entry(path, count))
        splits[split] = {"samples": n, "patients": n, "prevalence": {o: 0.5 for o in OBSERVATIONS}, "shards": shards}
    manifest = {
        "version": 1,
        "source": "chexpert",
        "root": str(root),
        "labels": list(OBSERVATIONS),
        "policy": "u-zeros",
        "split": "patient",
        "views": "frontal",
        "size": SIZE,
        "encoding": "jpg",
        "counts": [["rows in csv", sum(SPLITS.values())]],
        "splits": splits,
        "skipped": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return {"keys": keys, "labels": labels}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("shards")
    info = write_dataset(base / "shards", base / "root")
    return base / "shards", info


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# (a) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world,workers,bs", [(2, 2, BS), (2, 3, 5)])
def test_train_every_rank_same_full_batches(data, world, workers, bs):
    shard_dir, info = data
    per_rank = SPLITS["train"] // (world * bs)
    seen = []
    for rank in range(world):
        loader = make_loader(
            shard_dir,
            "train",
            batch_size=bs,
            rank=rank,
            world_size=world,
            workers=workers,
            epoch=1,
            seed=3,
            shuffle_buffer=50,
        )
        assert len(loader) == per_rank
        batches = list(loader)
        assert len(batches) == per_rank
        for b in batches:
            assert b["image"].shape == (bs, 1, SIZE, SIZE) and b["image"].dtype == torch.uint8
            assert b["labels"].shape == (bs, 14) and b["labels"].dtype == torch.float32
            assert b["mask"].shape == (bs, 14) and b["age"].shape == (bs,) and b["sex"].shape == (bs,)
            assert len(b["key"]) == bs
        seen += keys_of(batches)
    assert set(seen) <= set(info["keys"]["train"])
    # the ranks read disjoint shards: most of the split appears, duplicates only from workers that ran dry
    assert len(set(seen)) >= 0.6 * SPLITS["train"]


@pytest.mark.timeout(120)
def test_train_single_worker_sees_each_sample_once(data):
    shard_dir, info = data
    loader = make_loader(shard_dir, "train", batch_size=BS, workers=0, epoch=3, shuffle_buffer=50)
    keys = keys_of(loader)
    assert len(keys) == len(loader) * BS == SPLITS["train"]  # 120 = 15 batches of 8: the whole split
    assert sorted(keys) == sorted(info["keys"]["train"])  # a shuffle, not a draw with repeats


# (b) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("split,world,workers", [("val", 2, 2), ("val", 2, 3), ("test", 2, 2), ("train", 3, 0)])
def test_eval_every_sample_exactly_once(data, split, world, workers):
    shard_dir, info = data
    counts: Counter = Counter()
    for rank in range(world):
        loader = make_loader(shard_dir, split, batch_size=BS, rank=rank, world_size=world, workers=workers, train=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.samples == sum(len(b["key"]) for b in batches)
        for b in batches:
            for k, lab in zip(b["key"], b["labels"].tolist()):
                assert lab == info["labels"][k]
        counts.update(keys_of(batches))
    assert set(counts) == set(info["keys"][split])
    assert set(counts.values()) == {1}


# (c) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_same_seed_same_order_new_epoch_new_order(data):
    shard_dir, _ = data

    def order(epoch, seed=0):
        return keys_of(
            make_loader(shard_dir, "train", batch_size=BS, workers=2, epoch=epoch, seed=seed, shuffle_buffer=30)
        )

    first = order(0)
    assert order(0) == first
    assert order(1) != first
    assert order(0, seed=1) != first


# (d) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,k,rank", [(2, 3, 0), (3, 4, 1), (0, 5, 1)])
def test_start_batch_resumes_exactly(data, workers, k, rank):
    shard_dir, _ = data
    kw = dict(batch_size=BS, rank=rank, world_size=2, workers=workers, epoch=2, seed=7, shuffle_buffer=40)
    full = list(make_loader(shard_dir, "train", **kw))
    resumed_loader = make_loader(shard_dir, "train", start_batch=k, **kw)
    assert len(resumed_loader) == len(full) - k
    resumed = list(resumed_loader)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]]
    for a, b in zip(resumed, full[k:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])


# (e) -------------------------------------------------------------------------------------------------
def _broken_copy(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    victim = dst / "val-000001.tar"
    raw = victim.read_bytes()
    if how == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    else:  # a damaged member header in the middle, same size: only the tar reader can tell
        with tarfile.open(victim) as tf:
            members = tf.getmembers()
        pos = members[len(members) // 2].offset
        victim.write_bytes(raw[:pos] + b"\x7f" * 512 + raw[pos + 512 :])
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["splits"]["val"]["shards"][1]["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return victim.name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["truncated", "damaged"])
@pytest.mark.parametrize("workers,train", [(0, False), (2, False), (2, True)])
def test_broken_shard_is_named(data, tmp_path, how, workers, train):
    shard_dir, _ = data
    broken = _broken_copy(shard_dir, tmp_path / "broken", how)
    loader = make_loader(tmp_path / "broken", "val", batch_size=4, workers=workers, train=train, shuffle_buffer=1000)
    with pytest.raises(ShardError, match=broken) as err:
        list(loader)
    assert "Traceback" not in str(err.value)  # one clear line, not the worker's traceback


@pytest.mark.timeout(60)
def test_shard_with_fewer_samples_than_manifest(data, tmp_path):
    shard_dir, _ = data
    shutil.copytree(shard_dir, tmp_path / "short")
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][2]["samples"] += 1
    manifest["splits"]["val"]["samples"] += 1
    (tmp_path / "short" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="val-000002.tar"):
        list(make_loader(tmp_path / "short", "val", batch_size=BS, workers=2, train=False))


# (f) -------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.timeout(60)
def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(payload).close()  # the payload does work when unpickled
    assert marker.exists()
    marker.unlink()
    info = write_dataset(
        tmp_path / "shards", tmp_path / "root", plant={"pickle": payload, "pyd": payload, "pkl": payload}
    )
    planted = info["keys"]["train"][0]
    for workers in (0, 2):
        batches = list(make_loader(tmp_path / "shards", "train", batch_size=BS, workers=workers, train=False))
        assert planted in keys_of(batches)
        assert set(batches[0]) == {"image", "labels", "mask", "age", "sex", "key", "patient_id", "view"}
    assert not marker.exists()


# (g) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_file_loader_matches_shard_loader(data):
    shard_dir, info = data
    shard = {}
    for b in make_loader(shard_dir, "val", batch_size=BS, workers=0, train=False):
        for i, k in enumerate(b["key"]):
            shard[k] = (b["image"][i], b["labels"][i], b["mask"][i], b["age"][i], b["sex"][i])
    files = {}
    for rank in range(2):
        loader = make_file_loader(
            shard_dir, "val", "jpeg", batch_size=BS, rank=rank, world_size=2, workers=2, train=False, epoch=0, seed=0
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (1, SIZE, SIZE)
            for i, k in enumerate(b["key"]):
                assert k not in files
                files[k] = (b["image"][i], b["labels"][i], b["mask"][i], b["age"][i], b["sex"][i])
    assert set(files) == set(shard) == set(info["keys"]["val"])
    for k, (img, lab, mask, age, sex) in files.items():
        simg, slab, smask, sage, ssex = shard[k]
        assert torch.equal(lab, slab) and torch.equal(mask, smask) and torch.equal(sex, ssex)
        assert torch.equal(age, sage) or (age.isnan() and sage.isnan())
        assert (img.int() - simg.int()).abs().max() <= 2  # same JPEG bytes, decoded two ways


@pytest.mark.timeout(120)
def test_file_loader_train_equal_batches_and_resume(data):
    shard_dir, _ = data
    kw = dict(batch_size=BS, world_size=2, workers=2, train=True, epoch=1, seed=5)
    runs = [list(make_file_loader(shard_dir, "train", "jpeg", rank=r, **kw)) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) == SPLITS["train"] // (2 * BS)
    assert all(len(b["key"]) == BS for run in runs for b in run)
    assert not set(keys_of(runs[0])) & set(keys_of(runs[1]))
    resumed = list(make_file_loader(shard_dir, "train", "jpeg", rank=1, start_batch=3, **kw))
    assert [b["key"] for b in resumed] == [b["key"] for b in runs[1][3:]]


@pytest.mark.timeout(120)
def test_a_persistent_file_loader_restarted_for_an_epoch_is_a_fresh_loader_of_that_epoch(data, monkeypatch):
    """The jpeg/dicom loaders keep their worker processes across epochs (as the shard loader): the epoch and
    the resumed batch reach the workers through the sampler, so the augmented batches are exactly a fresh
    loader's; a GPU run pins their memory."""
    shard_dir, _ = data
    aug = Augment(SIZE, train=True)
    kw = dict(batch_size=BS, workers=1, train=True, seed=5, augment=aug)
    kept = make_file_loader(shard_dir, "train", "jpeg", epoch=0, persistent=True, **kw)
    assert kept.loader.persistent_workers and not kept.loader.pin_memory  # no GPU here
    first = list(kept)
    for epoch, start in ((1, 0), (2, 3)):
        again = list(kept.restart(epoch, start))
        fresh = list(make_file_loader(shard_dir, "train", "jpeg", epoch=epoch, start_batch=start, **kw))
        assert [b["key"] for b in again] == [b["key"] for b in fresh] and len(again) == len(kept)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, fresh))
    assert [b["key"] for b in first] != [b["key"] for b in again]
    kept.close()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU rank builds (not iterated here)
    gpu = make_file_loader(shard_dir, "train", "jpeg", pin_memory=True, persistent=True, **kw)
    assert gpu.loader.pin_memory and gpu.loader.persistent_workers


# the worker-side augmentation (CPU training) ------------------------------------------------------------
@pytest.mark.timeout(120)
def test_worker_augmentation_is_seeded_and_resumable(data):
    shard_dir, _ = data
    kw = dict(batch_size=BS, workers=2, epoch=0, seed=1, augment=Augment(48, train=True))
    full = list(make_loader(shard_dir, "train", **kw))
    assert full[0]["image"].dtype == torch.float32 and full[0]["image"].shape == (BS, 1, 48, 48)
    resumed = list(make_loader(shard_dir, "train", start_batch=5, **kw))
    for a, b in zip(resumed, full[5:]):
        assert torch.equal(a["image"], b["image"])


# the real producer: synth -> pack -> both loaders ------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("encoding", ["jpg", "png16"])
def test_real_pack_round_trip(tmp_path, encoding):
    from cxrdist.shards.pack import pack
    from cxrdist.synth import synthesize

    root = synthesize(layout="chexpert", out=tmp_path / "src", n=50, size=48, seed=1)
    manifest = pack(
        source="chexpert",
        root=root,
        out=tmp_path / "shards",
        size=48,
        encoding=encoding,
        views="all",
        workers=1,
        samples_per_shard=8,
        min_shards=1,
        quiet=True,
    )
    dtype = torch.uint8 if encoding == "jpg" else torch.int32
    for split in ("train", "val"):
        n = manifest["splits"][split]["samples"]
        seen, by_key = Counter(), {}
        for rank in range(2):
            for b in make_loader(
                tmp_path / "shards", split, batch_size=4, rank=rank, world_size=2, workers=2, train=False
            ):
                assert b["image"].dtype == dtype and b["image"].shape[1:] == (1, 48, 48)
                seen.update(b["key"])
                by_key.update({k: (img, lab) for k, img, lab in zip(b["key"], b["image"], b["labels"])})
        assert sum(seen.values()) == n and set(seen.values()) == {1}
        for b in make_file_loader(tmp_path / "shards", split, "jpeg", batch_size=4, workers=0, train=False):
            assert b["image"].dtype == dtype
            for k, img, lab in zip(b["key"], b["image"], b["labels"]):
                simg, slab = by_key.pop(k)
                assert torch.equal(lab, slab)
                if encoding == "png16":  # lossless: the file loader sees exactly the packed pixels
                    assert torch.equal(img, simg)
                else:
                    assert (img.float() - simg.float()).abs().mean() < 2.0
        assert not by_key
    lens = {
        len(make_loader(tmp_path / "shards", "train", batch_size=4, rank=r, world_size=2, workers=2)) for r in range(2)
    }
    assert lens == {manifest["splits"]["train"]["samples"] // 8}
