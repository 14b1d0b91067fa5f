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

import contextlib
import logging
import os
import signal
import subprocess
import sys
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
from cxrdist.shards.shardset import ShardSet
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
    shards = check_run(cfg, env) if env.rank == 0 else None  # read once here, handed to this rank
    return train(cfg, shards)


def check_run(cfg: TrainConfig, env: dist.DistEnv, same_view: bool = False) -> ShardSet:
    """Options, hardware and data checks that must fail before a rank is started; the shard set they read."""
    cfg.validate()
    validate_config(cfg)
    device = dist.select_device(replace(env, local_rank=0), cfg.run.device, same_view=same_view)
    get_backend(cfg, env, device)
    from cxrdist.engine.inputs import open_shards

    shards = open_shards(cfg)
    try:
        RunLock(cfg.run.out).probe()  # another training writes there now: refused before any rank starts
    except RunInUse as e:
        raise ConfigError(str(e)) from None
    if not cfg.run.resume and RunFolder(cfg.run.out).has_checkpoints():
        raise ConfigError(
            f"{cfg.run.out} already holds checkpoints: pass --resume to continue it, or choose another --out"
        )
    return shards


def train(cfg: TrainConfig, shards: ShardSet | None = None) -> dict:
    """Train on this rank. Reads rank/world/device from the environment (cxrdist.dist); ``shards``: the shard
    set this process has already read (else it reads it, once)."""
    with dump_stacks_on(signal.SIGUSR1):
        return train_rank(cfg, shards)


@contextlib.contextmanager
def dump_stacks_on(signum: int):
    """While training, ``signum`` prints every thread's Python stack to stderr and the rank goes on: the local
    launcher sends it to the ranks still running when one fails (a rank stuck outside any collective never
    errors by itself), and on a cluster ``scancel --signal=USR1 JOB`` asks a hung job where it is."""
    import faulthandler

    try:
        faulthandler.register(signum, all_threads=True)
    except (AttributeError, ValueError, OSError):  # sys.stderr has no file behind it (a caller's redirect)
        yield
        return
    try:
        yield
    finally:
        faulthandler.unregister(signum)


def train_rank(cfg: TrainConfig, shards: ShardSet | None) -> dict:
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
    from cxrdist.engine.inputs import open_shards

    trainer = Trainer(cfg, env, device, backend, shards or open_shards(cfg))
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


def previous_global_batch(run_dir: Path) -> int:
    """The global batch the run folder's last start trained with (its config.yaml records the resolved one;
    0 when there is none, or it predates global batches)."""
    path = RunFolder(run_dir).config_path
    if not path.is_file():
        return 0
    try:
        return TrainConfig.load(path).optim.global_batch_size
    except ConfigError:
        return 0


def geometry_problem(saved: dict | None, now: dict) -> str | None:
    """Why a checkpoint's epoch cannot be continued with this geometry (None: it can). Checkpoints before
    global batches recorded ranks x batch size instead."""
    if not saved:
        return None
    if "global_batch" not in saved and "world_size" in saved:
        saved = {"global_batch": saved["world_size"] * saved["batch_size"], "steps_per_epoch": saved["steps_per_epoch"]}
    if saved.get("global_batch") != now["global_batch"]:
        return (
            f"it trained global batches of {saved.get('global_batch')}, this run makes {now['global_batch']}: "
            "resume with --global-batch-size " + str(saved.get("global_batch"))
        )
    if saved.get("steps_per_epoch") != now["steps_per_epoch"]:
        return (
            f"its epochs held {saved.get('steps_per_epoch')} steps, these shards make {now['steps_per_epoch']}: "
            "the training split changed"
        )
    if saved.get("mix") != now.get("mix"):
        was, now_mix = saved.get("mix") or "of one source", now.get("mix") or "one source"
        return f"it trained on the mix {was}, this run names {now_mix}"
    return None


def by_source(result: dict) -> dict[str, float | None]:
    """A mixed evaluation's mean AUROC per source."""
    return {k: v["auc_mean"] for k, v in (result.get("by_source") or {}).items()}


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
class SampleLog:
    """``--record-samples``: the keys of the training samples this rank consumed, in order, one per line, in
    ``RUN/samples/epoch<E>-rank<R>-part<P>.txt`` (P: the run's restarts, so a resumed part writes its own file
    and nothing is overwritten). Flushed with every step: what a checkpoint counts as trained is in it."""

    def __init__(self, run_dir: Path, epoch: int, rank: int, part: int):
        folder = Path(run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"epoch{epoch:03d}-rank{rank:03d}-part{part:02d}.txt", "a")  # noqa: SIM115

    def add(self, keys: list[str]) -> None:
        self.file.write("".join(f"{k}\n" for k in keys))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def requeue_ended_by_itself(e: subprocess.CalledProcessError) -> bool:
    """Whether submitit's ``scontrol requeue`` died of the SIGTERM that the requeue itself sends the job's
    steps. scontrol runs inside the step it requeues, so under load the kill can arrive before scontrol has
    read slurmctld's reply and exited; the requeue has then been accepted (the kill is its effect), and
    submitit's check_call turning it into an error would write a failed result for a requeued job."""
    return list(e.cmd[:2]) == ["scontrol", "requeue"] and e.returncode == -signal.SIGTERM


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
        if not callable(self.previous):
            return
        try:
            self.previous(self.signum, None)
        except subprocess.CalledProcessError as e:
            if not requeue_ended_by_itself(e):
                raise
            # slurmctld accepted the requeue and is ending this step: exit as submitit would have
            logger.warning("requeued (scontrol requeue was ended by the requeue's own SIGTERM)")
            sys.exit(-1)

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device, backend: Backend, shards: ShardSet):
        from cxrdist.engine.inputs import Loaders, loader_workers, run_world

        self.run_dir = Path(cfg.run.out)
        world = run_world(cfg, env, loader_workers(cfg, env, device), backend.devices_per_process())
        if cfg.run.resume:  # the run's global batch stays what it was, whatever the ranks are now
            world = world.resized(previous_global_batch(self.run_dir) or world.global_batch)
        backend.accumulate = world.accumulate
        cfg = replace(cfg, optim=replace(cfg.optim, global_batch_size=world.global_batch, accumulate=world.accumulate))
        self.cfg, self.env, self.device, self.backend, self.world = cfg, env, device, backend, world
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
        self.loaders = Loaders(cfg, world, device, shards)
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
                "global_batch": world.global_batch,
                "accumulate": world.accumulate,
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
        problem = geometry_problem(loaded.get("geometry"), self.state.geometry)
        if problem:
            raise ConfigError(f"--resume: {self.ckpt_dir}: {problem}")
        self.state.restore(loaded)  # all but the hosts: a requeued job may land on other nodes
        self.state.geometry = self.geometry()
        self.state.restarts += 1
        self.restore_rng(loaded.get("rng", {}))
        self.telemetry.write(
            {
                "event": "resume",
                "epoch": self.state.epoch,
                "step_in_epoch": self.state.step_in_epoch,
                "restarts": self.state.restarts,
            }
        )

    def restore_rng(self, rng) -> None:
        """Each rank continues its own random streams; a rank the interrupted run did not have (a resume on
        more ranks) keeps the streams seeded for it at the start, and says so."""
        if not isinstance(rng, list):
            ckpt.set_rng_state(rng)  # older checkpoints: one state for every rank
        elif self.env.rank < len(rng):
            ckpt.set_rng_state(rng[self.env.rank])
        else:
            logger.warning(
                "rank %d is new to this run (it had %d rank(s)): its random streams start from the seed",
                self.env.rank,
                len(rng),
            )

    def geometry(self) -> dict:
        """What a resume must find unchanged: the global batch, the optimizer steps an epoch holds and, for a
        mix, each source's samples per epoch (ranks, workers and accumulation may change: data.shuffle makes
        the global batches independent of them)."""
        mix = {p.name: p.epoch_samples for p in self.loaders.shards.parts}
        return {"global_batch": self.world.global_batch, "steps_per_epoch": self.steps_per_epoch} | (
            {"mix": mix} if mix else {}
        )

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

    def optimizer_step(self, it, samples: SampleLog | None) -> tuple[torch.Tensor, int, float]:
        """One optimizer step: the rank's ``accumulate`` micro-batches, each trained as it arrives. Returns the
        mean micro-batch loss, the images and the seconds spent waiting for the loader."""
        A, loss, images, waited = self.world.accumulate, None, 0, 0.0
        for a in range(A):
            t0 = time.perf_counter()
            batch = next(it)
            waited += time.perf_counter() - t0
            if samples is not None:
                samples.add(batch["key"])
            micro = self.state.global_step * A + a  # the device augmentation's seed: resumes exactly
            x = self.prepare(batch, train=True, step=micro)
            part = self.backend.train_step(self.loss_fn(x, batch), micro=a, of=A)
            loss = part if loss is None else loss + part
            images += len(batch["key"])
        return loss / A, images, waited

    # -- epochs ------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> str:
        start = self.state.step_in_epoch
        loader = self.loaders.train(epoch, start_step=start)
        samples = (
            SampleLog(self.run_dir, epoch, self.env.rank, self.state.restarts) if self.cfg.run.record_samples else None
        )
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
        try:
            for i in range(start, self.steps_per_epoch):
                loss, images, waited = self.optimizer_step(it, samples)
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
                    images=images,
                    step_time=now - t_end,
                    data_time=waited,
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
        finally:
            if samples is not None:
                samples.close()
        self.state.epoch_loss_sum += loss_sum.item()
        self.state.epoch_steps += steps
        return "done"

    def evaluate(self, split: str) -> dict:
        self.backend.sync_buffers()
        loader = self.loaders.eval(split, keep=split == "val")
        labels = self.loaders.labels
        prepare = lambda b: self.prepare(b, train=False)
        part = predict_loader(self.backend.eval_model(), loader, prepare, self.backend.autocast, len(labels))
        self.backend.eval_done()
        # the test split's means get patient-bootstrap intervals (seconds on rank 0); val's per epoch do not
        reps = metrics.REPLICATES if split == "test" else 0
        sources = tuple(p.name for p in self.loaders.shards.parts)
        return gather_and_score(part, labels, expected=self.loaders.samples(split), replicates=reps, sources=sources)

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
                **({"val_auc_by_source": by_source(val)} if "by_source" in val else {}),
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
            aucs |= {f"val/auc_mean/{k}": v for k, v in by_source(val).items() if v is not None}
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
