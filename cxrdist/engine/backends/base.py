"""The backend interface, the registry, and what several backends share.

A backend is one self-describing unit (one module under ``engine/backends/``): how the model is wrapped,
who owns the optimizer step and the loss scaling, its precision rules, its process layout (``Layout``:
what the launcher, ``compare.py`` and ``report`` read), the options it owns and its config checks, and its
checkpoint format (``save``/``load`` while training, ``read_weights`` for evaluation and export). Nothing
outside its module names it: every other module asks the registry (``get_backend``, ``names``,
``layout_of``, ``read_weights``).

The trainer calls only what ``Backend`` defines and never asks which backend it holds. All use the same
loss (the trainer's) and the same recipe (``engine.optim``: timm's optimizer, the step-wise schedule,
torch.compile of the training forward).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from cxrdist import dist, telemetry
from cxrdist.atomic import atomic_write_bytes
from cxrdist.config import ConfigError, TrainConfig
from cxrdist.engine import checkpoint as ckpt
from cxrdist.engine.optim import check_recipe, compiled, make_optimizer, make_scheduler
from cxrdist.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Layout:
    """How a backend's processes map onto nodes and GPUs (what the launcher plans from)."""

    per_gpu: bool  # one process per GPU, a process group (else one process per run)
    all_gpus: bool = False  # the one process drives every GPU of its node (dp)
    min_gpus: int = 0  # GPUs per node it needs at least
    multi_node: bool = False
    cpu_ranks: bool = False  # can run K ranks on CPUs (gloo)
    reference: bool = False  # the single-device run that speed-ups are measured against


REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend known by its ``name`` (registration order is the report's order)."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ConfigError(f"--backend must be one of {', '.join(REGISTRY)}, not {name!r}")
    return REGISTRY[name]


def layout_of(name: str) -> Layout:
    return backend_class(name).layout


def validate_config(cfg: TrainConfig) -> None:
    """The hardware-free backend rules: a known name, other backends' options left alone, --nproc."""
    cls = backend_class(cfg.dist.backend)
    errors = []
    defaults = TrainConfig().to_dict()
    current = cfg.to_dict()
    for other in REGISTRY.values():
        if other is cls:
            continue
        for dest, flag in other.options.items():
            group, key = dest.split(".")
            if current[group][key] != defaults[group][key]:
                errors.append(f"{flag} {current[group][key]} needs --backend {other.name}")
    # here, not at the top: the model zoo (timm, torchvision) is ~2.5-4 s of imports that the launchers'
    # layout and usage checks (`launchers/submit.py`'s one-line errors) never need
    from cxrdist.models import check_model_name

    try:
        check_model_name(cfg.model.name)
    except UserError as e:
        errors.append(str(e))
    errors += check_recipe(cfg)
    if not cls.layout.per_gpu and cfg.dist.nproc != 1:
        errors.append(f"--backend {cls.name} runs one process; --nproc must be 1")
    errors += cls.validate(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def get_backend(cfg: TrainConfig, env: dist.DistEnv, device: torch.device, accumulate: int = 1) -> Backend:
    cls = backend_class(cfg.dist.backend)
    cls.check(cfg, env, device)
    return cls(cfg, env, device, accumulate)


def read_weights(path: Path, tag: str = "best", backend: str | None = None) -> tuple[dict, dict]:
    """(model state dict, client state with config and data meta) from a checkpoint in any backend's format:
    a run folder, its checkpoints folder (``best``/``last``), or a checkpoint file/folder itself."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    order = ([REGISTRY[backend]] if backend in REGISTRY else []) + list(REGISTRY.values())
    for cls in dict.fromkeys(order):
        found = cls.read_weights(path, tag)
        if found is not None:
            return found
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    raise UserError(
        f"{path}: no {tag} checkpoint in a format cxrdist writes "
        f"({'; '.join(dict.fromkeys(c.checkpoint_format for c in REGISTRY.values()))})"
    )


class Backend:
    """Common behaviour; subclasses wrap the model and own the optimizer step."""

    name = ""
    description = ""
    layout = Layout(per_gpu=False)
    distributed = False  # one process per device, a process group
    always_group = False  # a process group even for one rank
    options: dict[str, str] = {}  # config fields only this backend reads -> their flag
    checkpoint_format = ""  # one line for error messages

    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, device: torch.device, accumulate: int = 1):
        self.cfg, self.env, self.device = cfg, env, device
        self.accumulate = accumulate  # micro-steps per optimizer step (the run's World)
        self.amp_dtype = AMP_DTYPES.get(cfg.run.precision)
        self.channels_last = "model" if cfg.run.channels_last else "off"  # | "activations": DeepSpeedBackend
        if device.type == "cuda":  # fixed input size: let cuDNN time its algorithms once
            torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark

    # -- checks before any work -------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg: TrainConfig) -> list[str]:
        """Hardware-free problems with this backend's own options (one line each)."""
        return []

    @classmethod
    def check(cls, cfg: TrainConfig, env: dist.DistEnv, device: torch.device) -> None:
        if cfg.run.precision == "fp16" and device.type != "cuda":
            raise ConfigError("--precision fp16 needs a GPU (its GradScaler is CUDA-only); on CPU use bf16 or fp32")
        compiler = os.environ.get("CXX", "g++")
        if cfg.run.compile and device.type == "cpu" and not shutil.which(compiler):
            raise ConfigError(
                f"--compile on the CPU needs a C++ compiler (inductor builds C++ kernels), and {compiler} is not on "
                "PATH: install one (apt-get install g++) or set CXX"
            )
        if env.world_size > 1 and not cls.distributed:
            others = ", ".join(n for n, c in REGISTRY.items() if c.layout.per_gpu)
            raise ConfigError(
                f"--backend {cls.name} runs one process, but {env.world_size} ranks were started "
                f"({env.source}); use --backend {others}"
            )

    @classmethod
    def check_launch(cls, cfg: TrainConfig, world_size: int) -> None:
        """Checks the launcher can make before submitting (it knows nodes x tasks)."""

    @classmethod
    def info(cls) -> dict:
        """What a run's summary.json records about its backend, for readers that do not import the engine."""
        return {
            "name": cls.name,
            "description": cls.description,
            "order": list(REGISTRY).index(cls.name),
            **asdict(cls.layout),
        }

    def devices_per_process(self) -> int:
        return 1

    def reduce_precision(self) -> str:
        """The dtype gradients are averaged over ranks in (the summary records it: backends compared must not
        differ in it). Parameters stay fp32 under autocast, so their gradients are fp32 everywhere unless a
        backend says otherwise; one process reduces nothing."""
        return "fp32" if self.distributed or self.devices_per_process() > 1 else "none (one device)"

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

    def train_step(self, loss_fn: Callable[[nn.Module], torch.Tensor], micro: int = 0, of: int = 1) -> torch.Tensor:
        """Forward and backward of micro-step ``micro`` of ``of``; the optimizer steps after the last one, so
        the gradient is the mean over the global batch (each micro-step's loss counts 1/``of``), and the
        gradients are averaged over the ranks only once, with the last one. Returns the micro-batch's loss."""
        raise NotImplementedError

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (its parameters and buffers as this rank holds them)."""
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        """A module every rank can run forward passes on independently (evaluation batches differ per rank)."""
        return self.module

    def eval_done(self) -> None:
        """The evaluation is over: free what ``eval_model`` held only for it (fsdp: its full replica)."""

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

    def weights_finite(self) -> bool:
        """Every rank learns whether all weights are finite (sharded backends hold only their shards)."""
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in self.module.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard (FSDP)
            bad += (~torch.isfinite(local.detach())).sum()
        if self.env.distributed and tdist.is_initialized():
            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
        return bad.item() == 0

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

    @classmethod
    def read_weights(cls, path: Path, tag: str) -> tuple[dict, dict] | None:
        """(full model state dict, client state) from this backend's checkpoint at ``path`` (a checkpoints
        folder or the checkpoint itself), in one process without a group; None if it is not this format."""
        return None

    @classmethod
    def saved_bytes(cls, ckpt_dir: Path, tag: str) -> int:
        """The size of this backend's ``tag`` checkpoint in ``ckpt_dir`` (0: none yet): the same state, so
        what the next save of it needs."""
        return 0


class TorchBackend(Backend):
    """A torch optimizer, a GradScaler for fp16, ``{tag}.pt`` files written by rank 0 (single, dp, ddp)."""

    checkpoint_format = "{tag}.pt: model, optimizer, scheduler, scaler and trainer state"

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def setup(self, model: nn.Module, total_steps: int) -> None:
        self._module = self.prepare_model(model)
        # the wrapper is compiled (DDP whole: dynamo's DDPOptimizer splits the graph at its gradient buckets,
        # so the all-reduce still overlaps the backward)
        self.wrapped = compiled(self.wrap(self._module), self.cfg)
        self.optimizer = make_optimizer(self._module, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.run.precision == "fp16")

    def train_step(self, loss_fn, micro=0, of=1):
        self.wrapped.train()
        last = micro == of - 1
        if micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        with self.no_sync(last):  # the forward too: DDP prepares its reduction there
            with self.step_autocast():
                loss = loss_fn(self.wrapped)
            self.scaler.scale(loss / of if of > 1 else loss).backward()
        if not last:
            return loss.detach()
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._module.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def no_sync(self, last: bool):
        """Gradients of a micro-step that is not the last are not averaged over ranks (ddp: no_sync)."""
        return contextlib.nullcontext()

    @property
    def module(self):
        return self._module

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def save(self, ckpt_dir, tag, state):
        if self.env.is_main:
            Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
            ckpt.atomic_torch_save(
                {
                    "model": self._module.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    **state,
                },
                Path(ckpt_dir) / f"{tag}.pt",
                keep_previous=tag == "last",  # what a resume falls back to if last.pt is damaged
            )
        dist.barrier()

    def load(self, ckpt_dir, tag="last"):
        path = Path(ckpt_dir) / f"{tag}.pt"
        if self.env.is_main:  # one rank decides, so that all resume from the same file
            ckpt.set_aside_if_damaged(path)
        dist.barrier()
        state = ckpt.load_or_previous(path)
        if state is None:
            return None
        self._module.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.scaler.load_state_dict(state.pop("scaler"))
        return state

    @classmethod
    def saved_bytes(cls, ckpt_dir, tag):
        path = Path(ckpt_dir) / f"{tag}.pt"
        return path.stat().st_size if path.is_file() else 0

    @classmethod
    def read_weights(cls, path, tag):
        path = Path(path)
        if path.is_dir():
            path = path / f"{tag}.pt"
        if not (path.is_file() and path.suffix == ".pt"):
            return None
        state = ckpt.load(path)
        if "model" not in state:
            return None
        return state.pop("model"), state


# --------------------------------------------------------------------------------------------------------
# shared by backends whose checkpoints are folders written by every rank (DeepSpeed, FSDP)
# --------------------------------------------------------------------------------------------------------
def pointer_file(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / ("latest" if tag == "last" else tag)


def unique_tag(tag: str, state: dict) -> str:
    return f"{tag}-step{int(state.get('global_step', 0))}-save{int(state.get('saves', 0))}"


def publish(ckpt_dir: Path, tag: str, unique: str, is_main: bool) -> None:
    """After every rank has written folder ``unique``: point ``tag`` at it atomically, then drop the folders
    of ``tag`` no pointer names. A kill before the pointer moves leaves the previous checkpoint loadable."""
    dist.barrier()
    if is_main:
        atomic_write_bytes(pointer_file(ckpt_dir, tag), unique.encode())
        keep = {
            p.read_text().strip()
            for p in (pointer_file(ckpt_dir, "last"), pointer_file(ckpt_dir, "best"))
            if p.exists()
        }
        for old in Path(ckpt_dir).glob(f"{tag}-step*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def folder_bytes(ckpt_dir: Path, tag: str) -> int:
    """The size of the checkpoint folder a ``tag`` pointer names (0: none yet), for ``saved_bytes``."""
    folder = pointed_folder(ckpt_dir, tag)
    if folder is None or not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def pointed_folder(path: Path, tag: str) -> Path | None:
    """The folder a ``tag`` pointer in ``path`` names (or ``path`` itself when it is such a folder)."""
    pointer = pointer_file(path, tag)
    if Path(path).is_dir() and pointer.is_file():
        return Path(path) / pointer.read_text().strip()
    return None


def average_buffers(module: nn.Module, world_size: int) -> None:
    """Average floating buffers (BatchNorm statistics) over the ranks, for backends that never sync them:
    each rank's running statistics drift on its own data (a resumed run then matches an uninterrupted one
    in the weights, and in the BN statistics only approximately)."""
    if world_size <= 1 or not tdist.is_initialized():
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
            buf.div_(world_size)


def activations_channels_last(module: nn.Module) -> None:
    """Make the first convolution's output channels_last; the layers after it keep their input's format."""
    stem = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    stem.register_forward_hook(lambda mod, inputs, out: out.contiguous(memory_format=torch.channels_last))
