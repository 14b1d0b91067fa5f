"""single, DataParallel, DDP and DeepSpeed behind one interface.

The trainer calls only what ``Backend`` defines — ``setup``, ``train_step``, ``module``, ``lr``,
``sync_buffers``, ``save``, ``load``, ``peak_memory`` — and never asks which backend it holds. Everything
that differs lives here: how the model is wrapped, who owns the optimizer step and the loss scaling,
how checkpoints are laid out on disk, and what each backend refuses before any work starts.

All four use the same loss (the trainer's), AdamW, and warm-up + cosine schedule over the run's steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
from torch import nn

from cxrdist import dist
from cxrdist.atomic import atomic_write_bytes
from cxrdist.config import ConfigError, TrainConfig
from cxrdist.engine import checkpoint as ckpt

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine to zero at the last step."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Backend:
    """Common behaviour; subclasses wrap the model and own the optimizer step."""

    name = ""
    distributed = False  # one process per device, a process group

    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.amp_dtype = AMP_DTYPES.get(cfg.run.precision)

    # -- checks before any work -------------------------------------------------------------------
    @classmethod
    def check(cls, cfg: TrainConfig, env: dist.DistEnv, device: torch.device) -> None:
        if cfg.run.precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a GPU (its GradScaler is CUDA-only); on CPU use bf16 or fp32")
        if env.world_size > 1 and not cls.distributed:
            raise ConfigError(f"--backend {cls.name} runs one process, but {env.world_size} ranks were started "
                              f"({env.source}); use --backend ddp or deepspeed")

    def devices_per_process(self) -> int:
        return 1

    def init_distributed(self) -> None:
        if self.distributed:
            dist.init_process_group(self.env, self.device, self.cfg.dist.timeout_s)

    # -- the step ---------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        fmt = torch.channels_last if self.cfg.run.channels_last else torch.contiguous_format
        return model.to(self.device, memory_format=fmt)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        raise NotImplementedError

    def train_step(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (for evaluation and state dicts)."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------------
    def sync_buffers(self) -> None:
        """Make BatchNorm running statistics identical on every rank before evaluation and checkpoints.

        DDP broadcasts rank 0's buffers at the start of every forward, so rank 0's are the run's own
        (broadcasting them now changes nothing the next step would not): resume stays bit-exact.
        """
        if not (self.env.distributed and tdist.is_initialized()):
            return
        for buf in self.module.buffers():
            tdist.broadcast(buf, src=0)

    def peak_memory(self) -> dict:
        if self.device.type == "cuda":
            return {"mem_peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "mem_reserved_mb": torch.cuda.max_memory_reserved(self.device) / 2**20}
        import resource
        return {"mem_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path, tag: str = "last") -> dict | None:
        raise NotImplementedError


class TorchBackend(Backend):
    """single / dp / ddp: a torch optimizer, a GradScaler for fp16, ``{tag}.pt`` files written by rank 0."""

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def setup(self, model: nn.Module, total_steps: int) -> None:
        self._module = self.prepare_model(model)
        self.wrapped = self.wrap(self._module)
        self.optimizer = make_optimizer(self._module, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, total_steps, self.cfg.optim.warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.run.precision == "fp16")

    def train_step(self, loss_fn):
        self.wrapped.train()
        with self.autocast():
            loss = loss_fn(self.wrapped)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._module.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    @property
    def module(self):
        return self._module

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def save(self, ckpt_dir, tag, state):
        if self.env.is_main:
            Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
            ckpt.atomic_torch_save({
                "model": self._module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), **state,
            }, Path(ckpt_dir) / f"{tag}.pt")
        dist.barrier()

    def load(self, ckpt_dir, tag="last"):
        path = Path(ckpt_dir) / f"{tag}.pt"
        if not path.is_file():
            return None
        state = ckpt.load(path)
        self._module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.scaler.load_state_dict(state.pop("scaler"))
        return state


class SingleBackend(TorchBackend):
    name = "single"


class DataParallelBackend(TorchBackend):
    """torch.nn.DataParallel: one process drives every visible GPU; the per-GPU batch is --batch-size."""

    name = "dp"

    @classmethod
    def check(cls, cfg, env, device):
        super().check(cfg, env, device)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            raise ConfigError(f"--backend dp needs >= 2 visible GPUs, found {n}: use --backend single, "
                              "or ddp/deepspeed with one process per device")

    def devices_per_process(self):
        return torch.cuda.device_count()

    def wrap(self, model):
        return nn.DataParallel(model)


class DDPBackend(TorchBackend):
    """DistributedDataParallel: NCCL on GPUs, gloo on CPU."""

    name = "ddp"
    distributed = True

    def wrap(self, model):
        if not self.env.distributed:
            return model  # one rank: DDP would add nothing but a process group
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)  # rank 0's BN buffers are broadcast at every forward


class DeepSpeedBackend(Backend):
    """DeepSpeed with ZeRO stage 0/1/2; its JSON generated from the same config (a user JSON overrides keys).

    bf16 runs as torch autocast around DeepSpeed's fp32 engine: DeepSpeed's own bf16 mode casts the
    parameters but not the BatchNorm buffers. fp16 (GPU only) uses DeepSpeed's fp16 mode and loss scaler.
    Checkpoints are DeepSpeed's directory format under a unique tag per save; the ``latest``/``best``
    pointer files are replaced atomically only after every rank has written, so a kill mid-save leaves
    the previous tag loadable.
    """

    name = "deepspeed"
    distributed = True

    @classmethod
    def check(cls, cfg, env, device):
        super().check(cfg, env, device)
        if cfg.dist.deepspeed_config:
            user_deepspeed_config(cfg.dist.deepspeed_config)

    def ds_config(self) -> dict:
        c = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": c.optim.batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": c.optim.batch_size * self.env.world_size,
            "zero_optimization": {"stage": c.dist.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": c.optim.grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if c.run.precision == "fp16":
            config["fp16"] = {"enabled": True, "auto_cast": True, "initial_scale_power": 16}
        if c.dist.deepspeed_config:
            config.update(user_deepspeed_config(c.dist.deepspeed_config))
        return config

    def setup(self, model, total_steps):
        import deepspeed

        module = self.prepare_model(model)
        optimizer = make_optimizer(module, self.cfg)
        scheduler = make_scheduler(optimizer, total_steps, self.cfg.optim.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config(),
            dist_init_required=False)
        self.engine.checkpoint_engine = _weights_only_engine(self.engine.checkpoint_engine)

    def train_step(self, loss_fn):
        self.engine.train()
        with self.autocast():
            loss = loss_fn(self.engine)
        self.engine.backward(loss)
        self.engine.step()  # optimizer, zero_grad, scheduler
        return loss.detach()

    def autocast(self):
        if self.cfg.run.precision == "fp16":
            return contextlib.nullcontext()  # DeepSpeed's fp16 engine casts the module itself
        return super().autocast()

    @property
    def module(self):
        return self.engine.module

    def sync_buffers(self):
        """DeepSpeed never syncs BatchNorm buffers, so each rank's running statistics drift on its own
        data: average them (a resumed run therefore matches an uninterrupted one in the weights, and in
        the BN statistics only approximately)."""
        if not (self.env.distributed and tdist.is_initialized()):
            return
        for buf in self.module.buffers():
            if buf.is_floating_point():
                tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
                buf.div_(self.env.world_size)

    def lr(self):
        return self.engine.get_lr()[0]

    def save(self, ckpt_dir, tag, state):
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        unique = f"{tag}-step{int(state.get('global_step', 0))}-save{int(state.get('saves', 0))}"
        self.engine.save_checkpoint(str(ckpt_dir), tag=unique, client_state=state, save_latest=False)
        dist.barrier()
        if self.env.is_main:
            pointer = ckpt_dir / ("latest" if tag == "last" else tag)
            atomic_write_bytes(pointer, unique.encode())
            keep = {(ckpt_dir / p).read_text().strip() for p in ("latest", "best") if (ckpt_dir / p).exists()}
            for old in ckpt_dir.glob(f"{tag}-step*"):
                if old.is_dir() and old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, ckpt_dir, tag="last"):
        pointer = Path(ckpt_dir) / ("latest" if tag == "last" else tag)
        if not pointer.is_file():
            return None
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=pointer.read_text().strip())
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {pointer.read_text().strip()} in {ckpt_dir}")
        return client_state


def user_deepspeed_config(path: str) -> dict:
    """A user's DeepSpeed JSON (keys override the generated config); precision stays the trainer's."""
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--deepspeed-config {path}: {e}") from e
    clash = sorted({"bf16", "fp16", "torch_autocast", "amp"} & set(user))
    if clash:
        raise ConfigError(f"--deepspeed-config {path}: set precision with --precision, not {clash} (the "
                          "trainer's autocast and DeepSpeed's own casting would fight)")
    return user


def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints hold besides tensors (allow-listed for weights_only)."""
    allowed = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    return allowed


def _weights_only_engine(engine):
    """Make DeepSpeed's checkpoint loads use weights_only=True (its default engine unpickles freely)."""
    def load(path, map_location=None):
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    engine.load = load
    return engine


BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (SingleBackend, DataParallelBackend, DDPBackend, DeepSpeedBackend)
}


def get_backend(cfg: TrainConfig, env: dist.DistEnv, device: torch.device) -> Backend:
    cls = BACKENDS[cfg.dist.backend]
    cls.check(cfg, env, device)
    return cls(cfg, env, device)
