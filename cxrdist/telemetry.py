"""Per-rank JSONL telemetry, rank 0's progress bar, and the scalar sinks (``trackers``: TensorBoard, MLflow, W&B).

``RUN/telemetry/rank{R}.jsonl`` gets a ``step`` record every ``log_every`` steps (throughput over the
window since the last record, step and data-wait time, loss, lr, peak memory) and an ``epoch`` record per
epoch. Files are appended to, so a resumed run continues them. Records are flushed as written, so a killed
rank leaves everything up to its last record.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cxrdist.trackers import Sinks


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last :func:`reset_peak_rss` (Linux VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak: writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0; elsewhere a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def cuda_memory_mb(device) -> dict:
    """One GPU: the caching allocator's peak, the reserved peak, and the memory in use on the device as
    nvidia-smi shows it (contexts and every process on it: one rank per GPU makes it this rank's)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return {
        "mem_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "mem_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        "mem_device_used_mb": (total - free) / 2**20,
    }


class Telemetry:
    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        local_rank: int,
        host: str,
        device: str,
        world_size: int,
        log_every: int,
        memory_fn,
        show_progress: bool = True,
        sync_fn=None,
        log_to: str = "",
        config: dict | None = None,
    ):
        self.rank, self.local_rank, self.host, self.device = rank, local_rank, host, device
        self.world_size, self.log_every, self.memory_fn = world_size, max(1, log_every), memory_fn
        self.sync_fn = sync_fn or (lambda: None)  # waits for queued GPU work before a window is timed
        folder = Path(run_dir) / "telemetry"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}.jsonl", "a", buffering=1)
        self.sinks = Sinks(run_dir, rank, log_to, config)  # TensorBoard; rank 0: the --log-to trackers
        self.progress = None
        if show_progress and rank == 0:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[ips]:>7.1f} img/s (all ranks)"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self.progress.start()
        self._task = None
        self._reset_window()

    def _reset_window(self):
        self._win_images = 0
        self._win_steps = 0
        self._win_step_time = 0.0
        self._win_data_time = 0.0
        self._win_start = time.perf_counter()

    def write(self, record: dict) -> dict:
        record = {
            "time": time.time(),
            "rank": self.rank,
            "local_rank": self.local_rank,
            "host": self.host,
            "device": self.device,
            **record,
        }
        self.file.write(json.dumps(record) + "\n")
        self.sinks.record(record)
        return record

    def start_epoch(
        self, epoch: int, epochs: int, steps: int, done: int = 0, carried: tuple[float, int] = (0.0, 0)
    ) -> None:
        """``carried``: (seconds, images) this epoch already took before a preemption, so a resumed epoch's
        record covers the whole epoch's training time (not the time spent requeued)."""
        self._epoch_start = time.perf_counter() - carried[0]
        self._epoch_images = carried[1]
        self._reset_window()
        if self.progress is not None:
            if self._task is not None:
                self.progress.remove_task(self._task)
            self._task = self.progress.add_task(
                f"epoch {epoch + 1}/{epochs}", total=steps, completed=done, ips=0.0, loss=float("nan")
            )

    def step(
        self,
        *,
        epoch: int,
        step: int,
        images: int,
        step_time: float,
        data_time: float,
        loss_fn,
        lr: float,
        force: bool = False,
        global_step: int | None = None,
    ) -> dict | None:
        """Account one step; every ``log_every`` steps write a record. ``loss_fn`` is only called then
        (it synchronises the device)."""
        self._win_images += images
        self._win_steps += 1
        self._epoch_images += images
        self._win_step_time += step_time
        self._win_data_time += data_time
        if self.progress is not None:
            self.progress.advance(self._task)
        if not force and (step + 1) % self.log_every:
            return None
        self.sync_fn()  # with asynchronous CUDA the window would otherwise end before its last step did
        elapsed = time.perf_counter() - self._win_start
        loss = float(loss_fn())
        ips = self._win_images / max(elapsed, 1e-9)
        record = self.write(
            {
                "event": "step",
                "epoch": epoch,
                "step": step,
                **({} if global_step is None else {"global_step": global_step}),
                "images_per_s": ips,
                "step_time_s": self._win_step_time / max(1, self._win_steps),
                "data_time_s": self._win_data_time / max(1, self._win_steps),
                "loss": loss if math.isfinite(loss) else str(loss),
                "lr": lr,
                **self.memory_fn(),
            }
        )
        if self.progress is not None:
            self.progress.update(self._task, ips=ips * self.world_size, loss=loss)
        self._reset_window()
        return record

    def epoch_progress(self) -> tuple[float, int]:
        return time.perf_counter() - self._epoch_start, self._epoch_images

    def end_epoch(self, epoch: int, extra: dict | None = None, write: bool = True) -> dict:
        """The epoch record (written now, or by the caller once the epoch has been evaluated)."""
        epoch_time = time.perf_counter() - self._epoch_start
        record = {
            "event": "epoch",
            "epoch": epoch,
            "epoch_time_s": epoch_time,
            "images": self._epoch_images,
            "images_per_s": self._epoch_images / max(epoch_time, 1e-9),
            **self.memory_fn(),
            **(extra or {}),
        }
        return self.write(record) if write else record

    def close(self, status: str = "completed") -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.file.close()
        self.sinks.close(status)
