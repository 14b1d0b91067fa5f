"""Hostile inputs (issue 13, part 1): nothing is read outside where it belongs. Every hostile file is built
here: CSV paths that climb out of the dataset root or follow a symlink out of it, manifests whose shard names
point elsewhere, shard samples whose `source` leaves the source root."""

from __future__ import annotations

import io
import json
import signal
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cxrdist.contain import OUTSIDE, Outside, escapes, shard_name_problem, within
from cxrdist.shards.manifest import ManifestError, load_manifest
from cxrdist.shards.pack import pack
from cxrdist.shards.verify import verify
from cxrdist.synth import synthesize


def test_escapes_and_within_rules(tmp_path):
    for bad in ("", "/etc/passwd", "../x.jpg", "a/../../x.jpg", "a\\..\\x.jpg", "a\x00b", ".", "a/.."):
        assert escapes(bad), bad
    for ok in ("train/p1/s1/v1.jpg", "a/./b.jpg", "a/b/../c.jpg", "images_001/images/00000001_000.png"):
        assert not escapes(ok), ok
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "a" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "a" / "in.jpg").write_bytes(b"x")
    (root / "a" / "inner.jpg").symlink_to(root / "a" / "in.jpg")
    assert within(root, "a/in.jpg") == (root / "a" / "in.jpg").resolve()
    assert within(root, "a/inner.jpg") == (root / "a" / "in.jpg").resolve()  # a link that stays inside
    for bad in ("a/link.jpg", "../secret.jpg", str(tmp_path / "secret.jpg")):
        with pytest.raises(Outside, match=OUTSIDE):
            within(root, bad)


def test_shard_name_rule():
    assert shard_name_problem("train-000001.tar", "train") is None
    assert "listed under split 'val'" in shard_name_problem("train-000001.tar", "val")
    for bad in ("/tmp/train-000001.tar", "../train-000001.tar", "train-1.tar", "x/train-000001.tar", 7):
        assert "is not a shard name" in shard_name_problem(bad, "train")


@pytest.fixture
def chexpert(tmp_path) -> Path:
    root = synthesize("chexpert", tmp_path / "src", n=60, size=32)
    outside = tmp_path / "outside_secret"
    outside.mkdir()
    Image.new("L", (32, 32), 255).save(outside / "secret.jpg")
    return root


def test_csv_paths_that_leave_the_root_are_skipped_with_one_reason(chexpert, tmp_path):
    root = chexpert
    link = root / "train" / "patient00001" / "study1" / "view9_frontal.jpg"
    link.symlink_to(tmp_path / "outside_secret" / "secret.jpg")  # a symlink out of the dataset
    row = "Male,60,Frontal,AP," + "1.0," * 13 + "1.0\n"
    climb = "CheXpert-v1.0-small/train/patient00001/study1/../../../../outside_secret/secret.jpg"
    absent = "CheXpert-v1.0-small/train/patient00001/study1/../../../../outside_secret/absent.jpg"
    with open(root / "train.csv", "a") as f:
        for path in (climb, absent, "CheXpert-v1.0-small/train/patient00001/study1/view9_frontal.jpg"):
            f.write(f"{path},{row}")
    out = tmp_path / "shards"
    m = pack("chexpert", root, out, size=32, workers=1, min_shards=1, quiet=True)
    # the same words whether the outside file exists or not: the climbing rows are dropped from the table
    # (train.csv:<line>) before anything is opened, the symlink when it is opened (its path)
    outside = [s for s in m["skipped"] if s["reason"] == OUTSIDE]
    assert len(outside) == 3 and not any("secret" in s["reason"] or "absent" in s["reason"] for s in m["skipped"])
    assert sorted(s["source"] for s in outside)[-1] == "train/patient00001/study1/view9_frontal.jpg"
    for tar in out.glob("*.tar"):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".json"):
                    src = json.load(tf.extractfile(member))["source"]
                    assert ".." not in src and "view9" not in src


def test_mimic_ids_that_climb_out_are_skipped(tmp_path):
    import pandas as pd

    root = synthesize("mimic-jpg", tmp_path / "mimic", n=30, size=32)
    meta = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    df = pd.read_csv(meta, dtype=str)
    df.loc[0, "dicom_id"] = "../../../../../etc/passwd"
    df.to_csv(meta, index=False, compression="gzip")
    m = pack("mimic", root, tmp_path / "shards", size=32, workers=1, min_shards=1, quiet=True, dry_run=True)
    assert [s["reason"] for s in m["skipped"]].count(OUTSIDE) == 1


@pytest.fixture
def shards(chexpert, tmp_path) -> Path:
    out = tmp_path / "shards"
    pack("chexpert", chexpert, out, size=32, workers=1, min_shards=1, quiet=True)
    return out


@pytest.mark.parametrize(
    "name, message",
    [
        ("/etc/passwd", "is not a shard name"),
        ("../../elsewhere/train-000000.tar", "is not a shard name"),
        ("val-000000.tar", "is listed under split 'train'"),
    ],
)
def test_manifest_shard_names_that_point_elsewhere_are_refused(shards, name, message):
    mpath = shards / "manifest.json"
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["shards"][0]["name"] = name
    mpath.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        load_manifest(shards)
    problems = verify(shards)
    assert any(message in p for p in problems), problems


def rewrite_json(tar: Path, change, only_first: bool = True) -> None:
    """Rewrite the .json of a shard's first sample (or all) with ``change(meta)``, keeping the tar valid."""
    with tarfile.open(tar) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf, done = io.BytesIO(), False
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in items:
            if member.name.endswith(".json") and not (only_first and done):
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
                member.size, done = len(data), True
            out.addfile(member, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())


def edit_manifest(shards: Path, change) -> None:
    """Apply ``change(manifest)``, then re-record every shard's bytes and sha256 (a consistent forgery)."""
    import hashlib

    mpath = shards / "manifest.json"
    m = json.loads(mpath.read_text())
    change(m)
    for split in m["splits"].values():
        for s in split["shards"]:
            path = shards / s["name"]
            if path.is_file():
                s["bytes"], s["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    mpath.write_text(json.dumps(m))


def test_a_sample_source_outside_the_source_root_is_not_read(shards, chexpert, tmp_path):
    from cxrdist.data import World
    from cxrdist.data.files import FileError, file_eval_loader
    from cxrdist.shards.shardset import ShardSet

    rewrite_json(next(shards.glob("train-*.tar")), lambda m: m.update(source="../outside_secret/secret.jpg"))
    edit_manifest(shards, lambda m: None)
    world = World.of(rank=0, world_size=1, workers=0, seed=0, micro_batch=4)
    loader = file_eval_loader(ShardSet.open(shards), "train", world, "jpeg", source_root=str(chexpert))
    with pytest.raises(FileError, match=OUTSIDE):
        for _ in loader:
            pass


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(labels=[2.0] * len(m["labels"])), "label values must lie in [0, 1]"),
        (lambda m: m.update(mask=[7] * len(m["mask"])), "mask values must be 0 or 1, not [7.0]"),
        (lambda m: m.update(labels=[float("nan")] * len(m["labels"])), "label values must lie in [0, 1]"),
        (lambda m: m.update(labels=m["labels"][:3]), "labels has 3 entries; the manifest names 14 labels"),
    ],
)
def test_bad_label_and_mask_values_are_named_by_verify_and_the_loader(shards, change, message):
    from cxrdist.shards.tario import ShardError

    from runs import shard_loader

    tar = next(shards.glob("val-*.tar"))
    rewrite_json(tar, change)
    edit_manifest(shards, lambda m: None)
    problems = verify(shards)
    assert any(p.startswith(f"{tar.name}: sample ") and message in p for p in problems), problems
    with pytest.raises(ShardError, match=rf"{tar.name}: sample \S+ is unreadable: .*{message[:20]}"):
        for _ in shard_loader(shards, "val"):
            pass


def test_shards_listed_twice_or_in_two_splits_and_wrong_totals_are_refused(shards):
    def twice(m):
        m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0]))

    edit_manifest(shards, twice)
    with pytest.raises(ManifestError, match=r"train-000000\.tar is listed twice \(in train and train\)"):
        load_manifest(shards)
    assert any("listed twice" in p for p in verify(shards))

    def in_val_too(m):
        m["splits"]["train"]["shards"].pop()
        m["splits"]["test"]["shards"].append(dict(m["splits"]["val"]["shards"][0]))
        m["splits"]["test"]["samples"] += m["splits"]["val"]["shards"][0]["samples"]

    edit_manifest(shards, in_val_too)
    with pytest.raises(ManifestError, match=r"val-000000\.tar.* is listed under split 'test'"):
        load_manifest(shards)

    def fix_and_miscount(m):
        m["splits"]["test"]["shards"].pop()
        m["splits"]["test"]["samples"] += 1  # the totals no longer add up

    edit_manifest(shards, fix_and_miscount)
    with pytest.raises(ManifestError, match=r"split test lists shards of \d+ samples in all, but says"):
        load_manifest(shards)


def test_a_key_repeated_inside_a_shard_is_named_by_verify_and_the_loader(shards):
    tar = next(shards.glob("train-*.tar"))
    with tarfile.open(tar) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in items + items[:2]:  # the first sample again at the end
            out.addfile(member, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    key = items[0][0].name.split(".")[0]

    def one_more(m):  # a consistent forgery: the counts agree with the tar
        entry = next(e for e in m["splits"]["train"]["shards"] if e["name"] == tar.name)
        entry["samples"] += 1
        m["splits"]["train"]["samples"] += 1

    edit_manifest(shards, one_more)
    assert any(f"key {key} appears twice" in p for p in verify(shards))
    from cxrdist.shards.tario import ShardError

    from runs import shard_loader

    with pytest.raises(ShardError, match=rf"{tar.name}: key {key} appears twice"):
        for _ in shard_loader(shards, "train", batch=1):
            pass


def flip_a_jpeg_byte(tar: Path) -> None:
    """Change one byte inside the first JPEG's data (the tar stays well-formed, its size the same)."""
    data = bytearray(tar.read_bytes())
    at = data.index(b"\xff\xd8") + 200
    data[at] ^= 0xFF
    tar.write_bytes(bytes(data))


def test_a_shard_whose_bytes_differ_from_its_sha256_is_named_before_it_is_used(shards):
    from cxrdist.shards.tario import ShardError

    from runs import shard_loader

    tar = sorted(shards.glob("val-*.tar"))[0]
    flip_a_jpeg_byte(tar)
    assert f"{tar.name}: sha256 mismatch" in verify(shards)
    batches = []
    with pytest.raises(ShardError, match=rf"{tar.name}: sha256 mismatch"):
        for b in shard_loader(shards, "val", batch=1):
            batches.append(b)
    assert batches == []  # not one sample of the damaged shard was handed out
    assert sum(len(b["key"]) for b in shard_loader(shards, "val", check_sha256=False))
    # the training loader hashes when its epoch asks for it (the trainer: the first epoch, --check-sha256)
    flip_a_jpeg_byte(sorted(shards.glob("train-*.tar"))[0])
    with pytest.raises(ShardError, match="sha256 mismatch"):
        for _ in shard_loader(shards, "train", batch=2, train=True):
            pass


@pytest.mark.parametrize(
    "mode, reads",
    [("first", [True, False, False]), ("every", [True, True, True]), ("off", [False, False, False])],
)
def test_check_sha256_decides_per_read_of_a_split(shards, tmp_path, mode, reads):
    import torch

    from cxrdist.config import TrainConfig
    from cxrdist.data import World
    from cxrdist.engine.inputs import Loaders, open_shards

    cfg = TrainConfig()
    cfg.data.shards, cfg.data.check_sha256, cfg.data.workers, cfg.run.out = str(shards), mode, 0, str(tmp_path / "r")
    world = World.of(rank=0, world_size=1, workers=0, seed=0, micro_batch=2)
    loaders = Loaders(cfg, world, torch.device("cpu"), open_shards(cfg))
    loaders.steps_per_epoch()  # planning reads nothing and decides nothing
    assert [loaders.train(e).stream.plan.values[2] for e in range(3)] == reads
    assert [loaders.eval("val").stream.plan.values[2] for _ in range(3)] == reads
    loaders.close()


def test_a_key_or_patient_in_two_splits_is_named_by_verify(shards):
    train_tar, test_tar = sorted(shards.glob("train-*.tar"))[0], sorted(shards.glob("test-*.tar"))[0]
    with tarfile.open(train_tar) as tf:
        stolen = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:2]]  # one train sample: jpg + json
    with tarfile.open(test_tar) as tf:
        items = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in items + stolen:
            out.addfile(member, io.BytesIO(data))
    test_tar.write_bytes(buf.getvalue())
    key, patient = stolen[0][0].name.split(".")[0], json.loads(stolen[-1][1])["patient_id"]

    def one_more(m):
        m["splits"]["test"]["shards"][0]["samples"] += 1
        m["splits"]["test"]["samples"] += 1

    edit_manifest(shards, one_more)
    problems = verify(shards)
    assert f"splits train and test share 1 keys: {key}" in problems, problems
    assert any(p.startswith("splits train and test share") and "patients" in p and patient in p for p in problems)


def test_a_config_with_python_tags_is_refused_in_one_line(tmp_path):
    from cxrdist.config import ConfigError, TrainConfig

    marker = tmp_path / "ran"
    bad = tmp_path / "config.yaml"
    bad.write_text(f'run: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"config\.yaml: not a readable cxrdist config \(could not determine a "):
        TrainConfig.load(bad)
    assert not marker.exists()
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="not a cxrdist config"):
        TrainConfig.load(bad)
    bad.write_text("optim: {batch: 8}\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: config group 'optim' has unknown keys: \['batch'\]"):
        TrainConfig.load(bad)


def test_a_row_with_too_few_fields_is_skipped_not_read_as_negatives(chexpert):
    from cxrdist.sources import build_table

    lines = (chexpert / "train.csv").read_text().splitlines()
    cut = ",".join(lines[-1].split(",")[:8])  # a truncated download's last line: 8 of 19 fields
    (chexpert / "train.csv").write_text("\n".join(lines[:-1] + [cut]) + "\n")
    t = build_table("chexpert", chexpert, views="all")
    n = len(lines)
    assert {"source": f"train.csv:{n}", "reason": "unreadable row: 8 fields, the header has 19"} in t.skipped
    assert cut.split(",")[0].split("/", 1)[1] not in set(t.df["path"])


def test_unparseable_age_and_sex_cells_are_counted_in_the_manifest(chexpert, tmp_path):
    import numpy as np
    import pandas as pd

    from cxrdist.sources.table import parse_age

    csv = chexpert / "train.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[[0, 1, 2], "Age"] = ["abc", "", "4o"]  # two unparseable, one blank (just missing)
    df.loc[3, "Sex"] = "xyz"
    df.to_csv(csv, index=False)
    out = tmp_path / "counted"
    pack("chexpert", chexpert, out, size=32, views="all", workers=1, min_shards=1, quiet=True)
    assert json.loads((out / "manifest.json").read_text())["unparseable"] == {"Age": 2, "Sex": 1}
    age, bad = parse_age(pd.Series(["058Y", "", "abcY", "61", None]), unit="Yy")  # NIH's Patient Age
    assert bad == 1 and np.array_equal(age, [58, np.nan, np.nan, 61, np.nan], equal_nan=True)


def test_a_full_disk_refuses_a_checkpoint_before_writing_and_keeps_the_previous(small_disk):
    import torch

    from cxrdist.engine import checkpoint as ckpt

    path = small_disk / "last.pt"
    state = {"w": torch.arange(1_000_000, dtype=torch.int32)}  # 4 MB
    ckpt.atomic_torch_save(state, path, keep_previous=True)
    ckpt.atomic_torch_save({"w": state["w"] + 1}, path, keep_previous=True)  # the first moves to last.prev.pt
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: not written: no space left on device .* intact"):
        ckpt.atomic_torch_save({"w": state["w"] + 2}, path, keep_previous=True)
    assert torch.equal(ckpt.load(path)["w"], state["w"] + 1)
    assert torch.equal(ckpt.load(ckpt.previous(path))["w"], state["w"])
    assert {p.name for p in small_disk.iterdir()} == {"last.pt", "last.prev.pt"}  # no temporary left
    # a write that runs out of room anyway (the check passed, then the disk filled) names the file too
    with pytest.raises(ckpt.CheckpointError, match=rf"{small_disk / 'big'}: not written: no space left"):
        with ckpt.writing(small_disk / "big"), open(small_disk / "big", "wb") as f:
            f.write(bytes(8 << 20))


@pytest.mark.slow
def test_training_onto_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_shards, tiny_run, mount_disk):
    import torch

    from runs import TINY

    ckpt_mb = (tiny_run / "checkpoints" / "last.pt").stat().st_size / 2**20  # the same model and optimizer
    run = mount_disk(max(2, round(2.4 * ckpt_mb))) / "run"  # room for two checkpoints, not three
    args = ["train", "--shards", tiny_shards["shards"], "--out", run, "--backend", "single", "--epochs", "2"]
    proc = cxrdist_cli(*args, *TINY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("cxrdist train: error: ")]
    assert "not written: no space left on device" in error and "the previous checkpoint is intact" in error
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] >= 0  # loadable
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["error"]


def test_a_damaged_last_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    import torch

    from cxrdist.engine import checkpoint as ckpt

    path = tmp_path / "last.pt"
    ckpt.atomic_torch_save({"step": torch.tensor(1)}, path, keep_previous=True)
    ckpt.atomic_torch_save({"step": torch.tensor(2)}, path, keep_previous=True)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ckpt.CheckpointError, match=rf"{path}: unreadable checkpoint, truncated"):
        ckpt.load(path)
    assert int(ckpt.load_or_previous(path)["step"]) == 1
    assert f"{path}: unreadable checkpoint" in caplog.text and "resuming from last.prev.pt" in caplog.text
    ckpt.set_aside_if_damaged(path)  # what rank 0 does before a resume: the damaged file never becomes "prev"
    assert not path.exists() and (tmp_path / "last.pt.damaged").is_file()
    assert int(ckpt.load_or_previous(path)["step"]) == 1
    ckpt.atomic_torch_save({"step": torch.tensor(3)}, path, keep_previous=True)
    assert int(ckpt.load(ckpt.previous(path))["step"]) == 1  # the good one stays the fallback


class Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['CXRDIST_PWNED'], 'w').write('ran')",))


def test_a_checkpoint_that_needs_pickled_code_is_refused_by_resume_in_one_line(tiny_shards, tmp_path, monkeypatch):
    import torch

    run, flag = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "x": Payload()}, run / "checkpoints" / "last.pt")
    monkeypatch.setenv("CXRDIST_PWNED", str(flag))
    from runs import TINY, in_process

    args = ["train", "--shards", tiny_shards["shards"], "--out", run, "--resume", "--backend", "single", *TINY]
    proc = in_process(*args)  # in this process: the payload would run here, in the test's own interpreter
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("cxrdist train: error: ")]
    assert f"{run / 'checkpoints' / 'last.pt'}: refused" in error and "never runs pickled code" in error
    assert "weights_only" not in proc.stderr and not flag.exists()
    torch.load(run / "checkpoints" / "last.pt", weights_only=False)  # the payload is live: unsafe loading runs it
    assert flag.read_text() == "ran"


def test_the_local_launcher_escalates_to_sigkill():
    from cxrdist.engine.spawn import stop_signal

    assert stop_signal(None, 10) is None and stop_signal(5, 10) is None
    assert stop_signal(10.5, 10) == signal.SIGTERM and stop_signal(20.5, 10) == signal.SIGKILL


def test_a_failed_rank_behind_a_stuck_rank_0_ends_the_job_and_the_stuck_rank_shows_its_stack(tmp_path, capsys):
    """Rank 0 stuck outside any collective (it never errors by itself, and ignores SIGTERM) and rank 1 failed:
    the launcher polls every rank, asks the one still running for its stack (SIGUSR1), then kills it. (It once
    polled only up to the first live rank: a failed rank 1 behind a stuck rank 0 hung the job for good.)"""
    import subprocess
    import sys
    import time

    from cxrdist.engine.spawn import supervise

    ready, log = tmp_path / "ready", tmp_path / "rank0.err"
    stuck = (
        "import faulthandler, pathlib, signal, time; faulthandler.register(signal.SIGUSR1, all_threads=True); "
        f"signal.signal(signal.SIGTERM, signal.SIG_IGN); pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    )
    failing = f"import os, sys, time\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.05)\nsys.exit(3)"
    with open(log, "w") as err:
        procs = [subprocess.Popen([sys.executable, "-c", code], stderr=err) for code in (stuck, failing)]
        t0 = time.monotonic()
        codes = supervise(procs, grace_s=0.5, poll_s=0.05)
    assert codes == [-signal.SIGKILL, 3]
    assert time.monotonic() - t0 < 60  # ends at all; the grace periods are a second
    assert "rank 1 exited with code 3" in capsys.readouterr().err
    assert "most recent call first" in log.read_text()  # faulthandler's dump of the stuck rank


@pytest.mark.slow
def test_a_stopped_rank_does_not_hang_the_local_launcher(tiny_shards, tmp_path):
    """Rank 0 SIGSTOPped: rank 1 times out in the collective, and the launcher ends the job within the timeout
    and two grace periods (SIGTERM does not reach a stopped process; SIGKILL does). Rank 0, since the failed
    rank is then one the launcher reaches only by polling every rank (the crash test kills rank 1)."""
    import subprocess
    import sys
    import time

    import psutil

    argv = ["--shards", tiny_shards["shards"], "--out", tmp_path / "stuck", "--backend", "ddp", "--nproc", "2"]
    timeout = 10  # the collective timeout rank 1 waits out (the launcher's grace periods are 10 s each)
    argv += ["--epochs", "50", "--timeout", str(timeout), "--model", "cxrtiny", "--image-size", "32"]
    argv += ["--batch-size", "8", "--workers", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrdist.cli", "train", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    telemetry = tmp_path / "stuck" / "telemetry" / "rank0.jsonl"
    deadline = time.monotonic() + 300
    while not (telemetry.exists() and '"step"' in telemetry.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    rank0 = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "0"]
    assert rank0, "rank 0 should be running"
    t0 = time.monotonic()
    rank0[0].suspend()
    try:
        _, err = proc.communicate(timeout=150)
    finally:
        if rank0[0].is_running():
            rank0[0].kill()
    took = time.monotonic() - t0
    assert proc.returncode != 0 and "exited with code" in err, err[-2000:]
    assert took < timeout + 2 * 10 + 45, f"the launcher took {took:.0f} s to end the job"


def cxrdist_cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "cxrdist.cli", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def one_line_error(proc, *words: str, argv=()) -> None:
    """Exit 2, one line on stderr, no traceback, naming what is wrong."""
    assert proc.returncode == 2, (argv, proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, proc.stderr


@pytest.mark.slow
def test_user_mistakes_are_one_line_exit_2(tmp_path, shards):
    """Each mistake in a `cxrdist` process of its own (exit code, the whole stderr); run two at a time."""
    from concurrent.futures import ThreadPoolExecutor

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cx = tmp_path / "empty" / "CheXpert-v1.0-small"
    cx.mkdir(parents=True)
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(__import__("cxrdist.labels").labels.CHEXPERT)
    for name in ("train.csv", "valid.csv"):
        (cx / name).write_text(header + "\n")
    train = ["train", "--shards", shards, "--backend", "single", "--model", "cxrtiny", "--workers", "0"]
    cases = [
        ([*train, "--image-size", "7", "--out", tmp_path / "r"], ["--image-size must be at least 32"]),
        ([*train, "--out", a_file], [f"--out {a_file} is a file"]),
        ([*train, "--check-sha256", "sometimes", "--out", tmp_path / "r"], ["--check-sha256 must"]),
        (["eval", "--run", tmp_path / "nope"], ["no such run folder"]),
        (["report", tmp_path / "nope", "--out", tmp_path / "rep"], ["no such run folder"]),
        (["synth", "--layout", "nih", "--out", tmp_path / "s", "--n", "0"], ["n must be at least 1"]),
        (["synth", "--layout", "nih", "--out", tmp_path / "s", "--size", "-5"], ["at least 16"]),
        (["shard", "--source", "chexpert", "--root", cx, "--out", tmp_path / "o"], ["no usable rows"]),
    ]
    if not __import__("torch").cuda.is_available():  # on a GPU machine --device cuda is no mistake
        cases.append(
            ([*train, "--device", "cuda", "--out", tmp_path / "r"], ["--device cuda was asked", "--device cpu"])
        )
    abbrev = [*train, "--batch", "8", "--out", tmp_path / "r"]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda argv: cxrdist_cli(*argv), [argv for argv, _ in cases] + [abbrev]))
    for (argv, words), proc in zip(cases, procs):
        one_line_error(proc, *words, argv=argv)
    assert procs[-1].returncode == 2 and "unrecognized arguments: --batch 8" in procs[-1].stderr


@pytest.mark.slow
def test_predict_fails_when_no_file_could_be_read(tiny_run, tmp_path):
    from runs import in_process

    folder = tmp_path / "a-folder"
    folder.mkdir()
    proc = in_process("predict", "--checkpoint", tiny_run, "--json", folder, tmp_path / "missing.png")
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [r["error"] for r in json.loads(proc.stdout)]
    assert errors[0] == "a folder, not an image file" and "missing" not in errors[0]


@pytest.mark.slow
def test_a_failing_evaluation_keeps_the_epoch_and_says_failed(tiny_shards, tmp_path):
    import shutil

    import torch

    from runs import TINY, in_process, records, summary, train

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards["shards"], shards)
    good = (shards / "manifest.json").read_text()

    def off_by_one(m):  # val says one sample more than its shard holds (the totals agree with each other)
        m["splits"]["val"]["samples"] += 1
        m["splits"]["val"]["shards"][0]["samples"] += 1

    edit_manifest(shards, off_by_one)
    run = tmp_path / "run"
    args = ["--shards", shards, "--out", run, "--backend", "single", "--epochs", "1", *TINY]
    failed = train(*args, check=False)
    assert failed.returncode != 0
    s = summary(run)
    assert s["status"] == "failed" and "val-000000.tar" in s["error"], s.get("error")
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] == s["steps_per_epoch"]  # the epoch's training kept
    (shards / "manifest.json").write_text(good)
    in_process("train", *args, "--resume", check=True)
    s = summary(run)
    assert s["status"] == "completed" and s["global_step"] == s["steps_per_epoch"]  # no step trained twice
    assert len(records(run, 0, "epoch")) == 1
