"""deepspeed: DeepSpeed ZeRO 0/1/2, one process per GPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from cxrdist.config import ConfigError
from cxrdist.engine import checkpoint as ckpt
from cxrdist.engine.backends.base import (
    Backend,
    Layout,
    activations_channels_last,
    average_buffers,
    folder_bytes,
    pointed_folder,
    publish,
    register,
    unique_tag,
)
from cxrdist.engine.optim import compile_kwargs, make_optimizer, make_scheduler


@register
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
    description = "DeepSpeed ZeRO stage 0/1/2, one process per GPU"
    layout = Layout(per_gpu=True, multi_node=True, cpu_ranks=True)
    distributed = True
    always_group = True
    options = {"dist.zero_stage": "--zero-stage", "dist.deepspeed_config": "--deepspeed-config"}
    checkpoint_format = "DeepSpeed folders named by 'latest' / 'best' pointer files"

    @classmethod
    def check(cls, cfg, env, device):
        super().check(cfg, env, device)
        if cfg.dist.deepspeed_config:
            user_deepspeed_config(cfg.dist.deepspeed_config, cfg.run.precision)

    def ds_config(self) -> dict:
        c = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": c.optim.batch_size,
            "gradient_accumulation_steps": self.accumulate,  # DeepSpeed's own accumulation boundaries
            "train_batch_size": c.optim.batch_size * self.accumulate * self.env.world_size,
            "zero_optimization": {"stage": c.dist.zero_stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": c.optim.grad_clip,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if c.run.precision == "fp16":
            config["fp16"] = {"enabled": True, "auto_cast": True, "initial_scale_power": 16}
        elif c.run.precision == "bf16":
            # no module is "lower-precision safe": DeepSpeed would otherwise reduce Conv/Linear gradients in
            # bf16 (torch_autocast's default list), where DDP, FSDP and ZeRO-0 reduce in fp32; the backends
            # compared must differ in their distribution, not in their gradient precision. Convolutions
            # still compute in bf16 (autocast).
            config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        if c.dist.deepspeed_config:
            user = user_deepspeed_config(c.dist.deepspeed_config, c.run.precision)
            config.update(
                {
                    k: ({**config[k], **v} if isinstance(v, dict) and isinstance(config.get(k), dict) else v)
                    for k, v in user.items()
                }
            )
        return config

    def setup(self, model, total_steps):
        if self.device.type == "cpu":  # its own probe costs ~1 s a process and warns that it found no GPU;
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a DS_ACCELERATOR the user set wins
        import deepspeed

        module = model.to(self.device)  # contiguous: DeepSpeed's byte-view broadcast needs stride(-1) == 1
        optimizer = make_optimizer(module, self.cfg)
        scheduler = make_scheduler(optimizer, self.cfg, total_steps)
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # DeepSpeed asserts it is set
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=self.ds_args(),
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config(),
            dist_init_required=False,
        )
        self.engine.checkpoint_engine = _weights_only_engine(self.engine.checkpoint_engine)
        if self.cfg.run.channels_last:
            self.channels_last = "activations" if params_share_storage(self.engine.module) else "model"
            if self.channels_last == "model":
                self.engine.module.to(memory_format=torch.channels_last)
            else:
                activations_channels_last(self.engine.module)
        if self.cfg.run.compile:  # DeepSpeed's own: compiles engine.module in place (evaluation runs it too)
            self.engine.compile(compile_kwargs=compile_kwargs(self.cfg))

    def ds_args(self) -> argparse.Namespace:
        """DeepSpeed takes the GPU from ``args.device_rank`` when given, else from LOCAL_RANK: cxrdist's own
        choice (``dist.gpu_index``: one visible GPU per task makes it 0 whatever the local rank is)."""
        return argparse.Namespace(device_rank=self.device.index if self.device.type == "cuda" else 0)

    def reduce_precision(self) -> str:
        if self.cfg.run.precision == "fp16":
            return "fp16"  # DeepSpeed's fp16 optimizer keeps fp16 gradients
        safe = self.ds_config().get("torch_autocast", {}).get("lower_precision_safe_modules", [])
        if self.cfg.run.precision == "bf16" and safe:  # a user's --deepspeed-config asked for it
            return f"bf16 for {', '.join(map(str, safe))}; fp32 otherwise"
        return "fp32"

    def train_step(self, loss_fn, micro=0, of=1):
        """DeepSpeed counts the micro-steps itself (gradient_accumulation_steps): backward scales the loss by
        1/steps and reduces only at the boundary, where step() runs the optimizer and the scheduler."""
        self.engine.train()
        loss = loss_fn(self.engine)  # the engine's forward autocasts (torch_autocast) or is fp16 itself
        self.engine.backward(loss)
        self.engine.step()  # optimizer, zero_grad, scheduler at the accumulation boundary
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
        average_buffers(self.module, self.env.world_size)  # DeepSpeed never syncs BatchNorm buffers

    def lr(self):
        return self.engine.get_lr()[0]

    def save(self, ckpt_dir, tag, state):
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        unique = unique_tag(tag, state)
        with ckpt.writing(ckpt_dir / unique):
            self.engine.save_checkpoint(str(ckpt_dir), tag=unique, client_state=state, save_latest=False)
        publish(ckpt_dir, tag, unique, self.env.is_main)

    def load(self, ckpt_dir, tag="last"):
        folder = pointed_folder(ckpt_dir, tag)
        if folder is None:
            return None
        path, client_state = self.engine.load_checkpoint(str(ckpt_dir), tag=folder.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
        return client_state

    @classmethod
    def saved_bytes(cls, ckpt_dir, tag):
        return folder_bytes(ckpt_dir, tag)

    @classmethod
    def read_weights(cls, path, tag):
        folder = pointed_folder(path, tag)
        if folder is None and (Path(path) / "mp_rank_00_model_states.pt").is_file():
            folder = Path(path)
        if folder is None or not (folder / "mp_rank_00_model_states.pt").is_file():
            return None
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            state = ckpt.load(folder / "mp_rank_00_model_states.pt")
        return state["module"], state

    @classmethod
    def validate(cls, cfg):
        return [] if cfg.dist.zero_stage in (0, 1, 2) else ["--zero-stage must be 0, 1 or 2"]

    @classmethod
    def check_launch(cls, cfg, world_size):
        """A --deepspeed-config whose batch sizes disagree with the launch (nodes x tasks)."""
        if not cfg.dist.deepspeed_config:
            return
        path = Path(cfg.dist.deepspeed_config)
        ds = user_deepspeed_config(str(path), cfg.run.precision)
        micro = ds.get("train_micro_batch_size_per_gpu")
        accum = ds.get("gradient_accumulation_steps", 1)
        total = ds.get("train_batch_size")
        if isinstance(micro, int) and micro != cfg.optim.batch_size:
            raise ConfigError(
                f"--deepspeed-config {path}: train_micro_batch_size_per_gpu={micro} but --batch-size "
                f"{cfg.optim.batch_size}"
            )
        if isinstance(total, int) and isinstance(accum, int) and total != cfg.optim.batch_size * accum * world_size:
            raise ConfigError(
                f"--deepspeed-config {path}: train_batch_size={total}, but {cfg.optim.batch_size} per "
                f"rank x {accum} accumulation x {world_size} ranks (nodes x tasks) = "
                f"{cfg.optim.batch_size * accum * world_size}"
            )


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
        raise ConfigError(
            f"--deepspeed-config {path}: set precision with --precision, not {clash} (the "
            "trainer's precision and DeepSpeed's own casting would fight)"
        )
    ta = user.get("torch_autocast")
    if ta is not None:
        dtype = str(ta.get("dtype", "bfloat16")) if isinstance(ta, dict) else "?"
        if precision != "bf16" or not isinstance(ta, dict) or not ta.get("enabled", True) or "bf" not in dtype:
            raise ConfigError(
                f"--deepspeed-config {path}: its torch_autocast section ({ta}) disagrees with "
                f"--precision {precision}; cxrdist writes that section itself for --precision bf16"
            )
    return user


def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints hold besides tensors (allow-listed for weights_only)."""
    allowed = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    return allowed


def _weights_only_engine(engine):
    """Make DeepSpeed's checkpoint loads use weights_only=True (its default engine unpickles freely)."""

    def load(path, map_location=None):
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return ckpt.load(path, map_location=map_location)  # a damaged file: an error naming it

    engine.load = load
    return engine
