"""One dataclass for a run, grouped like timm's trainer options, written into every run folder.

``TrainConfig`` is what ``cxrdist train`` resolves its flags into, what the launcher forwards, what the
trainer reads, and what ``RUN/config.yaml`` holds. Groups: data, model, optim, dist, run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrdist.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
PRETRAINED_WORDS = ("timm", "imagenet")  # --pretrained by name: timm's weights, not a file
FORMATS = ("shards", "jpeg", "dicom")
SHA256_CHECKS = ("first", "every", "off")  # when the loader hashes shards (see engine.inputs)


MIN_IMAGE_SIZE = 32


@dataclass
class DataConfig:
    shards: str = ""  # shard folder (manifest.json + {split}-NNNNNN.tar); A,B,...: a mix of sources
    mix: str = ""  # a mix file: sources with weights or samples per epoch (cxrdist/shards/mix.py)
    format: str = "shards"  # shards | jpeg (loose files) | dicom (read from the source)
    source_root: str = ""  # dataset root for the jpeg/dicom formats (default: manifest's root)
    image_size: int = 224  # training resolution (shards are packed at --size, e.g. 256)
    workers: int = -1  # loader worker processes per rank (-1: auto, cxrdist.cpus.auto_workers)
    augment: str = "auto"  # auto (device on GPU, worker on CPU) | device | worker | none
    shuffle_window: int = 16_384  # samples shuffled together (data.shuffle): more mixes better, a reader holds
    # about window / (ranks x readers) raw samples
    check_sha256: str = "first"  # first (each split's first read in a process) | every (read) | off
    shard_cache: str = ""  # node-local folder keeping streamed shards after their first read ("": none)
    shard_cache_gb: float = 100.0  # the cache's bound; least recently used shards go first


@dataclass
class ModelConfig:
    name: str = "densenetblur121d"
    in_chans: int = 1
    pretrained: str = ""  # a local weights file, or timm / imagenet: timm's weights from the HF cache
    fuse_demographics: bool = False  # age and sex concatenated to the pooled features
    drop_rate: float = 0.0


@dataclass
class OptimConfig:
    epochs: int = 5
    batch_size: int = 64  # per rank per forward/backward (the poster: 64 per GPU)
    global_batch_size: int = 0  # samples per optimizer step (0: batch_size x ranks x accumulate)
    accumulate: int = 1  # micro-steps per optimizer step (resolved from global_batch_size when that is given)
    lr: float = 1e-3  # for the global batch
    opt: str = "adamw"  # any timm optimizer (timm.optim.list_optimizers()): adamw, sgd (Nesterov), momentum, ...
    momentum: float = 0.9  # optimizers with momentum (sgd, momentum, rmsprop, ...)
    beta1: float = 0.9  # optimizers with two betas (adamw, adam, lamb, ...)
    beta2: float = 0.999
    weight_decay: float = 1e-5  # never on biases and norm parameters
    sched: str = "cosine"  # cosine (to 0 at the last step) | step (x decay_rate every decay_epochs)
    decay_epochs: int = 2
    decay_rate: float = 0.1
    warmup_steps: int = 0  # linear warm-up, then the schedule
    grad_clip: float = 0.0  # 0: off


@dataclass
class DistConfig:
    backend: str = "single"  # a registered backend (cxrdist.engine.backends.names())
    nproc: int = 1  # local ranks started by `cxrdist train` itself
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0, 1, 2)
    deepspeed_config: str = ""  # a user JSON that overrides the generated one
    timeout_s: int = 300  # collective timeout: a dead rank ends the job


@dataclass
class RunConfig:
    out: str = ""  # run folder
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU only)
    channels_last: bool = False
    log_every: int = 10  # steps between telemetry records
    resume: bool = False
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: epoch ends only)
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    device: str = "auto"  # auto | cpu | cuda
    cudnn_benchmark: bool = True  # cuDNN picks its fastest algorithms for the fixed input size (GPU)
    eval_test: bool = True  # evaluate the test split at the end
    compile: bool = False  # torch.compile the training forward (every backend but dp)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    log_to: str = ""  # also send the TensorBoard scalars to: mlflow, wandb (comma-separated; extras)
    record_samples: bool = False  # RUN/samples/: the keys each rank trained on, per epoch and part, in order


# keys older run folders hold that no longer mean anything (read and dropped, so their configs still load)
RETIRED = {"data.shuffle_buffer"}  # the per-worker shuffle buffer, replaced by the window of data.shuffle


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """The values as they are (credentials in a URL included): for this process and the ranks it starts."""
        return dataclasses.asdict(self)

    def to_record(self) -> dict[str, Any]:
        """The values as written anywhere (config.yaml, summary.json, checkpoints, trackers): a location's
        password or signature replaced by *** (cxrdist.redact)."""
        from cxrdist.redact import redact_tree

        return redact_tree(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        groups = {}
        for f in dataclasses.fields(cls):
            sub = {k: v for k, v in (d.get(f.name) or {}).items() if f"{f.name}.{k}" not in RETIRED}
            known = {g.name for g in dataclasses.fields(f.default_factory)}
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"config group {f.name!r} has unknown keys: {sorted(unknown)}")
            groups[f.name] = f.default_factory(**_typed(f.name, f.default_factory(), sub))
        return cls(**groups)

    def save(self, path: str | Path) -> None:
        from cxrdist.atomic import atomic_write_bytes

        atomic_write_bytes(path, yaml.safe_dump(self.to_record(), sort_keys=False).encode())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A config.yaml, read with ``yaml.safe_load`` (a ``!!python/...`` tag is refused, never built);
        any problem is one ConfigError naming the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: not a readable cxrdist config ({first})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a cxrdist config (a YAML mapping of option groups)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def validate(self) -> None:
        """Checks that need no hardware and no backend (the backends' own: engine.backends.validate_config)."""
        errors = []
        if self.data.image_size < MIN_IMAGE_SIZE:
            errors.append(f"--image-size must be at least {MIN_IMAGE_SIZE} (DenseNet halves it 5 times)")
        if self.run.out and Path(self.run.out).exists() and not Path(self.run.out).is_dir():
            errors.append(f"--out {self.run.out} is a file, not a run folder")
        if self.run.precision not in PRECISIONS:
            errors.append(f"--precision must be one of {', '.join(PRECISIONS)}")
        if not self.model.name:
            errors.append("--model must name a model")  # which names: models.check_model_name (timm's)
        if self.data.shard_cache and self.data.shard_cache_gb <= 0:
            errors.append("--shard-cache-gb must be above 0")
        if self.data.check_sha256 not in SHA256_CHECKS:
            errors.append(f"--check-sha256 must be one of {', '.join(SHA256_CHECKS)}")
        if self.data.format not in FORMATS:
            errors.append(f"--format must be one of {', '.join(FORMATS)}")
        if self.model.in_chans not in (1, 3):
            errors.append("--in-chans must be 1 (grey) or 3")
        if self.dist.nproc < 1:
            errors.append("--nproc must be >= 1")
        if self.optim.batch_size < 1 or self.optim.epochs < 1:
            errors.append("--batch-size and --epochs must be >= 1")
        if not self.run.out:
            errors.append("--out (the run folder) is required")
        errors += check_log_to(self.run.log_to)
        errors += self.number_problems()
        if errors:
            raise ConfigError("; ".join(errors))

    def number_problems(self) -> list[str]:
        """Every numeric option finite and in its range (``--lr nan`` or ``lr: .nan`` in a config would
        otherwise reach torch's "Invalid learning rate" after the ranks started)."""
        import math

        o, d, r = self.optim, self.data, self.run
        rules = [  # (flag, value, lowest, above the highest, whether the lowest itself is allowed)
            ("--lr", o.lr, 0.0, None, False),
            ("--weight-decay", o.weight_decay, 0.0, None, True),
            ("--momentum", o.momentum, 0.0, 1.0, True),
            ("--beta1", o.beta1, 0.0, 1.0, True),
            ("--beta2", o.beta2, 0.0, 1.0, True),
            ("--decay-rate", o.decay_rate, 0.0, None, False),
            ("--warmup-steps", o.warmup_steps, 0, None, True),
            ("--grad-clip", o.grad_clip, 0.0, None, True),
            ("--drop-rate", self.model.drop_rate, 0.0, 1.0, True),
            ("--shard-cache-gb", d.shard_cache_gb, 0.0, None, False),
            ("--shuffle-window", d.shuffle_window, 1, None, True),
            ("--accumulate", o.accumulate, 1, None, True),
            ("--global-batch-size", o.global_batch_size, 0, None, True),
            ("--log-every", r.log_every, 1, None, True),
            ("--checkpoint-every", r.checkpoint_every, 0, None, True),
            ("--max-steps", r.max_steps, 0, None, True),
            ("--timeout", self.dist.timeout_s, 1, None, True),
        ]
        out = []
        for flag, v, lo, hi, lo_ok in rules:
            if not math.isfinite(v) or (v < lo if lo_ok else v <= lo) or (hi is not None and v >= hi):
                where = f"{'>=' if lo_ok else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                out.append(f"{flag} must be a finite number {where}, not {v!r}")
        return out


# --log-to sinks -> (the module they import, the extra that installs it)
LOG_SINKS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def log_sinks(text: str) -> list[str]:
    return [s.strip().lower() for s in text.split(",") if s.strip()]


def check_log_to(text: str) -> list[str]:
    """--log-to names known sinks whose packages are installed (checked before any rank starts)."""
    import importlib.util

    errors = []
    for sink in log_sinks(text):
        if sink not in LOG_SINKS:
            errors.append(f"--log-to takes {', '.join(LOG_SINKS)} (comma-separated), not {sink!r}")
        elif importlib.util.find_spec(LOG_SINKS[sink][0]) is None:
            errors.append(f"--log-to {sink} needs the {sink} package: pip install 'cxrdist[{LOG_SINKS[sink][1]}]'")
    return errors


_KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


def _typed(group: str, defaults: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against the types of the group's defaults: an int where a float goes is taken, a
    number YAML read as text (``1e-4``) is converted; anything else is a ValueError naming the key."""
    out = {}
    for key, value in values.items():
        want = type(getattr(defaults, key))
        if want is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"{group}.{key} must be {_KINDS.get(want, want.__name__)}, not {value!r}")
        out[key] = value
    return out


class ConfigError(UserError, ValueError):
    """An invalid or incompatible combination of options, reported before any worker starts."""


def workers_arg(text: str) -> int:
    """``--workers N`` or ``--workers auto`` (stored as -1)."""
    import argparse

    if text == "auto":
        return -1
    try:
        n = int(text)
    except ValueError:
        n = -2
    if n < -1:
        raise argparse.ArgumentTypeError(f"--workers takes a number >= 0 or 'auto', not {text!r}")
    return n


# --- the `cxrdist train` flags, shared by the CLI, the launchers and the sbatch templates -------------
# (flag, group.field, type or action, help)
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--shards", "data.shards", str, "shard folder (manifest.json + tars); A,B,...: train on several sources at once"),
    (
        "--mix",
        "data.mix",
        str,
        "a CSV of sources to train on at once: a 'shards' column and a 'weight' or a 'samples' (per epoch) column",
    ),
    ("--format", "data.format", str, "input: shards | jpeg (loose files) | dicom (from the source)"),
    ("--source-root", "data.source_root", str, "dataset root for --format jpeg/dicom"),
    ("--image-size", "data.image_size", int, "training resolution in pixels"),
    (
        "--workers",
        "data.workers",
        workers_arg,
        "loader workers per rank, or auto (-1): the rank's CPUs - 1 on GPUs, capped at 12; 1 on CPU ranks",
    ),
    ("--augment", "data.augment", str, "auto | device | worker | none"),
    ("--shuffle-window", "data.shuffle_window", int, "samples shuffled together; the same order on any cluster"),
    (
        "--check-sha256",
        "data.check_sha256",
        str,
        "hash shards against the manifest: first (each split's first read in this process), every read "
        "(~5%% of a loader worker), off",
    ),
    (
        "--shard-cache",
        "data.shard_cache",
        str,
        "node-local folder that keeps shards streamed from a URL after their first read",
    ),
    ("--shard-cache-gb", "data.shard_cache_gb", float, "the shard cache's bound in GB"),
    (
        "--model",
        "model.name",
        str,
        "densenet121 | densenet121d | densenetblur121d (the poster's) | any timm model name",
    ),
    ("--in-chans", "model.in_chans", int, "1 (grey) or 3 input channels"),
    (
        "--pretrained",
        "model.pretrained",
        str,
        "timm (or imagenet): the model's ImageNet weights through timm, from the Hugging Face cache; or a "
        "local .pt/.pth/.bin/.safetensors state dict or cxrdist checkpoint",
    ),
    ("--fuse-demographics", "model.fuse_demographics", "store_true", "concatenate age and sex to the pooled features"),
    ("--drop-rate", "model.drop_rate", float, "dropout before the classifier"),
    ("--epochs", "optim.epochs", int, "epochs"),
    ("--batch-size", "optim.batch_size", int, "images per rank per forward/backward (poster: 64)"),
    (
        "--global-batch-size",
        "optim.global_batch_size",
        int,
        "images per optimizer step over all ranks (0: batch size x ranks x --accumulate); kept on resume",
    ),
    ("--accumulate", "optim.accumulate", int, "micro-steps per optimizer step (gradient accumulation)"),
    ("--lr", "optim.lr", float, "learning rate"),
    ("--opt", "optim.opt", str, "optimizer: any timm name (adamw, sgd = Nesterov momentum, momentum, lamb, ...)"),
    ("--momentum", "optim.momentum", float, "momentum (sgd, momentum, rmsprop, ...)"),
    ("--beta1", "optim.beta1", float, "first beta (adamw, adam, lamb, ...)"),
    ("--beta2", "optim.beta2", float, "second beta"),
    ("--weight-decay", "optim.weight_decay", float, "weight decay (never on biases and norm parameters)"),
    ("--sched", "optim.sched", str, "cosine | step"),
    ("--decay-epochs", "optim.decay_epochs", int, "--sched step: epochs between decays"),
    ("--decay-rate", "optim.decay_rate", float, "--sched step: factor at each decay"),
    ("--warmup-steps", "optim.warmup_steps", int, "linear warm-up steps before the schedule"),
    ("--grad-clip", "optim.grad_clip", float, "clip gradient norm (0: off)"),
    ("--backend", "dist.backend", str, "how the model is distributed"),
    ("--nproc", "dist.nproc", int, "local ranks to start (backends with one process per device)"),
    ("--zero-stage", "dist.zero_stage", int, "DeepSpeed ZeRO stage 0|1|2"),
    ("--deepspeed-config", "dist.deepspeed_config", str, "a DeepSpeed JSON overriding the generated one"),
    ("--timeout", "dist.timeout_s", int, "collective timeout in seconds"),
    ("--out", "run.out", str, "run folder"),
    ("--seed", "run.seed", int, "seed for data order, init and augmentation"),
    ("--precision", "run.precision", str, "fp32 | bf16 | fp16 (GPU only)"),
    ("--channels-last", "run.channels_last", "store_true", "channels_last memory format"),
    ("--log-every", "run.log_every", int, "steps between telemetry records"),
    ("--resume", "run.resume", "store_true", "continue from RUN/checkpoints"),
    ("--checkpoint-every", "run.checkpoint_every", int, "steps between mid-epoch checkpoints (0: epoch ends)"),
    ("--max-steps", "run.max_steps", int, "stop after this many steps (0: no limit)"),
    ("--device", "run.device", str, "auto | cpu | cuda"),
    ("--no-cudnn-benchmark", "run.cudnn_benchmark", "store_false", "keep cuDNN's default algorithm choice"),
    ("--no-test", "run.eval_test", "store_false", "skip the final test-split evaluation"),
    ("--record-samples", "run.record_samples", "store_true", "write the keys each rank trained on to RUN/samples/"),
    ("--compile", "run.compile", "store_true", "torch.compile the training forward (every backend but dp)"),
    ("--compile-mode", "run.compile_mode", str, "torch.compile mode: default | reduce-overhead | max-autotune"),
    ("--log-to", "run.log_to", str, "also send the scalars to mlflow and/or wandb (comma-separated; extras)"),
]


def add_train_args(parser) -> None:
    """Register the train flags on an argparse parser, and ``--config FILE.yaml`` (a config in the schema of
    ``RUN/config.yaml``; the flags given beside it override it). A flag not given leaves no attribute
    (``argparse.SUPPRESS``), so ``config_from_args`` knows which were given; the help shows the defaults."""
    import argparse

    parser.add_argument(
        "--config",
        dest="config_file",
        default=None,
        metavar="FILE.yaml",
        help="start from this config (e.g. RUN/config.yaml to repeat a run); flags given override it",
    )
    defaults = TrainConfig().to_dict()
    groups = {g: parser.add_argument_group(f"{g} options") for g in defaults}  # the config's groups, as timm's
    for flag, dest, kind, help_ in _TRAIN_FLAGS:
        group, name = dest.split(".")
        default = defaults[group][name]
        if isinstance(kind, str):
            groups[group].add_argument(flag, dest=dest, action=kind, default=argparse.SUPPRESS, help=help_)
        else:
            groups[group].add_argument(
                flag,
                dest=dest,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=f"{help_} (default: {default})",
            )


def config_from_args(ns) -> TrainConfig:
    """The config file's values (or the defaults), then every flag that was given. A ``pipe:`` location
    (a shell command) from the file is refused: commands run only when typed on this command line."""
    path = getattr(ns, "config_file", None)
    d = (TrainConfig.load(path) if path else TrainConfig()).to_dict()
    if path and not hasattr(ns, "data.shards"):
        refuse_pipe(d["data"]["shards"], f"{path}: data.shards", "pass --shards 'pipe:...' yourself")
    for _, dest, _, _ in _TRAIN_FLAGS:
        if hasattr(ns, dest):
            group, name = dest.split(".")
            d[group][name] = getattr(ns, dest)
    return TrainConfig.from_dict(d)


def refuse_pipe(shards: str, where: str, how: str) -> None:
    """A ``pipe:CMD`` location read from a file (someone else's config.yaml, a run folder) would run CMD as
    this user: refused, naming the file and key; ``how`` says what the user may type instead."""
    if str(shards).startswith("pipe:"):
        from cxrdist.redact import redact

        raise ConfigError(
            f"{where} is a pipe: location ({redact(shards)}), a shell command: cxrdist runs commands only "
            f"when they are typed on its command line ({how} if you trust it)"
        )


def config_to_argv(cfg: TrainConfig) -> list[str]:
    """The `cxrdist train` flags that reproduce cfg (only those that differ from the defaults)."""
    cur, ref = cfg.to_dict(), TrainConfig().to_dict()
    argv: list[str] = []
    for flag, dest, kind, _ in _TRAIN_FLAGS:
        group, name = dest.split(".")
        value = cur[group][name]
        if value == ref[group][name]:
            continue
        if isinstance(kind, str):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def parse_train_argv(argv: list[str]) -> TrainConfig:
    import argparse

    parser = argparse.ArgumentParser(prog="cxrdist train", allow_abbrev=False)
    add_train_args(parser)
    return config_from_args(parser.parse_args(argv))
