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
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
from torch import nn

from cxrdist import dist, telemetry
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
    always_group = False  # a process group even for one rank

    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.amp_dtype = AMP_DTYPES.get(cfg.run.precision)
        self.channels_last = "model" if cfg.run.channels_last else "off"  # | "activations": DeepSpeedBackend
        if device.type == "cuda":  # fixed input size: let cuDNN time its algorithms once
            torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark

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
            dist.init_process_group(self.env, self.device, self.cfg.dist.timeout_s, always=self.always_group)

    # -- the step ---------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step_autocast(self):
        """The autocast around the training forward (dp and DeepSpeed cast inside their own forward)."""
        return self.autocast()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        fmt = torch.channels_last if self.channels_last == "model" else torch.contiguous_format
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

    def memory_devices(self) -> list[torch.device]:
        """The devices this rank computes on (dp: every visible GPU)."""
        return [self.device]

    def synchronize(self) -> None:
        """Wait for the queued GPU work, so a timed window covers what it launched."""
        if self.device.type == "cuda":
            for d in self.memory_devices():
                torch.cuda.synchronize(d)

    def reset_peak_memory(self) -> None:
        """Start a new peak (every epoch)."""
        if self.device.type == "cuda":
            for d in self.memory_devices():
                torch.cuda.reset_peak_memory_stats(d)
        else:
            telemetry.reset_peak_rss()

    def peak_memory(self) -> dict:
        """Per rank since the last reset: the allocator's peak, the reserved peak, and the device memory in use
        (what nvidia-smi shows, CUDA context included); dp: the largest device, and each under ``mem_devices``."""
        if self.device.type != "cuda":
            return {"mem_peak_mb": telemetry.peak_rss_mb()}
        per = {str(d): telemetry.cuda_memory_mb(d) for d in self.memory_devices()}
        out = {k: max(m[k] for m in per.values()) for k in next(iter(per.values()))}
        return {**out, "mem_devices": per} if len(per) > 1 else out

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
        with self.step_autocast():
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

    def memory_devices(self):
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]

    def step_autocast(self):
        return contextlib.nullcontext()  # AutocastForward casts inside each replica's thread

    def wrap(self, model):
        if self.amp_dtype is None:
            return nn.DataParallel(model)
        # DataParallel's replica threads re-enter autocast with the device's default dtype (fp16 on CUDA),
        # whatever dtype the caller chose: the cast has to happen inside each replica's forward.
        return nn.DataParallel(AutocastForward(model, self.device.type, self.amp_dtype))


class AutocastForward(nn.Module):
    """``module(*args)`` under ``torch.autocast(device_type, dtype)``, inside whichever thread runs it."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


class DDPBackend(TorchBackend):
    """DistributedDataParallel: NCCL on GPUs, gloo on CPU."""

    name = "ddp"
    distributed = True

    def wrap(self, model):
        if not tdist.is_initialized():
            return model  # one rank and no group: DDP would add nothing but a process group
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)  # rank 0's BN buffers are broadcast at every forward


class DeepSpeedBackend(Backend):
    """DeepSpeed with ZeRO stage 0/1/2; its JSON generated from the same config (a user JSON overrides keys).

    bf16 goes through DeepSpeed's own ``torch_autocast`` section: the engine's forward runs under
    ``torch.autocast`` with fp32 master weights and BatchNorm buffers (DeepSpeed's ``bf16`` mode would cast
    those too). An autocast *outside* the engine is not an option: with CUDA autocast enabled outside and no
    ``torch_autocast`` section, the engine turns autocast off inside its forward and the run trains in
    fp32 (``runtime/torch_autocast.py``, ``autocast_if_enabled``). fp16 (GPU only) uses DeepSpeed's fp16
    mode and loss scaler.

    channels_last: DeepSpeed broadcasts the weights as bytes at initialize (needs stride(-1) == 1), so the
    model is converted after ``deepspeed.initialize``, which holds where the optimizer keeps the parameters
    themselves (ZeRO-0). ZeRO-1/2 and the fp16 optimizer make every weight a view into one flat buffer; a
    converted weight would leave it, so there the weights stay contiguous and the activations are made
    channels_last (``channels_last="activations"``: the stem's output is converted once per forward, since
    a one-channel input cannot carry the format, and every later convolution follows its input's format).

    One rank still gets a process group (DeepSpeed's engine asks for one); the GPU is chosen by cxrdist
    (``args.device_rank``), not by DeepSpeed's LOCAL_RANK rule, so one visible GPU per task works.

    Checkpoints are DeepSpeed's directory format under a unique tag per save; the ``latest``/``best``
    pointer files are replaced atomically only after every rank has written, so a kill mid-save leaves
    the previous tag loadable.
    """

    name = "deepspeed"
    distributed = True
    always_group = True

    @classmethod
    def check(cls, cfg, env, device):
        super().check(cfg, env, device)
        if cfg.dist.deepspeed_config:
            user_deepspeed_config(cfg.dist.deepspeed_config, cfg.run.precision)

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
        elif c.run.precision == "bf16":
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if c.dist.deepspeed_config:
            user = user_deepspeed_config(c.dist.deepspeed_config, c.run.precision)
            config.update({k: ({**config[k], **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v)
                           for k, v in user.items()})
        return config

    def setup(self, model, total_steps):
        import argparse

        import deepspeed

        module = model.to(self.device)  # contiguous: DeepSpeed's byte-view broadcast needs stride(-1) == 1
        optimizer = make_optimizer(module, self.cfg)
        scheduler = make_scheduler(optimizer, total_steps, self.cfg.optim.warmup_steps)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # DeepSpeed asserts it is set
        args = argparse.Namespace(device_rank=self.device.index if self.device.type == "cuda" else 0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config(),
            dist_init_required=False)
        self.engine.checkpoint_engine = _weights_only_engine(self.engine.checkpoint_engine)
        if self.cfg.run.channels_last:
            self.channels_last = "activations" if params_share_storage(self.engine.module) else "model"
            if self.channels_last == "model":
                self.engine.module.to(memory_format=torch.channels_last)
            else:
                activations_channels_last(self.engine.module)

    def train_step(self, loss_fn):
        self.engine.train()
        loss = loss_fn(self.engine)  # the engine's forward autocasts (torch_autocast) or is fp16 itself
        self.engine.backward(loss)
        self.engine.step()  # optimizer, zero_grad, scheduler
        return loss.detach()

    def autocast(self):
        """For calls on ``module`` outside the engine (evaluation): the same autocast the engine uses."""
        if self.cfg.run.precision == "fp16":
            return contextlib.nullcontext()  # DeepSpeed's fp16 engine holds an fp16 module
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


def activations_channels_last(module: nn.Module) -> None:
    """Make the first convolution's output channels_last; the layers after it keep their input's format."""
    stem = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    stem.register_forward_hook(lambda mod, inputs, out: out.contiguous(memory_format=torch.channels_last))


def params_share_storage(module: nn.Module) -> bool:
    """True when some parameters are views into one buffer (ZeRO's and the fp16 optimizer's flat groups)."""
    seen = set()
    for p in module.parameters():
        ptr = p.data.untyped_storage().data_ptr()
        if ptr in seen:
            return True
        seen.add(ptr)
    return False


def user_deepspeed_config(path: str, precision: str) -> dict:
    """A user's DeepSpeed JSON (keys override the generated config); precision stays --precision's.

    ``torch_autocast`` is accepted (e.g. for ``lower_precision_safe_modules``) when it agrees with
    --precision bf16; DeepSpeed's own ``bf16``/``fp16``/``amp`` modes are set by --precision alone.
    """
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--deepspeed-config {path}: {e}") from e
    clash = sorted({"bf16", "fp16", "amp"} & set(user))
    if clash:
        raise ConfigError(f"--deepspeed-config {path}: set precision with --precision, not {clash} (the "
                          "trainer's precision and DeepSpeed's own casting would fight)")
    ta = user.get("torch_autocast")
    if ta is not None:
        dtype = str(ta.get("dtype", "bfloat16")) if isinstance(ta, dict) else "?"
        if precision != "bf16" or not isinstance(ta, dict) or not ta.get("enabled", True) or "bf" not in dtype:
            raise ConfigError(f"--deepspeed-config {path}: its torch_autocast section ({ta}) disagrees with "
                              f"--precision {precision}; cxrdist writes that section itself for --precision bf16")
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
