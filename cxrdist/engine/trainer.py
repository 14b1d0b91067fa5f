"""The one training loop, for every backend.

Read top to bottom: ``launch`` (what ``cxrdist train`` calls: checks, then this process or ``--nproc``
local ranks) -> ``train`` (one rank: environment, data, model, backend, resume, epochs, test) ->
``Trainer.run_epoch``. Backends differ only behind ``cxrdist.engine.backends.Backend``.

Preemption: each rank's SIGUSR2 handler only raises a flag; every ``log_every`` steps the ranks agree on
it (and on a non-finite loss) with one tiny all-reduce, so all stop after the same step, write one
consistent checkpoint, and then global rank 0 hands the signal to the handler that was there before
(submitit's: it calls the job's ``checkpoint()`` and requeues). Without submitit the run ends with status
``preempted`` and ``--resume`` continues it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from cxrdist import cpus, dist, log, metrics, provenance
from cxrdist.config import ConfigError, TrainConfig
from cxrdist.engine import checkpoint as ckpt
from cxrdist.engine.backends import Backend, get_backend, validate_config
from cxrdist.engine.evaluation import gather_and_score, predict_loader
from cxrdist.engine.optim import compile_stats
from cxrdist.errors import UserError
from cxrdist.labels import check_same, checkpoint_labels, set_name
from cxrdist.models import build_model, model_info, uses_demographics
from cxrdist.runfolder import RunFolder, RunInUse, RunLock, RunSummary, TrainState
from cxrdist.telemetry import Telemetry

logger = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the masked-in labels (u-ignore masks uncertain ones out).

    Normalised by the element count, not the mask sum: the mean over ranks of the per-rank losses is then
    exactly the loss of the global batch, as one process would compute it.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")
    return (bce * mask).sum() / mask.numel()


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def launch(cfg: TrainConfig) -> dict:
    """`cxrdist train`: every check before any worker starts, then one rank here or --nproc local ranks."""
    from cxrdist.engine.spawn import SPAWNED, spawn_local

    env = dist.read_env()
    if cfg.dist.nproc > 1 and not os.environ.get(SPAWNED):
        if env.world_size > 1:  # e.g. `srun -n 4 cxrdist train --nproc 4`: 16 ranks nobody asked for
            raise ConfigError(
                f"--nproc {cfg.dist.nproc} inside a launch of {env.world_size} ranks ({env.source}): "
                "use one or the other (drop --nproc, or start a single task)"
            )
        # a single process, also a one-task srun step (`srun --pty bash`): start the ranks here
        check_run(cfg, replace(env, world_size=cfg.dist.nproc, local_world_size=cfg.dist.nproc), same_view=True)
        return spawn_local(cfg)
    if env.rank == 0:
        check_run(cfg, env)
    return train(cfg)


def check_run(cfg: TrainConfig, env: dist.DistEnv, same_view: bool = False) -> None:
    """Options, hardware and data checks that must fail before a rank is started."""
    cfg.validate()
    validate_config(cfg)
    device = dist.select_device(replace(env, local_rank=0), cfg.run.device, same_view=same_view)
    get_backend(cfg, env, device)
    from cxrdist.engine.inputs import check_inputs

    check_inputs(cfg)
    try:
        RunLock(cfg.run.out).probe()  # another training writes there now: refused before any rank starts
    except RunInUse as e:
        raise ConfigError(str(e)) from None
    if not cfg.run.resume and RunFolder(cfg.run.out).has_checkpoints():
        raise ConfigError(
            f"{cfg.run.out} already holds checkpoints: pass --resume to continue it, or choose another --out"
        )


def train(cfg: TrainConfig) -> dict:
    """Train on this rank. Reads rank/world/device from the environment (cxrdist.dist)."""
    env = dist.read_env()
    log.setup(env.rank, env.world_size, env.host)
    torch.set_num_threads(dist.threads_per_rank(env))
    device = dist.select_device(env, cfg.run.device)
    logger.info(
        "device %s (%s), %d torch thread(s), OpenMP %s",
        device,
        dist.device_name(device),
        torch.get_num_threads(),
        cpus.wait_policy_record()["omp_wait_policy"],
    )
    backend = get_backend(cfg, env, device)
    backend.init_distributed()
    dist.check_distinct_gpus(device)  # per-task GPU views: only the UUIDs tell whether two ranks share one
    trainer = Trainer(cfg, env, device, backend)
    finished = False
    try:
        summary = trainer.fit()
        # completed: every rank got here together. Not a preempted run: its rank 0 has already torn its
        # group down to hand the signal to submitit, so a barrier would wait for a peer that is gone
        finished = summary.get("status") == "completed"
        return summary
    finally:
        trainer.close()
        dist.destroy(sync=finished)


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGUSR2 (submitit's preemption/timeout signal) raises a flag; the previous handler is kept."""

    def __init__(self, signum: int = signal.SIGUSR2):
        self.signum, self.raised = signum, False
        self.previous = signal.getsignal(signum)
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.raised = True

    def hand_over(self) -> None:
        """Restore and call the previous handler (submitit: checkpoint() + requeue + exit)."""
        signal.signal(self.signum, self.previous)
        if callable(self.previous):
            self.previous(self.signum, None)

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device, backend: Backend):
        from cxrdist.engine.inputs import Loaders

        self.cfg, self.env, self.device, self.backend = cfg, env, device, backend
        self.run_dir = Path(cfg.run.out)
        self.ckpt_dir = RunFolder(self.run_dir).checkpoints
        self.lock = RunLock(self.run_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                took_over = self.lock.acquire()  # held to the end: a second writer is refused
            except RunInUse as e:
                raise ConfigError(str(e)) from None
            if took_over:
                logger.warning("%s", took_over)
            cfg.save(self.run_dir / "config.yaml")
        dist.barrier()
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.loaders = Loaders(cfg, env, device, batch_size=cfg.optim.batch_size * backend.devices_per_process())
        self.steps_per_epoch = self.loaders.steps_per_epoch()
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        model = build_model(
            cfg.model.name,
            in_chans=cfg.model.in_chans,
            pretrained=cfg.model.pretrained or None,
            fuse_demographics=cfg.model.fuse_demographics,
            drop_rate=cfg.model.drop_rate,
            num_classes=len(self.loaders.labels),
        )
        self.pretrained = getattr(model, "pretrained_info", None)
        self.model_info = model_info(cfg.model.name, model)  # before a backend shards the parameters
        # identical initial weights above; from here each rank draws its own dropout masks
        torch.manual_seed(cfg.run.seed + 1 + env.rank)
        backend.setup(model, self.total_steps)
        self.fuse = uses_demographics(backend.module)
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.ctrl_group = (
            dist.control_group(cfg.dist.timeout_s, separate=device.type == "cuda") if env.distributed else None
        )
        self.state = TrainState(geometry=self.geometry())
        self.telemetry = Telemetry(
            self.run_dir,
            rank=env.rank,
            local_rank=env.local_rank,
            host=env.host,
            device=str(device),
            world_size=env.world_size,
            log_every=cfg.run.log_every,
            memory_fn=backend.peak_memory,
            sync_fn=backend.synchronize,
            log_to=cfg.run.log_to,
            config=cfg.to_record(),
        )
        self.telemetry.write(
            {
                "event": "start",
                "device_name": dist.device_name(device),
                "threads": torch.get_num_threads(),
                "workers": self.loaders.workers,
                "channels_last": backend.channels_last,
                "tf32": dist.tf32_convolutions(device),
                "cudnn_benchmark": bool(device.type == "cuda" and torch.backends.cudnn.benchmark),
                **cpus.wait_policy_record(),
            }
        )
        self.stop = StopFlag()

    # -- resume ------------------------------------------------------------------------------------
    def resume(self) -> None:
        if not self.cfg.run.resume:
            return
        loaded = self.backend.load(self.ckpt_dir, "last")
        if loaded is None:
            return  # a first attempt launched with --resume (a requeue-able job): start fresh
        check_same(
            self.loaders.labels,
            checkpoint_labels(loaded),
            what=f"--resume: {self.ckpt_dir}",
            against=f"{self.cfg.data.shards}/manifest.json",
        )
        if loaded.get("geometry", self.state.geometry) != self.state.geometry:
            raise ConfigError(
                f"--resume: {self.ckpt_dir} was written with {loaded['geometry']}, this run has "
                f"{self.state.geometry}; resume with the same ranks and batch size"
            )
        self.state.restore(loaded)  # all but the hosts: a requeued job may land on other nodes
        self.state.restarts += 1
        rng = loaded.get("rng", {})
        ckpt.set_rng_state(rng[self.env.rank] if isinstance(rng, list) else rng)  # per rank (older: one)
        self.telemetry.write(
            {
                "event": "resume",
                "epoch": self.state.epoch,
                "step_in_epoch": self.state.step_in_epoch,
                "restarts": self.state.restarts,
            }
        )

    def geometry(self) -> dict:
        """What a mid-epoch resume must find unchanged to replay the same batches."""
        return {
            "world_size": self.env.world_size,
            "batch_size": self.cfg.optim.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def checkpoint(self, tag: str = "last") -> None:
        self.state.saves += 1
        if self.state.step_in_epoch:  # mid-epoch: what a resumed epoch must add to its time and images
            self.state.epoch_carried = list(self.telemetry.epoch_progress())
        self.backend.sync_buffers()
        if not self.backend.weights_finite():  # never overwrite the last good checkpoint with a diverged model
            raise NonFiniteLoss(
                f"the weights became non-finite by step {self.state.global_step}; stopped. {self.kept()}"
            )
        self.check_room(tag)
        self.backend.save(
            self.ckpt_dir,
            tag,
            {
                **self.state.to_dict(),
                "rng": self.rng_states(),
                "config": self.cfg.to_record(),
                "data": self.loaders.meta(),
            },
        )

    def check_room(self, tag: str) -> None:
        """Rank 0 checks that the file system holds another checkpoint as large as the last one, and every
        rank hears its verdict: none starts writing (and waits in a collective) while another refuses."""
        problem = None
        if self.env.is_main:
            need = max(self.backend.saved_bytes(self.ckpt_dir, t) for t in {"last", tag})
            problem = ckpt.space_problem(self.ckpt_dir / tag, need) if need else None
        if self.env.distributed:
            box = [problem]
            tdist.broadcast_object_list(box, src=0, group=self.ctrl_group)
            problem = box[0]
        if problem:
            raise ckpt.CheckpointError(problem)

    def kept(self) -> str:
        """What a stopped run leaves to resume from, in words (only a checkpoint that is there)."""
        if RunFolder(self.run_dir).has_checkpoints():
            return f"The last good checkpoint is kept in {self.ckpt_dir}"
        return "No checkpoint was written before it (lower --lr, or --checkpoint-every N)"

    def rng_states(self) -> list[dict]:
        """Every rank's generator states (they differ: per-rank dropout), so a resume continues each one."""
        mine = ckpt.rng_state()
        if not self.env.distributed:
            return [mine]
        out = [None] * self.env.world_size
        tdist.all_gather_object(out, mine, group=self.ctrl_group)
        return out

    # -- one step ----------------------------------------------------------------------------------
    def prepare(self, batch, train: bool, step: int = 0):
        x = batch["image"].to(self.device, non_blocking=True)
        if not x.is_floating_point():  # augmentation left to the device (GPU training), or eval resize
            g = torch.Generator()  # 6 numbers per image drawn on the CPU: the same on every device type
            g.manual_seed(hash((self.cfg.run.seed, step, self.env.rank)) & 0x7FFFFFFF)
            x = self.loaders.augment(train)(x, generator=g)
        return x.contiguous(memory_format=self.memory_format)

    def loss_fn(self, x, batch):
        y = batch["labels"].to(self.device, non_blocking=True)
        m = batch["mask"].to(self.device, non_blocking=True)
        age = batch["age"].to(self.device, non_blocking=True)  # every per-step copy asynchronous: a blocking
        sex = batch["sex"].to(self.device, non_blocking=True)  # one syncs the host with the GPU each step

        def compute(model):
            return masked_bce(model(x, age, sex) if self.fuse else model(x), y, m)

        return compute

    def agree(self, *flags: float) -> list[float]:
        """Every rank learns the max of each flag (one tiny all-reduce on the control group)."""
        t = torch.tensor(flags, dtype=torch.float64)
        if self.ctrl_group is not None:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.ctrl_group)
        return t.tolist()

    # -- epochs ------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> str:
        start = self.state.step_in_epoch
        loader = self.loaders.train(epoch, start_batch=start)
        self.backend.reset_peak_memory()
        self.telemetry.start_epoch(
            epoch,
            self.cfg.optim.epochs,
            self.steps_per_epoch,
            done=start,
            carried=tuple(self.state.epoch_carried) if start else (0.0, 0),
        )
        loss_sum = torch.zeros((), device=self.device)
        window = torch.zeros((), device=self.device)
        window_n, steps = 0, 0
        t_end = time.perf_counter()
        it = iter(loader)
        for i in range(start, self.steps_per_epoch):
            batch = next(it)
            t_data = time.perf_counter()
            x = self.prepare(batch, train=True, step=self.state.global_step)
            loss = self.backend.train_step(self.loss_fn(x, batch))
            loss_sum += loss
            window += loss
            window_n += 1
            steps += 1
            self.state.global_step += 1
            self.state.step_in_epoch = i + 1
            now = time.perf_counter()
            last = i + 1 == self.steps_per_epoch or bool(
                self.cfg.run.max_steps and self.state.global_step >= self.cfg.run.max_steps
            )
            record = self.telemetry.step(
                epoch=epoch,
                step=i,
                images=len(batch["key"]),
                step_time=now - t_end,
                data_time=t_data - t_end,
                loss_fn=lambda: (window / window_n).item(),
                lr=self.backend.lr(),
                force=last,
                global_step=self.state.global_step,
            )  # >= 1 record per epoch
            t_end = now
            if record is not None:
                bad = not isinstance(record["loss"], float)
                stop, bad = self.agree(float(self.stop.raised), float(bad))
                window.zero_()
                window_n = 0
                if bad:
                    raise NonFiniteLoss(
                        f"loss became non-finite at epoch {epoch + 1} step {i + 1}; stopped. {self.kept()}"
                    )
                if stop:
                    self.state.epoch_loss_sum += loss_sum.item()
                    self.state.epoch_steps += steps
                    return "preempted"
            if self.cfg.run.checkpoint_every and self.state.global_step % self.cfg.run.checkpoint_every == 0:
                self.checkpoint("last")
            if self.cfg.run.max_steps and self.state.global_step >= self.cfg.run.max_steps:
                break
        self.state.epoch_loss_sum += loss_sum.item()
        self.state.epoch_steps += steps
        return "done"

    def evaluate(self, split: str) -> dict:
        self.backend.sync_buffers()
        loader = self.loaders.eval(split)
        labels = self.loaders.labels
        prepare = lambda b: self.prepare(b, train=False)
        part = predict_loader(self.backend.eval_model(), loader, prepare, self.backend.autocast, len(labels))
        self.backend.eval_done()
        # the test split's means get patient-bootstrap intervals (seconds on rank 0); val's per epoch do not
        reps = metrics.REPLICATES if split == "test" else 0
        return gather_and_score(part, labels, expected=self.loaders.samples(split), replicates=reps)

    def end_epoch(self, epoch: int) -> None:
        train_loss = self.state.epoch_loss_sum / max(1, self.state.epoch_steps)
        record = self.telemetry.end_epoch(epoch, {"train_loss": train_loss}, write=False)
        # the epoch's training is saved before it is evaluated: an evaluation that fails (a bad val shard)
        # costs the evaluation only; a resume replays no step of this epoch and evaluates it again
        self.checkpoint("last")
        self.state.epoch_loss_sum, self.state.epoch_steps = 0.0, 0
        val = self.evaluate("val")
        record = self.telemetry.write(record)
        records = [record]
        if self.env.distributed:
            records = [None] * self.env.world_size
            tdist.all_gather_object(records, record, group=self.ctrl_group)
        self.state.history.append(
            {
                "epoch": epoch + 1,
                "time_s": max(r["epoch_time_s"] for r in records),
                "images_per_s": sum(r["images"] for r in records) / max(r["epoch_time_s"] for r in records),
                "train_loss": sum(r["train_loss"] for r in records) / len(records),
                "val_auc_mean": val["auc_mean"],
                "val_accuracy_mean": val["accuracy_mean"],
                "val_auc": val["auc"],
                **{
                    k: {str(r["rank"]): round(r[k], 1) for r in records}  # GPU: allocator, reserved, device used
                    for k in ("mem_peak_mb", "mem_reserved_mb", "mem_device_used_mb")
                    if k in record
                },
            }
        )
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        if self.env.is_main:  # the evaluation is the same on every rank: drawn once
            aucs = {f"val/auc/{k}": v for k, v in val["auc"].items() if v is not None}
            done = self.state.history[-1]
            self.telemetry.sinks.scalars(
                {"val/auc_mean": val["auc_mean"], "epoch/time_s": done["time_s"], **aucs}, epoch + 1
            )
        self.checkpoint("last")
        auc = val["auc_mean"]
        if auc is not None and (self.state.best_auc is None or auc > self.state.best_auc):
            self.state.best_auc = auc
            self.checkpoint("best")
        self.write_summary("running")

    def fit(self) -> dict:
        self.state.hosts = self.gather_hosts()
        self.provenance = self.gather_provenance()
        self.resume()
        status, test = "completed", None
        try:
            for epoch in range(self.state.epoch, self.cfg.optim.epochs):
                if self.run_epoch(epoch) == "preempted":
                    status = "preempted"
                    break
                self.end_epoch(epoch)
                if self.agree(float(self.stop.raised))[0]:  # the signal came during evaluation/saving
                    status = "preempted"
                    break
                if self.cfg.run.max_steps and self.state.global_step >= self.cfg.run.max_steps:
                    break
            if status == "completed" and self.cfg.run.eval_test:
                test = self.evaluate("test")
        except NonFiniteLoss as e:
            self.write_summary("failed", error=str(e))
            raise UserError(str(e)) from e
        except Exception as e:  # any other failure: the run folder says so, and what it was
            self.write_summary("failed", error=f"{type(e).__name__}: {e}")
            raise
        if status == "preempted":
            self.checkpoint("last")
            self.telemetry.write(
                {"event": "preempted", "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch}
            )
        summary = self.write_summary(status, test=test)
        if status == "preempted" and self.env.is_main:
            self.telemetry.close(status)
            dist.destroy()
            self.stop.hand_over()  # submitit: checkpoint() -> requeue -> exit; elsewhere returns
        return summary

    def gather_hosts(self) -> list[str]:
        hosts = [self.env.host]
        if self.env.distributed:
            hosts = [None] * self.env.world_size
            tdist.all_gather_object(hosts, self.env.host, group=self.ctrl_group)
        return hosts

    def gather_provenance(self) -> dict:
        """What ran (``cxrdist.provenance``): versions and the SLURM job from this rank, hardware from every
        host (one all-gather; a requeued job may run on other nodes, so it is gathered at each start)."""
        mine = (self.env.host, provenance.hardware(self.device.type))
        everyone = [mine]
        if self.env.distributed:
            everyone = [None] * self.env.world_size
            tdist.all_gather_object(everyone, mine, group=self.ctrl_group)
        return {
            "versions": provenance.versions(),
            "hardware": dict(everyone),
            "slurm": provenance.slurm(),
            "reduce_precision": self.backend.reduce_precision(),
        }

    def write_summary(self, status: str, test: dict | None = None, error: str | None = None) -> dict:
        summary = RunSummary(
            status=status,
            backend=self.cfg.dist.backend,
            backend_info=type(self.backend).info(),
            world_size=self.env.world_size,
            nodes=self.env.num_nodes,
            hosts=self.state.hosts,
            device=self.device.type,
            gpus=self.env.world_size * self.backend.devices_per_process() if self.device.type == "cuda" else 0,
            device_name=dist.device_name(self.device),
            format=self.cfg.data.format,
            precision=self.cfg.run.precision,
            labels=set_name(self.loaders.labels),
            tf32=dist.tf32_convolutions(self.device),
            channels_last=self.backend.channels_last,
            config=self.cfg.to_record(),
            restarts=self.state.restarts,
            global_step=self.state.global_step,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.state.history,
            test=test,
            best_val_auc_mean=self.state.best_auc,
            error=error,
            pretrained=self.pretrained,
            model=self.model_info,
            compile=compile_stats(self.cfg),
            provenance=getattr(self, "provenance", None),
        )
        if self.env.is_main:
            RunFolder(self.run_dir).write_summary(summary)
        self.status = status  # what the trackers are told at close
        return summary.to_dict()

    def close(self) -> None:
        self.stop.restore()
        self.telemetry.close(getattr(self, "status", "failed"))
        self.loaders.close()
        self.lock.release()
