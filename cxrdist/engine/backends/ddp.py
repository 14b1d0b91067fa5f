"""ddp: DistributedDataParallel, one process per GPU."""

from __future__ import annotations

import torch.distributed as tdist

from cxrdist.engine.backends.base import Layout, TorchBackend, register


@register
class DDPBackend(TorchBackend):
    """DistributedDataParallel: NCCL on GPUs, gloo on CPU."""

    name = "ddp"
    description = "DistributedDataParallel, one process per GPU (gloo on CPU ranks)"
    layout = Layout(per_gpu=True, multi_node=True, cpu_ranks=True)
    distributed = True

    def wrap(self, model):
        if not tdist.is_initialized():
            return model  # one rank and no group: DDP would add nothing but a process group
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)  # rank 0's BN buffers are broadcast at every forward

    def no_sync(self, last):
        """DDP all-reduces during the backward; accumulation micro-steps before the last skip it."""
        import contextlib

        sync_off = getattr(self.wrapped, "no_sync", None)  # a compiled DDP forwards it to the wrapper
        return contextlib.nullcontext() if last or sync_off is None else sync_off()
