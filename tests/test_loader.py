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

from cxrdist.data import Augment, ShardError, World, eval_loader, file_eval_loader, file_train_loader, train_loader
from cxrdist.errors import UserError
from cxrdist.labels import OBSERVATIONS
from cxrdist.shards.shardset import ShardSet

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


def world(micro: int, rank=0, size=1, workers=0, seed=0, epoch=0, global_batch=0) -> World:
    return World.of(rank=rank, world_size=size, workers=workers, seed=seed, micro_batch=micro,
                    global_batch=global_batch).at_epoch(epoch)  # fmt: skip


# (a) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("size,workers,bs", [(2, 2, BS), (2, 3, 5)])
def test_train_every_rank_same_full_batches_each_sample_at_most_once(data, size, workers, bs):
    shard_dir, info = data
    shards = ShardSet.open(shard_dir)
    steps = SPLITS["train"] // (size * bs)
    seen = []
    for rank in range(size):
        loader = train_loader(shards, world(bs, rank, size, workers, seed=3, epoch=1))
        assert len(loader) == steps
        batches = list(loader)
        assert len(batches) == steps
        for b in batches:
            assert b["image"].shape == (bs, 1, SIZE, SIZE) and b["image"].dtype == torch.uint8
            assert b["labels"].shape == (bs, 14) and b["labels"].dtype == torch.float32
            assert b["mask"].shape == (bs, 14) and b["age"].shape == (bs,) and b["sex"].shape == (bs,)
            assert len(b["key"]) == bs
        seen += keys_of(batches)
    assert set(seen) <= set(info["keys"]["train"])
    assert len(seen) == len(set(seen)) == steps * size * bs  # the epoch's global batches, each sample once


@pytest.mark.timeout(120)
def test_train_single_worker_sees_each_sample_once(data):
    shard_dir, info = data
    loader = train_loader(ShardSet.open(shard_dir), world(BS, epoch=3))
    keys = keys_of(loader)
    assert len(keys) == len(loader) * BS == SPLITS["train"]  # 120 = 15 batches of 8: the whole split
    assert sorted(keys) == sorted(info["keys"]["train"])  # a shuffle, not a draw with repeats


# (b) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("split,size,workers", [("val", 2, 2), ("val", 2, 3), ("test", 2, 2), ("train", 3, 0)])
def test_eval_every_sample_exactly_once(data, split, size, workers):
    shard_dir, info = data
    shards = ShardSet.open(shard_dir)
    counts: Counter = Counter()
    for rank in range(size):
        loader = eval_loader(shards, split, world(BS, rank, size, workers))
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.samples == sum(len(b["key"]) for b in batches)
        for b in batches:
            for k, lab in zip(b["key"], b["labels"].tolist()):
                assert lab == info["labels"][k]
        counts.update(keys_of(batches))
    assert set(counts) == set(info["keys"][split])
    assert set(counts.values()) == {1}


@pytest.mark.timeout(120)
def test_a_kept_eval_loader_rereads_with_the_same_workers_and_hears_each_reads_hash_rule(data, tmp_path):
    """The trainer's val loader (``persistent``): every read is the whole split once, from the same worker
    processes (none forked again per epoch), and ``reread(check_sha256)`` reaches those workers: a shard whose
    manifest sha256 is wrong passes reads that do not hash and fails the one that does, named."""
    import psutil

    shard_dir, info = data
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    victim = manifest["splits"]["val"]["shards"][0]
    victim["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = {c.pid for c in psutil.Process().children()}
    loader = eval_loader(ShardSet.open(copy), "val", world(BS, workers=2), check_sha256=False, persistent=True)
    try:
        first = keys_of(loader)
        workers = {c.pid for c in psutil.Process().children()} - before
        second = keys_of(loader.reread(False))
        assert sorted(first) == sorted(second) == sorted(info["keys"]["val"])
        assert len(workers) == 2 and {c.pid for c in psutil.Process().children()} - before == workers
        with pytest.raises(ShardError, match=f"{victim['name']}.*sha256 mismatch"):
            list(loader.reread(True))
    finally:
        loader.close()


# (c) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_same_seed_same_order_new_epoch_new_order(data):
    shards = ShardSet.open(data[0])

    def order(epoch, seed=0):
        return keys_of(train_loader(shards, world(BS, workers=2, seed=seed, epoch=epoch)))

    first = order(0)
    assert order(0) == first
    assert order(1) != first
    assert order(0, seed=1) != first


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size,workers,micro", [(2, 1, 8), (2, 2, 4), (4, 2, 4)])
def test_the_global_batches_are_the_same_for_any_ranks_workers_and_accumulation(data, size, workers, micro):
    """The loaders themselves (not only the plan): one rank with no workers against ranks x workers x
    accumulation steps, global batch 16, two epochs: the same samples in each global batch."""
    shards = ShardSet.open(data[0])

    def global_batches(size, workers, micro, epoch):
        got = {}
        for rank in range(size):
            w = world(micro, rank, size, workers, seed=4, epoch=epoch, global_batch=16)
            for m, b in enumerate(train_loader(shards, w)):
                got.setdefault(m // w.accumulate, set()).update(b["key"])
        return [got[s] for s in sorted(got)]

    for epoch in (0, 1):
        assert global_batches(size, workers, micro, epoch) == global_batches(1, 0, 16, epoch), epoch


# (d) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers,k,rank", [(2, 3, 0), (3, 4, 1), (0, 5, 1)])
def test_start_step_resumes_exactly(data, workers, k, rank):
    shards = ShardSet.open(data[0])
    w = world(BS, rank, 2, workers, seed=7, epoch=2)
    full = list(train_loader(shards, w))
    resumed_loader = train_loader(shards, w, start_step=k)
    assert len(resumed_loader) == len(full) - k
    resumed = list(resumed_loader)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]]
    for a, b in zip(resumed, full[k:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])


# (e) -------------------------------------------------------------------------------------------------
def _break(folder: Path, how: str, split: str) -> str:
    """Truncate, or damage a member header of, shard 1 of ``split`` (damaged: the manifest's sha256 follows,
    so only the tar reader can tell)."""
    victim = folder / f"{split}-000001.tar"
    raw = victim.read_bytes()
    if how == "truncated":
        victim.write_bytes(raw[: len(raw) // 2])
    else:
        with tarfile.open(victim) as tf:
            members = tf.getmembers()
        pos = members[len(members) // 2].offset
        victim.write_bytes(raw[:pos] + b"\x7f" * 512 + raw[pos + 512 :])
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["splits"][split]["shards"][1]["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return victim.name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["truncated", "damaged"])
@pytest.mark.parametrize("workers,train", [(0, False), (2, False), (2, True)])
def test_broken_shard_is_named(data, tmp_path, how, workers, train):
    """The loaders' own reading (a shard truncated after the run opened its shard set; a truncated one
    before that is refused by ShardSet.open, naming it too)."""
    folder = tmp_path / "broken"
    shutil.copytree(data[0], folder)
    split = "train" if train else "val"
    if how == "damaged":
        broken = _break(folder, how, split)
        shards = ShardSet.open(folder)
    else:
        shards = ShardSet.open(folder)
        broken = _break(folder, how, split)
    w = world(4, workers=workers)
    loader = train_loader(shards, w) if train else eval_loader(shards, split, w)
    with pytest.raises(ShardError, match=broken) as err:
        list(loader)
    assert "Traceback" not in str(err.value)  # one clear line, not the worker's traceback
    if how == "truncated":
        with pytest.raises(UserError, match=rf"{broken}: \d+ bytes on disk, manifest.json says \d+"):
            ShardSet.open(folder)


@pytest.mark.timeout(60)
def test_shard_with_fewer_samples_than_manifest(data, tmp_path):
    shard_dir, _ = data
    shutil.copytree(shard_dir, tmp_path / "short")
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][2]["samples"] += 1
    manifest["splits"]["val"]["samples"] += 1
    (tmp_path / "short" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="val-000002.tar"):
        list(eval_loader(ShardSet.open(tmp_path / "short"), "val", world(BS, workers=2)))


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
        batches = list(eval_loader(ShardSet.open(tmp_path / "shards"), "train", world(BS, workers=workers)))
        assert planted in keys_of(batches)
        assert set(batches[0]) == {"image", "labels", "mask", "age", "sex", "key", "patient_id", "view"}
    assert not marker.exists()


# (g) -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_file_loader_matches_shard_loader(data):
    shard_dir, info = data
    shards = ShardSet.open(shard_dir)
    shard = {}
    for b in eval_loader(shards, "val", world(BS)):
        for i, k in enumerate(b["key"]):
            shard[k] = (b["image"][i], b["labels"][i], b["mask"][i], b["age"][i], b["sex"][i])
    files = {}
    for rank in range(2):
        loader = file_eval_loader(shards, "val", world(BS, rank, 2, workers=2), "jpeg")
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
def test_file_loader_trains_the_shard_loaders_global_batches_and_resumes(data):
    shards = ShardSet.open(data[0])
    runs = [list(file_train_loader(shards, world(BS, r, 2, workers=2, seed=5, epoch=1), "jpeg")) for r in range(2)]
    assert len(runs[0]) == len(runs[1]) == SPLITS["train"] // (2 * BS)
    assert all(len(b["key"]) == BS for run in runs for b in run)
    assert not set(keys_of(runs[0])) & set(keys_of(runs[1]))
    for r in range(2):  # the same samples, in the same micro-batches, as the shard loader
        from_shards = train_loader(shards, world(BS, r, 2, workers=1, seed=5, epoch=1))
        assert [b["key"] for b in runs[r]] == [b["key"] for b in from_shards]
    resumed = list(file_train_loader(shards, world(BS, 1, 2, workers=2, seed=5, epoch=1), "jpeg", start_step=3))
    assert [b["key"] for b in resumed] == [b["key"] for b in runs[1][3:]]


@pytest.mark.timeout(120)
def test_a_persistent_file_loader_restarted_for_an_epoch_is_a_fresh_loader_of_that_epoch(data, monkeypatch):
    """The jpeg/dicom loaders keep their worker processes across epochs (as the shard loader): the epoch and
    the resumed step reach the workers through the sampler, so the augmented batches are exactly a fresh
    loader's; a GPU run pins their memory."""
    shards = ShardSet.open(data[0])
    aug = Augment(SIZE, train=True)
    kept = file_train_loader(shards, world(BS, workers=1, seed=5), "jpeg", augment=aug, persistent=True)
    assert kept.loader.persistent_workers and not kept.loader.pin_memory  # no GPU here
    first = list(kept)
    for epoch, start in ((1, 0), (2, 3)):
        again = list(kept.restart(epoch, start))
        w = world(BS, workers=1, seed=5, epoch=epoch)
        fresh = list(file_train_loader(shards, w, "jpeg", augment=aug, start_step=start, persistent=False))
        assert [b["key"] for b in again] == [b["key"] for b in fresh] and len(again) == len(kept)
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, fresh))
    assert [b["key"] for b in first] != [b["key"] for b in again]
    kept.close()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU rank builds (not iterated here)
    gpu = file_train_loader(shards, world(BS, workers=1), "jpeg", pin_memory=True, persistent=True)
    assert gpu.loader.pin_memory and gpu.loader.persistent_workers


# the worker-side augmentation (CPU training) ------------------------------------------------------------
@pytest.mark.timeout(120)
def test_worker_augmentation_is_seeded_and_resumable(data):
    shards = ShardSet.open(data[0])
    w, aug = world(BS, workers=2, seed=1), Augment(48, train=True)
    full = list(train_loader(shards, w, augment=aug))
    assert full[0]["image"].dtype == torch.float32 and full[0]["image"].shape == (BS, 1, 48, 48)
    resumed = list(train_loader(shards, w, augment=aug, start_step=5))
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
    shards = ShardSet.open(tmp_path / "shards")
    for split in ("train", "val"):
        n = manifest["splits"][split]["samples"]
        seen, by_key = Counter(), {}
        for rank in range(2):
            for b in eval_loader(shards, split, world(4, rank, 2, workers=2)):
                assert b["image"].dtype == dtype and b["image"].shape[1:] == (1, 48, 48)
                seen.update(b["key"])
                by_key.update({k: (img, lab) for k, img, lab in zip(b["key"], b["image"], b["labels"])})
        assert sum(seen.values()) == n and set(seen.values()) == {1}
        for b in file_eval_loader(shards, split, world(4), "jpeg"):
            assert b["image"].dtype == dtype
            for k, img, lab in zip(b["key"], b["image"], b["labels"]):
                simg, slab = by_key.pop(k)
                assert torch.equal(lab, slab)
                if encoding == "png16":  # lossless: the file loader sees exactly the packed pixels
                    assert torch.equal(img, simg)
                else:
                    assert (img.float() - simg.float()).abs().mean() < 2.0
        assert not by_key
    lens = {len(train_loader(shards, world(4, r, 2, workers=2))) for r in range(2)}
    assert lens == {manifest["splits"]["train"]["samples"] // 8}
