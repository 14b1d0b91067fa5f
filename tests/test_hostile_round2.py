"""Hostile inputs, round 2 (issue 19): run folders and configs from others, URLs that lie or stall, shard
caches, shared files. Every case runs against a real loopback server (tests/servers.py), a real tmpfs or a
read-only mount; the promises are in docs/SECURITY.md."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cxrdist.config import ConfigError, parse_train_argv
from cxrdist.shards import location
from cxrdist.shards.location import LocationError
from cxrdist.shards.manifest import ManifestError, load_manifest
from cxrdist.shards.verify import verify

from runs import TINY, cli, in_process, records, summary, train
from servers import http_server, silent_server

SECRET = "s3cr3t-Pw0rd"


def one_line(proc, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def served(tiny_shards, tmp_path):
    folder = tmp_path / "www" / "served"
    shutil.copytree(tiny_shards["shards"], folder)
    with http_server(tmp_path / "www") as (base, faults, _):
        yield {"base": base, "url": f"{base}/served", "folder": folder, "faults": faults}


@pytest.fixture
def fast_timeouts(monkeypatch):
    """The read timeout and per-read deadline scaled down (30 s / 60 s in use), the host tally cleared."""
    monkeypatch.setenv("CXRDIST_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("CXRDIST_READ_DEADLINE_S", "3")
    monkeypatch.setattr(location, "_GAVE_UP", {})


# --------------------------------------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------------------------------------
def pipe_command(shards: Path, flag: Path) -> str:
    return f"pipe:sh -c 'touch {flag}; cat {shards}/{{name}}'"


def test_a_pipe_location_from_a_config_file_is_refused_and_never_runs(tiny_shards, tmp_path):
    flag = tmp_path / "ran"
    cmd = pipe_command(tiny_shards["shards"], flag)
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(yaml.safe_dump({"data": {"shards": cmd}, "run": {"out": str(tmp_path / "r")}}))
    proc = in_process("train", "--config", theirs, *TINY)
    one_line(proc, f"{theirs}: data.shards is a pipe: location", "typed on its command line")
    assert not flag.exists()
    # the same text typed on this command line is the user's own
    assert parse_train_argv(["--config", str(theirs), "--shards", cmd]).data.shards == cmd
    with pytest.raises(ConfigError, match="data.shards is a pipe: location"):
        parse_train_argv(["--config", str(theirs), "--epochs", "1"])


@pytest.mark.slow
def test_evaluating_a_colleagues_run_folder_never_runs_its_command(tiny_run, tiny_shards, tmp_path):
    run = tmp_path / "theirs"
    shutil.copytree(tiny_run, run)
    flag = tmp_path / "ran"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["shards"] = pipe_command(tiny_shards["shards"], flag)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    one_line(
        in_process("eval", "--run", run), f"{run / 'config.yaml'}: data.shards is a pipe: location", "--allow-pipe"
    )
    assert not flag.exists()
    allowed = in_process("eval", "--run", run, "--allow-pipe", "--bootstrap", "20")  # the user's explicit opt-in
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert flag.exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_credentials_in_a_url_reach_no_file_log_or_tracker(served, tmp_path):
    """HTTP basic auth in the URL: the run trains through it, and the password is nowhere in the run folder,
    the checkpoints, the MLflow store, the W&B files, stdout, stderr or an error message."""
    served["faults"].auth = f"reader:{SECRET}"
    url = served["url"].replace("http://", f"http://reader:{SECRET}@")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", WANDB_MODE="offline")
    env |= {"WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true", "MLFLOW_EXPERIMENT_NAME": "cxr"}
    run = tmp_path / "run"
    proc = train("--shards", url, "--out", run, "--epochs", "1", *TINY, "--log-every", "1", "--log-to", "mlflow,wandb",
                 env=env)  # fmt: skip
    assert summary(run)["status"] == "completed" and summary(run)["config"]["data"]["shards"].count("***") == 1
    # an error that names the URL: said without the password
    missing = url.replace("/served", "/gone")
    failed = cli("eval", "--run", run, "--shards", missing, env=env)
    assert failed.returncode == 2 and "reader:***@" in failed.stderr, failed.stderr[-2000:]
    outputs = proc.stdout + proc.stderr + failed.stdout + failed.stderr
    assert SECRET not in outputs
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == [], leaks


def test_a_remote_manifest_beyond_the_cap_is_refused_without_reading_it(served):
    import psutil

    from cxrdist.shards.manifest import MANIFEST_CAP

    served["faults"].huge["manifest.json"] = 1 << 30  # 1 GiB
    rss = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match=rf"more than {MANIFEST_CAP >> 20} MiB, the cap for a manifest.json"):
        load_manifest(served["url"])
    grew = psutil.Process().memory_info().rss - rss
    assert grew < 3 * MANIFEST_CAP and time.monotonic() - t0 < 60, (grew, time.monotonic() - t0)


def test_a_redirect_to_another_host_is_refused_and_a_same_host_one_named(served, tmp_path, monkeypatch):
    with http_server(tmp_path) as (elsewhere, _, _):
        served["faults"].redirect["manifest.json"] = f"{elsewhere}/www/served/manifest.json"
        with pytest.raises(LocationError, match=rf"redirects to {elsewhere}/www/served/manifest.json, another"):
            load_manifest(served["url"])
        with pytest.raises(LocationError, match="another scheme or host: refused"):  # `verify` no longer says clean
            verify(served["url"])
        monkeypatch.setenv("CXRDIST_ALLOW_REDIRECTS", "1")  # allowed: followed
        assert load_manifest(served["url"])["labels"]
    monkeypatch.delenv("CXRDIST_ALLOW_REDIRECTS")
    (served["folder"].parent / "moved").mkdir()
    (served["folder"].parent / "moved" / "old.json").write_text("{}")  # where it leads is not a manifest
    served["faults"].redirect["manifest.json"] = f"{served['base']}/moved/old.json"
    with pytest.raises(ManifestError, match=rf"{served['base']}/moved/old.json: missing fields"):
        load_manifest(served["url"])  # a same-host redirect is followed, and the message names where it led


# --------------------------------------------------------------------------------------------------------
# nothing lost
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_training_on_one_run_folder_is_refused_and_a_dead_holders_lock_taken_over(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "cxrdist.cli", "train", "--shards", str(tiny_shards["shards"]), "--out", str(run),
         *TINY, "--epochs", "30", "--log-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not records(run, 0, "step") and time.monotonic() < deadline:
            time.sleep(0.1)
        second = in_process("train", "--shards", tiny_shards["shards"], "--out", run, *TINY, "--resume")
        one_line(second, f"{run} is in use by pid {first.pid} on ", "choose another --out")
    finally:
        first.kill()
        first.wait()
    # killed: its flock is gone with it, its name is still in the file; the next run takes it over
    assert f"pid {first.pid}" in (run / ".lock").read_text()
    again = in_process("train", "--shards", tiny_shards["shards"], "--out", run, *TINY, "--max-steps", "2", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"took over the lock of pid {first.pid}" in again.stderr
    assert (run / ".lock").read_text() == ""  # a clean end leaves nothing to take over


def file_modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o027, 0o640)])
def test_files_cxrdist_writes_follow_the_umask(tiny_shards, tmp_path, umask, want):
    """A lab shares shard and run folders: every file (atomic ones included, which mkstemp makes 0600)
    gets 0666 less the umask, as any program's files do (`cxrdist shard` and `train`, in this process)."""
    before = os.umask(umask)
    try:
        shard = ["shard", "--source", "chexpert", "--root", tiny_shards["root"], "--out", tmp_path / "shards"]
        in_process(*shard, "--size", "32", "--samples-per-shard", "80", "--workers", "1", check=True)
        train_ = ["train", "--shards", tmp_path / "shards", "--out", tmp_path / "run", *TINY, "--max-steps", "2"]
        in_process(*train_, check=True)
    finally:
        os.umask(before)
    modes = file_modes(tmp_path / "shards") | file_modes(tmp_path / "run")
    assert {"manifest.json", "config.yaml", "summary.json", "checkpoints/last.pt"} <= set(modes)
    wrong = {f: oct(m) for f, m in modes.items() if m != want}
    assert wrong == {}, wrong


def test_a_server_refusing_is_named_with_its_status_code(served):
    served["faults"].status["manifest.json"] = 403
    with pytest.raises(LocationError, match=r"manifest.json: the server answered 403 Forbidden"):
        load_manifest(served["url"])
    del served["faults"].status["manifest.json"]
    shard = sorted(p.name for p in served["folder"].glob("val-*.tar"))[0]
    served["faults"].status[shard] = 401
    assert any(f"{shard}: the server answered 401 Unauthorized" in p for p in verify(served["url"]))


@pytest.mark.slow
def test_predict_refuses_an_image_too_small_to_be_a_radiograph(tiny_run, tmp_path):
    from PIL import Image

    tiny = tmp_path / "dot.png"
    Image.new("L", (1, 1), 128).save(tiny)
    proc = in_process("predict", "--checkpoint", tiny_run, "--json", tiny)
    assert proc.returncode == 1
    (result,) = json.loads(proc.stdout)
    assert result["file"] == str(tiny) and "1x1 px" in result["error"] and "at least 32" in result["error"]


# --------------------------------------------------------------------------------------------------------
# no hangs (the timeouts scaled down by fast_timeouts; in use: 30 s per read, 60 s per shard)
# --------------------------------------------------------------------------------------------------------
def test_a_stall_mid_body_ends_in_bounded_time_with_every_retry_shown(served, fast_timeouts, caplog):
    shard = sorted(p.name for p in served["folder"].glob("val-*.tar"))[0]
    served["faults"].stall[shard] = 1000  # promises 10 GiB, sends 1,000 bytes, goes silent
    t0 = time.monotonic()
    problems = verify(served["url"])
    took = time.monotonic() - t0
    assert any(f"{shard}" in p and "unreadable after" in p and "at byte 1000" in p for p in problems), problems
    assert took < 30, took  # one shard's deadline, not 5 x 60 s per shard
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(shard in m for m in retries)


def test_a_server_that_never_answers_ends_verify_in_bounded_time(fast_timeouts):
    with silent_server() as base:
        t0 = time.monotonic()
        with pytest.raises(LocationError, match=r"manifest.json: unreadable after \d attempt\(s\) in \d+ s"):
            verify(f"{base}/shards")
        assert time.monotonic() - t0 < 15
        # the host keeps failing: after two reads gave up, no third is tried
        with pytest.raises(LocationError, match="unreadable after"):
            load_manifest(f"{base}/shards")
        t0 = time.monotonic()
        with pytest.raises(LocationError, match="the host keeps failing"):
            load_manifest(f"{base}/shards")
        assert time.monotonic() - t0 < 1


@pytest.mark.slow
def test_training_from_shards_never_answered_stops_with_one_line(served, tmp_path):
    served["faults"].hang.add("*.tar")  # the manifest comes, no shard request is ever answered
    env = dict(os.environ, CXRDIST_READ_TIMEOUT_S="2", CXRDIST_READ_DEADLINE_S="4")
    t0 = time.monotonic()
    proc = train("--shards", served["url"], "--out", tmp_path / "run", *TINY, env=env, check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 2 and "unreadable after" in proc.stderr and ".tar" in proc.stderr, proc.stderr[-2000:]
    assert "retry 1 of 4" in proc.stderr  # the retries are shown while they happen
    assert took < 60, took


# --------------------------------------------------------------------------------------------------------
# one line, not a traceback
# --------------------------------------------------------------------------------------------------------
def test_an_unusable_shard_cache_is_refused_before_any_rank_starts(served, tmp_path, mount_disk):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    ro = mount_disk(4)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    full = mount_disk(1)
    (full / "filler").write_bytes(b"x" * (1000 << 10))  # 24 KB left: less than any shard
    base = ["train", "--shards", served["url"], "--out", tmp_path / "r", *TINY]
    one_line(in_process(*base, "--shard-cache", a_file), f"--shard-cache {a_file}: a file, not a folder")
    one_line(in_process(*base, "--shard-cache", ro / "c"), f"--shard-cache {ro / 'c'}: cannot write there")
    one_line(in_process(*base, "--shard-cache", full / "c"), f"--shard-cache {full / 'c'}:", "the largest shard")
    assert not (tmp_path / "r").exists()


def test_local_shards_with_a_shard_cache_say_it_is_not_used(tiny_shards, tmp_path, caplog):
    from cxrdist.engine.inputs import open_shards

    cfg = parse_train_argv(["--shards", str(tiny_shards["shards"]), "--out", "x", "--shard-cache", str(tmp_path)])
    open_shards(cfg)
    said = [r.getMessage() for r in caplog.records if "--shard-cache" in r.getMessage()]
    assert len(said) == 1 and "a local folder, read in place: the cache is not used" in said[0]


def test_a_cache_that_fills_mid_read_falls_back_to_streaming_and_keeps_no_partial_file(served, mount_disk, caplog):
    from cxrdist.shards.cache import ShardCache

    from runs import shard_loader

    sizes = sorted(p.stat().st_size for p in served["folder"].glob("train-*.tar"))
    disk = mount_disk(1)
    (disk / "filler").write_bytes(b"x" * ((1 << 20) - sizes[0] - sizes[0] // 2))  # room for one shard and a half
    cache = ShardCache(str(disk / "c"), 10**9)
    loader = shard_loader(served["url"], "train", cache=cache)
    keys = [k for b in loader for k in b["key"]]
    manifest = json.loads((served["folder"] / "manifest.json").read_text())
    assert len(keys) == len(set(keys)) == manifest["splits"]["train"]["samples"]  # every sample, streamed on
    assert not list(disk.rglob("*.partial-*")) and len(list(disk.rglob("*.tar"))) >= 1
    full = [r.getMessage() for r in caplog.records if "no longer caching" in r.getMessage()]
    assert len(full) == 1 and "No space left on device" in full[0], full


def test_a_poisoned_cache_copy_is_dropped_and_read_from_the_url_again(served, tmp_path, caplog):
    from cxrdist.shards.cache import ShardCache

    from runs import shard_loader

    cache = ShardCache(str(tmp_path / "cache"), 10**9)
    read = lambda: [k for b in shard_loader(served["url"], "val", cache=cache) for k in b["key"]]  # noqa: E731
    first = read()
    copy = sorted(cache.folder(served["url"]).glob("val-*.tar"))[0]
    data = bytearray(copy.read_bytes())
    data[data.index(b"\xff\xd8") + 100] ^= 0xFF
    copy.write_bytes(bytes(data))
    before = len(served["faults"].requests)
    assert read() == first  # from the URL again, not an error blaming the shard
    assert any(name == copy.name for name, _ in served["faults"].requests[before:])
    assert any("the cached copy failed its sha256: dropped" in r.getMessage() for r in caplog.records)
    assert read() == first and copy.read_bytes() == (served["folder"] / copy.name).read_bytes()  # re-cached whole


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "--lr must be a finite number > 0.0, not nan"),
        ("--lr", "-1", "--lr must be a finite number > 0.0, not -1.0"),
        ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0.0"),
        ("--momentum", "1.5", "--momentum must be a finite number >= 0.0 and < 1.0"),
        ("--log-every", "0", "--log-every must be a finite number >= 1"),
    ],
)
def test_numeric_options_are_checked_before_any_rank_starts(tiny_shards, tmp_path, flag, value, message):
    one_line(
        in_process("train", "--shards", tiny_shards["shards"], "--out", tmp_path / "r", *TINY, flag, value), message
    )


def test_a_config_with_a_nan_learning_rate_is_one_line_naming_the_value(tiny_shards, tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("optim:\n  lr: .nan\n")
    one_line(in_process("train", "--config", bad, "--shards", tiny_shards["shards"], "--out", tmp_path / "r"),
             "--lr must be a finite number > 0.0, not nan")  # fmt: skip


@pytest.mark.slow
def test_export_to_a_folder_a_read_only_mount_or_a_full_disk_is_one_line(tiny_run, tmp_path, mount_disk):
    one_line(in_process("export", "--checkpoint", tiny_run, "--out", tmp_path), f"--out {tmp_path} is a folder")
    ro = mount_disk(4)
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    one_line(in_process("export", "--checkpoint", tiny_run, "--out", ro / "m.pt", "--format", "torchscript"),
             f"--out {ro / 'm.pt'}: not written", "Read-only file system")  # fmt: skip
    full = mount_disk(1)
    (full / "filler").write_bytes(b"x" * (900 << 10))
    proc = cli("export", "--checkpoint", tiny_run, "--out", full / "m.pt", "--format", "torchscript")  # a process:
    one_line(proc, f"--out {full / 'm.pt'}: not written", "No space left on device")  # no SIGABRT
    assert [p.name for p in full.iterdir()] == ["filler"]  # no truncated model, no temporary file


# --------------------------------------------------------------------------------------------------------
# weak messages
# --------------------------------------------------------------------------------------------------------
def test_a_pickled_pretrained_file_gets_cxrdists_own_line(tmp_path):
    import torch

    from cxrdist.errors import UserError
    from cxrdist.models import build_model

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"x": Payload()}, tmp_path / "w.pt")
    with pytest.raises(UserError) as e:
        build_model("cxrtiny", pretrained=tmp_path / "w.pt")
    assert "never runs pickled code" in str(e.value) and "weights_only" not in str(e.value)


def test_an_html_page_sent_with_status_200_is_named_as_html(served):
    shard = sorted(p.name for p in served["folder"].glob("val-*.tar"))[0]
    served["faults"].html.add(shard)
    problems = verify(served["url"])
    assert any(f"{shard}: the server sent text/html (an error or login page), not a tar" in p for p in problems)
