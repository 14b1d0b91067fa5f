"""The run folder, typed: the one reader/writer of ``RUN/`` for the trainer, the launcher, ``--nproc`` and
the report (contract: docs/ARCHITECTURE.md, "The run folder").

``RunSummary`` is ``summary.json``; ``TrainState`` is the trainer's progress (what a checkpoint carries
besides weights, as plain containers so checkpoints load with ``weights_only=True``). ``RunFolder`` reads
tolerantly (a missing, partial or older folder reads as far as it goes; what it could not read goes to
``problems``) and writes atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxrdist.atomic import atomic_write_bytes

SUMMARY, CONFIG, TELEMETRY, CHECKPOINTS = "summary.json", "config.yaml", "telemetry", "checkpoints"
EVAL, OPERATING_POINTS = "eval", "operating_points.json"  # `cxrdist eval`'s outputs; what `predict` applies
STATUSES = ("running", "completed", "preempted", "failed")


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)  # one dict per finished epoch (the summary's `epochs`)
    restarts: int = 0
    best_auc: float | None = None
    hosts: list | None = None
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    epoch_carried: list = field(default_factory=lambda: [0.0, 0])  # time and images before a mid-epoch stop
    saves: int = 0
    geometry: dict = field(default_factory=dict)  # what a mid-epoch resume must find unchanged

    def to_dict(self) -> dict:
        return asdict(self)

    def restore(self, saved: dict, keep: tuple[str, ...] = ("hosts",)) -> None:
        """Take a checkpoint's values, except ``keep`` (a requeued job may land on other nodes)."""
        for f in fields(self):
            if f.name in saved and f.name not in keep:
                setattr(self, f.name, saved[f.name])


@dataclass
class RunSummary:
    status: str = "incomplete"  # one of STATUSES, or incomplete: no summary.json (yet)
    backend: str = ""
    backend_info: dict = field(default_factory=dict)
    world_size: int | None = None
    nodes: int | None = None
    hosts: list | None = None
    device: str = ""
    gpus: int | None = None
    device_name: str = ""
    format: str = ""
    precision: str = ""
    labels: str = ""  # the label set's name (chexpert | nih | custom)
    tf32: bool | None = None
    channels_last: str = ""
    config: dict = field(default_factory=dict)
    restarts: int = 0
    global_step: int = 0
    steps_per_epoch: int | None = None
    epochs: list = field(default_factory=list)
    test: dict | None = None
    best_val_auc_mean: float | None = None
    error: str | None = None
    model: dict | None = None  # name, description, params
    pretrained: dict | None = None  # what --pretrained loaded: source, tensors loaded, which stayed random
    exit_codes: list | None = None  # `--nproc`: the ranks' exit codes when one failed
    compile: dict | None = None  # --compile: mode, graphs captured, graph breaks (rank 0)
    provenance: dict | None = None  # versions, hardware per host, the SLURM job, the gradient reduce precision

    @classmethod
    def from_dict(cls, d: dict) -> RunSummary:
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        s.epochs = [e for e in s.epochs if isinstance(e, dict)] if isinstance(s.epochs, list) else []
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None or k in ("test", "best_val_auc_mean")}


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def eval_dir(self, split: str) -> Path:
        """``eval/<split>/``: predictions.csv, metrics.json, report.md and the plots of one split."""
        return self.path / EVAL / split

    def read_metrics(self, split: str = "test") -> dict | None:
        """``eval/<split>/metrics.json`` (None when the split has not been evaluated or it is unreadable)."""
        try:
            data = json.loads((self.eval_dir(split) / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_operating_points(self, points: dict) -> None:
        atomic_write_bytes(self.path / OPERATING_POINTS, json.dumps(points, indent=1).encode())

    def read_operating_points(self) -> dict | None:
        """The thresholds and temperature ``cxrdist eval`` fitted on val (None before the first eval)."""
        try:
            data = json.loads((self.path / OPERATING_POINTS).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def write_summary(self, summary: RunSummary) -> None:
        """Written redacted (an error message may quote a location with its credentials)."""
        from cxrdist.redact import redact_tree

        atomic_write_bytes(self.summary_path, json.dumps(redact_tree(summary.to_dict()), indent=1).encode())

    def read_summary(self, problems: list[str] | None = None) -> RunSummary | None:
        """None when there is no summary.json (the run has not finished, or never started)."""
        problems = [] if problems is None else problems
        try:
            data = json.loads(self.summary_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            problems.append(f"{SUMMARY} is unreadable ({e.__class__.__name__}: {e})")
            return None
        if not isinstance(data, dict):
            problems.append(f"{SUMMARY} is not a JSON object")
            return None
        return RunSummary.from_dict(data)

    def read_config(self, problems: list[str] | None = None) -> dict:
        """config.yaml as a plain dict ({} when missing or unreadable)."""
        import yaml

        problems = [] if problems is None else problems
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except FileNotFoundError:
            return {}
        except (OSError, yaml.YAMLError) as e:
            problems.append(f"{CONFIG} is unreadable ({e.__class__.__name__})")
            return {}

    def telemetry_files(self) -> dict[int, Path]:
        """rank -> telemetry/rank{R}.jsonl, in rank order."""
        out = {}
        for p in (self.path / TELEMETRY).glob("rank*.jsonl"):
            if p.stem[4:].isdigit():
                out[int(p.stem[4:])] = p
        return dict(sorted(out.items()))

    def records(self, rank: int, problems: list[str] | None = None) -> list[dict]:
        """Every record of one rank; lines cut short when a rank was killed are counted in ``problems``."""
        problems = [] if problems is None else problems
        path = self.path / TELEMETRY / f"rank{rank}.jsonl"
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            problems.append(f"{path.name} is unreadable ({e})")
            return []
        records, bad = [], 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
        if bad:
            problems.append(f"{TELEMETRY}/{path.name}: {bad} unreadable line(s) skipped")
        return records

    def last_record(self, rank: int = 0, events: tuple[str, ...] = ("step", "epoch", "resume", "preempted")) -> Any:
        """The newest record of ``events`` from the end of a rank's telemetry (read from its last 8 KiB:
        polled while the run writes)."""
        try:
            with open(self.path / TELEMETRY / f"rank{rank}.jsonl", "rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - 8192))
                lines = fh.read().decode(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") in events:
                return rec
        return None


LOCK = ".lock"


class RunInUse(Exception):
    """Another live process trains into this run folder (the message names it)."""


class RunLock:
    """The writer's claim on a run folder: ``flock`` on ``RUN/.lock``, which holds the holder's host and pid.

    Two trainings with one ``--out`` would overwrite each other's results and interleave their telemetry;
    the second is refused, naming the first. The kernel releases a dead process's flock (on NFS too: Linux
    maps flock to POSIX locks there), so a lock whose holder died is simply taken, and the name it still
    holds is reported as taken over. Rank 0 holds it for the life of the run; a requeued job takes it anew.
    """

    def __init__(self, run: str | Path):
        self.path = Path(run) / LOCK
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (RunInUse when a live process holds it); a note when a dead holder's is taken over."""
        import os
        import socket

        fd, before = self._take()
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        if before and before != me:
            return f"{self.path.parent}: took over the lock of {before}, which no longer holds it (it ended)"
        return None

    def probe(self) -> None:
        """RunInUse if a live process holds the lock now; nothing is kept or written (the check before any
        rank starts)."""
        import os

        if not self.path.exists():  # nobody has claimed the folder (it may not exist yet): nothing made here
            return
        fd, _ = self._take()
        os.close(fd)

    def _take(self) -> tuple[int, str]:
        """The locked descriptor and the name the file held."""
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        before = os.pread(fd, 200, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUse(
                f"{self.path.parent} is in use by {before or 'another process'} ({self.path}): wait for that run "
                "to end, or choose another --out"
            ) from None
        return fd, before

    def release(self) -> None:
        """Clear the holder's name (a clean end leaves nothing to take over) and drop the lock."""
        import os

        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
