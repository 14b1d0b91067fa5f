"""Where a run's scalars go besides its JSONL records: TensorBoard event files always, MLflow and Weights &
Biases on request (``--log-to mlflow,wandb``). Each sink is one class with the same two calls,
``scalars(values, step, axis)`` and ``close(status)``; the telemetry fans out to them.

TensorBoard writes one event file per rank into ``RUN/tb/`` (per-rank throughput and memory curves). MLflow
and W&B get rank 0's scalars only, in one tracked run per run folder: their ids are kept in
``RUN/tracking.json``, so a preempted and requeued run continues the same tracked run. Servers, projects and
credentials come from each tool's own environment (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``,
``WANDB_PROJECT``, ``WANDB_MODE=offline`` on nodes without network, ``WANDB_API_KEY``), never from cxrdist.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cxrdist.atomic import atomic_write_bytes
from cxrdist.config import log_sinks
from cxrdist.errors import UserError

TB = "tb"
TRACKING = "tracking.json"
EXPERIMENT = "cxrdist"  # the MLflow experiment / W&B project unless the environment names one
# step-record fields drawn per rank (tag "<field>/rank<R>"); loss and lr are the same on every rank: rank 0's
PER_RANK = ("images_per_s", "step_time_s", "data_time_s", "mem_peak_mb", "mem_reserved_mb", "mem_device_used_mb")
EPOCH_KEYS = ("epoch_time_s", "images_per_s", "mem_peak_mb")


def finite(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def record_scalars(r: dict, rank: int) -> tuple[dict[str, float], int, str] | None:
    """What a telemetry record draws: (scalars, x, axis). Step records at the global step, epoch records at
    the epoch number (from 1); other records draw nothing."""
    if r.get("event") == "step" and "global_step" in r:
        values = {f"{k}/rank{rank}": r[k] for k in PER_RANK if k in r}
        if rank == 0:
            values |= {"train/loss": r.get("loss"), "train/lr": r.get("lr")}
        return finite(values), int(r["global_step"]), "global_step"
    if r.get("event") == "epoch":
        return finite({f"epoch/{k}/rank{rank}": r[k] for k in EPOCH_KEYS if k in r}), int(r["epoch"]) + 1, "epoch"
    return None


def flat_params(config: dict) -> dict[str, str]:
    """``{"optim": {"lr": 0.001}}`` -> ``{"optim.lr": "0.001"}`` (what trackers show as a run's parameters)."""
    return {f"{g}.{k}": str(v) for g, sub in config.items() for k, v in sub.items()}


class TensorBoard:
    """torch's SummaryWriter into ``RUN/tb/``, one file per rank in the same folder, so ``tensorboard --logdir
    runs/`` shows each run as one curve set. Without the tensorboard package nothing is written (the JSONL
    records stay the truth)."""

    def __init__(self, folder: Path, rank: int):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(log_dir=str(folder), filename_suffix=f".rank{rank}", flush_secs=30)

    def scalars(self, values: dict[str, float], step: int, axis: str) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow:
    """One MLflow run per run folder (named after it), in ``MLFLOW_EXPERIMENT_NAME`` (default: cxrdist), on
    ``MLFLOW_TRACKING_URI``; the config as its parameters on creation."""

    STATUS = {"completed": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}
    _KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric name

    def __init__(self, run_dir: Path, params: dict[str, str], run_id: str | None):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient()
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            except MlflowException:  # not on this server (a new tracking URI): a new run
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        run = self.client.create_run(experiment, run_name=Path(run_dir).name, tags={"cxrdist.run": str(run_dir)})
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def scalars(self, values: dict[str, float], step: int, axis: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self._KEY.sub("_", k), v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "KILLED"))


class WandB:
    """One W&B run per run folder (its id kept, resumed with ``resume="allow"``), in ``WANDB_PROJECT``
    (default: cxrdist), its files under ``RUN/wandb/``. Step scalars are drawn against ``global_step``, epoch
    scalars against ``epoch`` (W&B's own step must only grow; the two axes would not)."""

    def __init__(self, run_dir: Path, params: dict[str, str], run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            name=Path(run_dir).name,
            id=run_id or secrets.token_hex(6),  # W&B ids: lower-case letters and digits
            resume="allow",
            config=params,
            dir=str(run_dir),
        )
        self.run_id = self.run.id
        self._axes: set[str] = set()

    def scalars(self, values: dict[str, float], step: int, axis: str) -> None:
        for key in values:
            if key not in self._axes:
                self.run.define_metric(key, step_metric=axis)
                self._axes.add(key)
        if values:
            self.run.log({**values, axis: step})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("completed", "preempted") else 1)


TRACKERS = {"mlflow": MLflow, "wandb": WandB}


class Sinks:
    """Every sink of one rank: TensorBoard, and on rank 0 the ``--log-to`` trackers."""

    def __init__(self, run_dir: Path, rank: int, log_to: str = "", config: dict | None = None):
        self.run_dir, self.rank = Path(run_dir), rank
        self.sinks: list[Any] = [TensorBoard(self.run_dir / TB, rank)]
        names = log_sinks(log_to) if rank == 0 else []
        if names:
            ids = self._ids()
            for name in names:
                try:
                    tracker = TRACKERS[name](self.run_dir, flat_params(config or {}), ids.get(name))
                except Exception as e:  # a server that cannot be reached, credentials refused: before step one
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise UserError(f"--log-to {name}: {first[:300]}") from e
                ids[name] = tracker.run_id
                self.sinks.append(tracker)
            atomic_write_bytes(self.run_dir / TRACKING, json.dumps(ids, indent=1).encode())

    def _ids(self) -> dict[str, str]:
        try:
            ids = json.loads((self.run_dir / TRACKING).read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}

    def record(self, r: dict) -> None:
        drawn = record_scalars(r, self.rank)  # already finite
        if drawn and drawn[0]:
            self._send(*drawn)

    def scalars(self, values: dict[str, Any], step: int, axis: str = "epoch") -> None:
        self._send(finite(values), step, axis)

    def _send(self, values: dict[str, float], step: int, axis: str) -> None:
        for sink in self.sinks:
            sink.scalars(values, step, axis)

    def close(self, status: str = "completed") -> None:
        sinks, self.sinks = self.sinks, []  # once: a preempted run closes before the trainer does
        for sink in sinks:
            sink.close(status)
