"""The training recipe: timm's optimizers, the schedules, torch.compile on every backend, and the scalar
trackers (MLflow on a SQLite store, W&B offline) read back with their own clients."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from cxrdist.config import ConfigError, OptimConfig, TrainConfig, check_log_to, parse_train_argv
from cxrdist.engine.backends import validate_config
from cxrdist.engine.optim import lr_factor, make_optimizer, make_scheduler
from cxrdist.trackers import record_scalars

from runs import TINY_CPU, in_process, records, summary, train


def _cfg(*argv: str) -> TrainConfig:
    return parse_train_argv(["--out", "r", *argv])


# -- optimizer and schedule (pure) ----------------------------------------------------------------------
def test_cosine_and_step_schedules_with_warm_up():
    o = OptimConfig(epochs=4, warmup_steps=2)
    total = 40  # 10 steps per epoch
    assert [lr_factor(s, o, total) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, o, total) == pytest.approx(1.0)
    assert lr_factor(21, o, total) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(40, o, total) == pytest.approx(0.0, abs=1e-12)
    o = OptimConfig(epochs=4, sched="step", decay_epochs=2, decay_rate=0.1)
    assert [lr_factor(s, o, total) for s in (0, 9, 19, 20, 39)] == pytest.approx([1, 1, 1, 0.1, 0.1])
    o = OptimConfig(epochs=6, sched="step", decay_epochs=2, decay_rate=0.5)
    assert [lr_factor(s, o, 60) for s in (0, 25, 45, 59)] == pytest.approx([1, 0.5, 0.25, 0.25])
    # the scheduler steps these factors once per optimizer step
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(optim=OptimConfig(epochs=4, sched="step", decay_epochs=1, decay_rate=0.5, lr=1.0))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125])


def test_any_timm_optimizer_by_name_with_its_momentum_and_betas():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    sgd = make_optimizer(model, _cfg("--opt", "sgd", "--momentum", "0.8", "--lr", "0.1"))
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8 and sgd.defaults["lr"] == 0.1
    plain = make_optimizer(model, _cfg("--opt", "momentum"))
    assert type(plain) is torch.optim.SGD and not plain.defaults["nesterov"]
    adamw = make_optimizer(model, _cfg("--beta1", "0.85", "--beta2", "0.99"))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.85, 0.99)
    lamb = make_optimizer(model, _cfg("--opt", "lamb"))
    assert type(lamb).__name__ == "Lamb"
    # biases and norm parameters without decay, whichever optimizer
    for opt in (sgd, adamw, lamb):
        no_decay = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
        assert {p.ndim for p in no_decay} == {1} and len(no_decay) == 3  # conv bias, BN weight and bias


def test_recipe_options_are_checked_before_any_rank_starts():
    with pytest.raises(ConfigError, match=r"--opt 'adamww' is not a timm optimizer \(closest: adamw"):
        validate_config(_cfg("--opt", "adamww"))
    with pytest.raises(ConfigError, match=r"--sched must be one of cosine, step, not 'linear'"):
        validate_config(_cfg("--sched", "linear"))
    with pytest.raises(ConfigError, match=r"--decay-epochs >= 1"):
        validate_config(_cfg("--sched", "step", "--decay-epochs", "0"))
    with pytest.raises(ConfigError, match=r"--compile-mode must be one of default"):
        validate_config(_cfg("--compile", "--compile-mode", "fast"))
    with pytest.raises(ConfigError, match=r"--compile does not work with --backend dp: .*use --backend ddp"):
        validate_config(_cfg("--compile", "--backend", "dp"))
    for backend in ("single", "ddp", "deepspeed", "fsdp"):
        validate_config(_cfg("--compile", "--backend", backend))  # every other backend takes it
    with pytest.raises(ConfigError, match=r"--log-to takes mlflow, wandb .*not 'neptune'"):
        _cfg("--log-to", "neptune").validate()
    assert check_log_to("mlflow, wandb") == []  # both installed by the test extra


def test_a_missing_tracker_package_names_its_extra(monkeypatch):
    from cxrdist import config

    monkeypatch.setitem(config.LOG_SINKS, "mlflow", ("cxrdist_no_such_package", "mlflow"))
    assert check_log_to("mlflow") == ["--log-to mlflow needs the mlflow package: pip install 'cxrdist[mlflow]'"]


def test_train_help_groups_the_options_like_the_config():
    import argparse

    from cxrdist.config import add_train_args

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    titles = {g.title: {a.option_strings[0] for a in g._group_actions} for g in parser._action_groups}
    assert {"--opt", "--sched", "--lr"} <= titles["optim options"]
    assert {"--compile", "--log-to"} <= titles["run options"]


def test_telemetry_records_become_scalars_on_two_axes():
    step = {"event": "step", "global_step": 7, "loss": 0.5, "lr": 1e-3, "images_per_s": 9.0, "mem_peak_mb": 1.0}
    assert record_scalars(step, 0) == (
        {"images_per_s/rank0": 9.0, "mem_peak_mb/rank0": 1.0, "train/loss": 0.5, "train/lr": 1e-3},
        7,
        "global_step",
    )
    assert record_scalars(step, 1)[0] == {"images_per_s/rank1": 9.0, "mem_peak_mb/rank1": 1.0}
    epoch = {"event": "epoch", "epoch": 0, "epoch_time_s": 3.0, "images_per_s": float("nan")}
    assert record_scalars(epoch, 1) == ({"epoch/epoch_time_s/rank1": 3.0}, 1, "epoch")
    assert record_scalars({"event": "start"}, 0) is None


# -- torch.compile on every backend ---------------------------------------------------------------------
COMPILE = ["--model", "cxrtiny", "--epochs", "1", "--log-every", "1", *TINY_CPU]


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One inductor cache for the backends: kernels one backend built are reused by the next (as on a
    cluster, where TORCHINDUCTOR_CACHE_DIR is shared), which keeps four compilations within CI's time."""
    return tmp_path_factory.mktemp("inductor")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "backend, extra",
    [
        ("single", []),
        ("ddp", ["--nproc", "2"]),
        ("fsdp", ["--nproc", "2"]),
        # 3 min here (DeepSpeed compiles its module in place, evaluation included): `make test-heavy`
        pytest.param("deepspeed", ["--nproc", "2"], marks=pytest.mark.heavy),
    ],
)
def test_compile_trains_on_every_backend_like_eager(backend, extra, tiny_shards, inductor_cache, tmp_path, monkeypatch):
    """--compile: dynamo captures the model (its own counters, in the summary), the run learns what the
    eager run learns from the same seed, and checkpoints keep the model's own keys (eval reads them)."""
    args = ["--shards", tiny_shards["shards"], "--backend", backend, *extra, *COMPILE]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))  # what the ranks inherit
    in_process("train", *args, "--out", tmp_path / "eager", check=True)  # eager: no compiler in this process
    if extra:  # the --nproc launcher in this process; the ranks compile, each in its own
        in_process("train", *args, "--out", tmp_path / "compiled", "--compile", check=True)
    else:  # the one rank compiles: in a process of its own, dynamo's caches and counters stay out of this one
        train(*args, "--out", tmp_path / "compiled", "--compile")
    eager, compiled = summary(tmp_path / "eager"), summary(tmp_path / "compiled")
    assert "compile" not in eager
    assert compiled["status"] == "completed" and compiled["compile"]["mode"] == "default"
    assert compiled["compile"]["graphs"] >= 1, compiled["compile"]
    loss = lambda run: [r["loss"] for r in records(run, 0, "step")]  # noqa: E731
    # kernels fuse and reorder float ops: the same curve up to rounding, not bit for bit
    assert loss(tmp_path / "compiled") == pytest.approx(loss(tmp_path / "eager"), rel=2e-3, abs=2e-4)
    assert compiled["test"]["auc_mean"] == pytest.approx(eager["test"]["auc_mean"], abs=0.02)
    from cxrdist.engine.backends import read_weights

    state, _ = read_weights(tmp_path / "compiled", "last", backend)
    assert state and not any("_orig_mod" in k for k in state)


# -- MLflow and W&B, through their own clients ----------------------------------------------------------
def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file: a LevelDB-style log (7-byte file
    header, 32 KiB blocks of crc32/length/type chunks) of wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf, rows = Path(path).read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == 0:
            pos += left - 7 - n
    return rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_log_to_mlflow_and_wandb_sends_the_tensorboard_scalars(tiny_shards, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="cxr", WANDB_MODE="offline")
    env |= {"WANDB_PROJECT": "cxr", "WANDB_SILENT": "true"}
    run = tmp_path / "tracked"
    args = ["--shards", tiny_shards["shards"], "--out", run, "--model", "cxrtiny", "--epochs", "2"]
    train(*args, "--log-every", "1", "--log-to", "mlflow,wandb", *TINY_CPU, env=env)
    s, steps = summary(run), records(run, 0, "step")
    ids = json.loads((run / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=uri)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tracked"
    assert client.get_experiment(mlrun.info.experiment_id).name == "cxr"
    assert mlrun.data.params["optim.lr"] == str(s["config"]["optim"]["lr"])
    history = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [m.step for m in history] == [r["global_step"] for r in steps]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in steps])
    val = client.get_metric_history(ids["mlflow"], "val/auc_mean")
    assert [m.value for m in val] == pytest.approx([e["val_auc_mean"] for e in s["epochs"]])
    assert "mem_peak_mb/rank0" in mlrun.data.metrics and "epoch/time_s" in mlrun.data.metrics
    rows = _wandb_history(run)
    wb_loss = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in wb_loss] == [r["global_step"] for r in steps]
    assert [r["train/loss"] for r in wb_loss] == pytest.approx([r["loss"] for r in steps])
    wb_val = [r for r in rows if "val/auc_mean" in r]
    assert [r["epoch"] for r in wb_val] == list(range(1, len(s["epochs"]) + 1))
    assert [r["val/auc_mean"] for r in wb_val] == pytest.approx([e["val_auc_mean"] for e in s["epochs"]])
    assert ids["wandb"] in glob.glob(str(run / "wandb" / "offline-run-*"))[0]
