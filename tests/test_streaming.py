"""Shard folders as locations: streamed from a real HTTP server and a real S3 API server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from cxrdist.shards import location
from cxrdist.shards.location import LocationError, parse
from cxrdist.shards.manifest import ManifestError, load_manifest
from cxrdist.shards.tario import ShardError
from cxrdist.shards.verify import verify

from fixtures_runs import ONE_EPOCH, STRAIGHT
from runs import TINY, assert_same_weights, final_weights, in_process, shard_loader
from servers import gcs_server, http_server, s3_server, upload


@pytest.fixture
def served(tiny_shards, tmp_path):
    """A copy of the tiny shards (tests may damage it) behind a range-serving HTTP server."""
    folder = tmp_path / "served"
    shutil.copytree(tiny_shards["shards"], folder)
    with http_server(tmp_path) as (base, faults, _):
        yield {"url": f"{base}/served", "folder": folder, "faults": faults}


@pytest.fixture(scope="module")
def s3(tiny_shards):
    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():  # this process and the CLI runs it starts talk to the server
            mp.setenv(k, v)
        yield {"url": upload(env, tiny_shards["shards"], "cxr", "tiny/shards"), "env": env}


def keys_and_labels(where) -> list[tuple[str, list[float]]]:
    out = []
    for b in shard_loader(where, "val"):
        out += list(zip(b["key"], b["labels"].tolist()))
    return out


def test_a_location_is_parsed_and_an_unknown_scheme_refused(tmp_path):
    assert parse(tmp_path).local == tmp_path and parse(f"file://{tmp_path}").local == tmp_path
    assert parse("s3://b/p").url("train-000000.tar") == "s3://b/p/train-000000.tar"
    assert parse("pipe:cat /data/{name}").url("x.tar") == "pipe:cat /data/x.tar"
    assert location.is_remote("https://h/p") and not location.is_remote(tmp_path)
    with pytest.raises(LocationError, match="unknown location scheme 'ftp'"):
        parse("ftp://host/shards")
    with pytest.raises(LocationError, match=r"needs \{name\}"):
        parse("pipe:cat x")


def test_http_and_s3_read_the_same_samples_as_the_folder(tiny_shards, served, s3):
    local = keys_and_labels(tiny_shards["shards"])
    assert keys_and_labels(served["url"]) == local
    assert keys_and_labels(s3["url"]) == local
    assert keys_and_labels(f"pipe:cat {served['folder']}/{{name}}") == local
    assert len(local) == json.loads((tiny_shards["shards"] / "manifest.json").read_text())["splits"]["val"]["samples"]
    # streamed, not downloaded first: every shard read in one GET from its start
    assert all(r == "" for name, r in served["faults"].requests if name.endswith(".tar"))


def test_verify_checks_a_remote_folder_and_names_a_damaged_shard(served, s3):
    assert verify(served["url"]) == [] and verify(s3["url"]) == []
    tar = sorted(served["folder"].glob("val-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[data.index(b"\xff\xd8") + 200] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert f"{tar.name}: sha256 mismatch: its bytes differ from the manifest's (damaged or replaced shard)" in [
        p.replace(f" ({served['url']}/{tar.name})", "") for p in verify(served["url"])
    ]
    with pytest.raises(ShardError, match=rf"{tar.name} \({served['url']}/{tar.name}\): sha256 mismatch"):
        keys_and_labels(served["url"])


def test_a_dropped_connection_is_resumed_at_the_byte_it_broke(tiny_shards, served):
    tar = sorted(served["folder"].glob("val-*.tar"))[0].name
    served["faults"].drop[tar] = 2  # twice: the third request completes it
    assert keys_and_labels(served["url"]) == keys_and_labels(tiny_shards["shards"])
    ranges = [r for name, r in served["faults"].requests if name == tar]
    assert ranges[0] == "" and all(r.startswith("bytes=") and r != "bytes=0-" for r in ranges[1:3])


def test_a_server_without_ranges_is_re_read_up_to_the_break(tiny_shards, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(tiny_shards["shards"], folder)
    with http_server(tmp_path, ranges=False) as (base, faults, _):
        tar = sorted(folder.glob("val-*.tar"))[0].name
        faults.drop[tar] = 1
        assert keys_and_labels(f"{base}/plain") == keys_and_labels(tiny_shards["shards"])


def test_missing_shards_dead_servers_and_bad_locations_are_one_clear_error(served, tmp_path):
    tar = sorted(served["folder"].glob("val-*.tar"))[0].name
    served["faults"].gone.add(tar)
    with pytest.raises(ShardError, match=rf"{tar} \(.*/{tar}\): missing"):
        keys_and_labels(served["url"])
    with pytest.raises(ManifestError, match="no manifest.json there"):
        load_manifest(served["url"] + "/nothing-here")
    with http_server(tmp_path) as (base, _, server):
        url = f"{base}/served"
        loader = shard_loader(url, "test")
        server.shutdown()
        server.server_close()
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=r"test-\d+\.tar: .*unreadable after 5 attempt\(s\)"):
            list(loader)
        assert time.monotonic() - t0 < 30  # bounded: backoff 0.5 + 1 + 2 + 4 s
    (served["folder"] / tar).unlink()  # gone from the listing too: refused before anything is read
    with pytest.raises(ManifestError, match=f"shard {tar} is listed in manifest.json but missing"):
        load_manifest(served["url"])


def test_a_failing_pipe_command_is_an_error_with_its_exit_status_and_stderr():
    with pytest.raises(LocationError, match=r"the command exited with 3: no such bucket"):
        load_manifest("pipe:sh -c 'echo no such bucket >&2; exit 3' {name}")
    with pytest.raises(LocationError, match="cannot run the command"):
        load_manifest("pipe:/nonexistent/tool {name}")


def test_s3_errors_name_the_bucket_and_what_to_do(s3):
    with pytest.raises(ManifestError, match="s3://no-such-bucket/x: no manifest.json there"):
        load_manifest("s3://no-such-bucket/x")


@pytest.mark.slow
def test_training_from_http_and_s3_follows_the_local_run(tiny_run, served, s3, tmp_path):
    """Same seed, same shards: the same loss and val AUC whichever location they are read from (the local
    run: the session's tiny_run, same arguments)."""
    local = json.loads((tiny_run / "summary.json").read_text())
    for where, shards in (("http", served["url"]), ("s3", s3["url"])):
        run = tmp_path / where  # the S3 endpoint and keys: in this process's environment (the s3 fixture)
        in_process("train", "--shards", shards, "--out", run, *ONE_EPOCH, check=True)
        got = json.loads((run / "summary.json").read_text())
        assert got["status"] == "completed"
        for k in ("train_loss", "val_auc_mean"):
            assert got["epochs"][0][k] == local["epochs"][0][k], (where, k)
        assert got["test"]["n"] == local["test"]["n"]
    run = tmp_path / "ddp-s3"  # two ranks streaming their own shards, the test split scored exactly once
    in_process("train", "--shards", s3["url"], "--out", run, "--backend", "ddp", "--nproc", "2", "--epochs", "1", *TINY,
               check=True)  # fmt: skip
    ddp = json.loads((run / "summary.json").read_text())
    assert ddp["status"] == "completed" and ddp["test"]["n"] == local["test"]["n"]


def test_the_cli_takes_locations_and_never_makes_a_folder_of_a_url(tiny_shards, served, tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "cxrdist.cli", *map(str, args)], capture_output=True, text=True, cwd=tmp_path
        )

    ok = cli("verify", served["url"])
    assert ok.returncode == 0 and "every shard matches the manifest" in ok.stdout, ok.stderr
    shard = cli("shard", "--source", "chexpert", "--root", tiny_shards["root"], "--out", "https://host/sh")
    assert shard.returncode == 2 and "can be written to a folder, s3:// or gs://, not https" in shard.stderr
    assert not (tmp_path / "https:").exists()
    bad = cli("verify", "ftp://host/x")
    assert bad.returncode == 2 and "unknown location scheme 'ftp'" in bad.stderr


def test_shard_writes_to_s3_through_a_staging_folder_and_a_rerun_uploads_nothing(tiny_shards, s3, tmp_path):
    import subprocess
    import sys

    url = "s3://cxr/packed"
    args = ["shard", "--source", "chexpert", "--root", tiny_shards["root"], "--out", url, "--staging", tmp_path]
    args += ["--size", "32", "--samples-per-shard", "40", "--min-shards", "4", "--workers", "1"]
    first = subprocess.run([sys.executable, "-m", "cxrdist.cli", *map(str, args)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    n = len(json.loads((tmp_path / "manifest.json").read_text())["splits"]["train"]["shards"])
    assert f"shards to {url} (0 already there)" in first.stdout and n > 0
    assert verify(url) == []
    again = subprocess.run([sys.executable, "-m", "cxrdist.cli", *map(str, args)], capture_output=True, text=True)
    assert again.returncode == 0 and "uploaded 0 of" in again.stdout, again.stdout[-2000:]
    assert keys_and_labels(url) == keys_and_labels(tmp_path)  # what was uploaded is what was packed


def test_the_shard_cache_keeps_whole_verified_shards_and_serves_them_next_time(tiny_shards, served, tmp_path):
    import fcntl

    from cxrdist.shards.cache import ShardCache
    from cxrdist.shards.shardset import ShardSet
    from cxrdist.shards.tario import iter_shard

    cache = ShardCache(str(tmp_path / "cache"), 10**9)
    gets = lambda: sum(1 for name, _ in served["faults"].requests if name.endswith(".tar"))  # noqa: E731
    first = [
        (k, lab)
        for b in shard_loader(served["url"], "val", cache=cache)
        for k, lab in zip(b["key"], b["labels"].tolist())
    ]
    kept = sorted(p.name for p in cache.folder(served["url"]).glob("*.tar"))
    assert kept == sorted(p.name for p in served["folder"].glob("val-*.tar")) and first == keys_and_labels(
        tiny_shards["shards"]
    )
    before = gets()
    again = [
        (k, lab)
        for b in shard_loader(served["url"], "val", cache=cache)
        for k, lab in zip(b["key"], b["labels"].tolist())
    ]
    assert again == first and gets() == before  # read from the node's copy: no request reached the server

    shards = ShardSet.open(served["url"], cache=cache).shards("test")
    reader = iter_shard(shards[0])
    next(reader)
    reader.close()  # a reader that stops inside a shard keeps nothing, and leaves no partial file
    assert not [p for p in cache.folder(served["url"]).glob("test-*") if not p.name.endswith(".lock")]
    folder = cache.folder(served["url"])
    with open(folder / f"{shards[1].name}.lock", "wb") as held:  # another rank is filling it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert len(list(iter_shard(shards[1]))) == shards[1].samples  # nobody fills: streamed, not waited for
        assert not (folder / shards[1].name).exists()

    small = ShardCache(str(tmp_path / "small"), shards[0].bytes + shards[1].bytes // 2)  # one shard fits
    for s in shards[:2]:
        list(iter_shard(s.__class__(**{**s.__dict__, "cache": small})))
    assert [p.name for p in small.folder(served["url"]).glob("*.tar")] == [shards[1].name]  # LRU evicted
    tar = served["folder"] / shards[2].name  # damaged on the server: read (checks off), but never kept
    data = bytearray(tar.read_bytes())
    data[data.index(b"\xff\xd8") + 200] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert len(list(iter_shard(shards[2], check_sha256=False))) == shards[2].samples
    assert not (folder / shards[2].name).exists()


@pytest.mark.slow
def test_a_run_preempted_while_streaming_resumes_from_the_url_to_the_same_end(straight_run, served, tmp_path):
    """Preempted and resumed from the URL: the weights of the session's uninterrupted local run."""
    from runs import preempted

    run = tmp_path / "preempted"
    summary, err = preempted(["--shards", served["url"], *STRAIGHT], run, after_lines=3)
    assert summary["status"] == "preempted", err[-2000:]
    in_process("train", "--shards", served["url"], *STRAIGHT, "--out", run, "--resume", check=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1
    assert_same_weights(final_weights(straight_run), final_weights(run))


def test_a_missing_extra_or_missing_credentials_is_one_line_naming_the_location(s3, tmp_path):
    import os
    import subprocess
    import sys

    no_s3fs = "import sys; sys.modules['s3fs'] = None; from cxrdist.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", no_s3fs, "verify", s3["url"]], capture_output=True, text=True)
    assert proc.returncode == 2 and f"{s3['url']}: reading s3:// locations needs s3fs" in proc.stderr
    assert "pip install 'cxrdist[s3]'" in proc.stderr and "Traceback" not in proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    env.update(
        HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none")
    )
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    proc = subprocess.run(
        [sys.executable, "-m", "cxrdist.cli", "verify", s3["url"]], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert s3["url"] in proc.stderr and "credentials" in proc.stderr.lower(), proc.stderr


def test_a_streamed_shard_left_unfinished_is_hashed_on_its_next_read(served):
    from cxrdist.data.stream import iter_share, worker_share

    stream = shard_loader(served["url"], "val", check_sha256=False).stream
    shards = stream.shards
    rule, verified = stream.hash_rule(), stream._verified
    assert all(rule(s) for s in shards)  # an epoch that checks nothing still finishes the streamed shards
    share = worker_share(shards, 0, 1)
    reader = iter_share(share, rule, verified)
    for _ in range(shards[0].samples + 1):  # the first shard whole, then one sample of the second
        next(reader)
    reader.close()
    assert verified == {shards[0].name}
    assert not rule(shards[0]) and rule(shards[1])


@pytest.mark.slow
def test_gcs_shards_written_verified_and_read_through_gcsfs(tiny_shards, tmp_path):
    """`shard --out gs://`, `verify gs://` and the loader against a GCS API server on loopback."""
    import subprocess
    import sys

    with gcs_server("cxr-gcs") as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        url = "gs://cxr-gcs/tiny"
        args = ["shard", "--source", "chexpert", "--root", tiny_shards["root"], "--out", url, "--staging", tmp_path]
        args += ["--size", "32", "--samples-per-shard", "40", "--min-shards", "4", "--workers", "1"]
        done = subprocess.run([sys.executable, "-m", "cxrdist.cli", *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert verify(url) == []
        assert keys_and_labels(url) == keys_and_labels(tmp_path)
        missing = subprocess.run(
            [sys.executable, "-m", "cxrdist.cli", "verify", "gs://cxr-gcs/none"], capture_output=True, text=True
        )
        assert missing.returncode == 2 and "gs://cxr-gcs/none" in missing.stderr
