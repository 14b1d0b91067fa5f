"""dp: torch.nn.DataParallel, one process and every GPU of its node."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cxrdist.config import ConfigError
from cxrdist.engine.backends.base import Layout, TorchBackend, register


@register
class DataParallelBackend(TorchBackend):
    """torch.nn.DataParallel: one process drives every visible GPU; the per-GPU batch is --batch-size."""

    name = "dp"
    description = "torch DataParallel: one process drives every GPU of one node"
    layout = Layout(per_gpu=False, all_gpus=True, min_gpus=2)

    @classmethod
    def validate(cls, cfg):
        if cfg.run.compile:
            return [
                "--compile does not work with --backend dp: DataParallel builds new replicas in every forward, "
                "which torch.compile cannot reuse (pytorch/pytorch#94636); use --backend ddp"
            ]
        return []

    @classmethod
    def check(cls, cfg, env, device):
        super().check(cfg, env, device)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            raise ConfigError(
                f"--backend dp needs >= 2 visible GPUs, found {n}: use --backend single, "
                "or ddp/deepspeed with one process per device"
            )

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
