"""`cxrdist train --config FILE.yaml [flags]`: a config in RUN/config.yaml's schema, flags overriding it, the
types checked; the launchers read the same flags."""

from __future__ import annotations

import pytest

from cxrdist.config import ConfigError, TrainConfig, parse_train_argv

from runs import TINY, in_process, records


def test_flags_override_the_config_file_and_only_given_flags_do(tmp_path):
    cfg = TrainConfig.from_dict({"optim": {"epochs": 7, "lr": 0.01}, "model": {"name": "resnet18"}})
    cfg.save(tmp_path / "c.yaml")
    got = parse_train_argv(["--config", str(tmp_path / "c.yaml"), "--epochs", "2", "--out", "runs/x"])
    assert (got.optim.epochs, got.optim.lr, got.model.name, got.run.out) == (2, 0.01, "resnet18", "runs/x")
    assert parse_train_argv(["--epochs", "3"]).optim.lr == TrainConfig().optim.lr  # no file: the defaults


def test_a_config_with_unknown_keys_or_wrong_types_is_one_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: five\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.epochs must be a whole number, not 'five'"):
        TrainConfig.load(bad)
    bad.write_text("optim:\n  epoch: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config group 'optim' has unknown keys: \['epoch'\]"):
        TrainConfig.load(bad)
    bad.write_text("optim:\n  lr: 1e-4\n  epochs: 2\n")  # YAML 1.1 reads 1e-4 as text: taken as the number
    assert TrainConfig.load(bad).optim.lr == 1e-4
    cli = in_process("train", "--config", tmp_path / "none.yaml")
    assert cli.returncode == 2 and cli.stderr.strip().endswith("none.yaml: no such file")


@pytest.mark.slow
def test_a_run_repeated_from_its_config_yaml_follows_the_same_curve(tiny_shards, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    once = ["--shards", tiny_shards["shards"], "--backend", "single", "--max-steps", "6", "--log-every", "2"]
    in_process("train", *once, "--out", first, *TINY, "--no-test", check=True)
    in_process("train", "--config", first / "config.yaml", "--out", again, check=True)
    loss = lambda run: [r["loss"] for r in records(run, 0, "step")]  # noqa: E731
    assert loss(again) == loss(first) and len(loss(first)) >= 3
    assert TrainConfig.load(again / "config.yaml").optim == TrainConfig.load(first / "config.yaml").optim
