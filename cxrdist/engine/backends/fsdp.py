"""fsdp: FSDP2 (``torch.distributed.fsdp.fully_shard``), one process per GPU, parameters sharded over ranks.

- Sharding: every top-level block of the model (``features.denseblock1``, ``features.transition1``, ...
  for DenseNet; the same depth-2 modules for any timm model) is one FSDP unit, the rest the root's.
- Precision: one policy for every unit (``MixedPrecisionPolicy``: fp32 parameters, all-gathers and gradient
  reduction; fp32 sharded master weights) and torch.autocast for the compute, as DDP and ZeRO do. A policy
  with bf16 parameters would need BatchNorm in fp32 units of its own (CPU kernels refuse bf16 weights
  against fp32 running statistics): 134 units instead of 15 for DenseNet-121, each with its own
  collectives (`cxrdist bench step` measures the two). fp16 is refused: FSDP2's loss scaling is not wired
  up here (use bf16).
- Evaluation: ranks see different numbers of evaluation batches (exact-once), but every FSDP forward is a
  collective; ``eval_model`` is therefore a plain replica with the full weights (gathered once per
  evaluation), run independently on each rank. It lives on the CPU between evaluations (``eval_done``):
  a full unsharded copy on every GPU through training would undo what sharding saves.
- Checkpoints: ``torch.distributed.checkpoint`` folders (each rank writes its shards) named by the same
  atomic ``latest``/``best`` pointers as DeepSpeed's; the trainer's state in ``client.pt`` (rank 0).
  ``read_weights`` loads one into a full state dict in a single process (no group).
- BatchNorm running statistics are not synchronised by FSDP: averaged before evaluation and checkpoints.
- channels_last: the all-gathered weights are contiguous, so the activations carry the format (a hook
  on the stem, as for ZeRO-1/2).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

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
from cxrdist.engine.optim import compiled, make_optimizer, make_scheduler

CLIENT = "client.pt"


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units: depth-2 children with parameters (DenseNet: its blocks)."""
    units = []
    for name, mod in model.named_modules():
        if name.count(".") == 1 and any(True for _ in mod.parameters()):
            units.append(mod)
    return units


@register
class FSDPBackend(Backend):
    name = "fsdp"
    description = "FSDP2 fully_shard: parameters, gradients and optimizer state sharded, one process per GPU"
    layout = Layout(per_gpu=True, multi_node=True, cpu_ranks=True)
    distributed = True
    always_group = True
    checkpoint_format = "torch.distributed.checkpoint folders named by 'latest' / 'best' pointer files"

    @classmethod
    def validate(cls, cfg):
        """Hardware-free, so a sweep (``compare.py --precision fp16``) lists the arm as skipped instead of
        queueing a job that fails on the node."""
        if cfg.run.precision == "fp16":
            return ["--backend fsdp trains in bf16 or fp32 (FSDP2's loss scaling for fp16 is not wired up): use bf16"]
        return []

    def setup(self, model, total_steps):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.cfg.run.channels_last:  # all-gathered weights come back contiguous: the activations carry it
            self.channels_last = "activations"
            activations_channels_last(model)
        model = self.prepare_model(model)
        self._replica = copy.deepcopy(model).cpu()  # the evaluation module, filled and moved on demand
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)  # autocast computes
        for unit in shard_units(model):
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self._module = model
        # after fully_shard, as FSDP2 wants it; static shapes: inductor's dynamic-shape lowering of FSDP2's
        # graphs fails on the CPU ("Cannot convert expression to float"), and training batches never change
        self._train = compiled(model, self.cfg, dynamic=False)
        self.optimizer = make_optimizer(model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, total_steps)

    def train_step(self, loss_fn, micro=0, of=1):
        self._module.train()
        last = micro == of - 1
        if micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self._module.set_requires_gradient_sync(last)  # accumulate unsharded; reduce-scatter with the last
        with self.step_autocast():  # the compute precision: FSDP's units stay fp32 (see the module notes)
            loss = loss_fn(self._train)
        (loss / of if of > 1 else loss).backward()
        if not last:
            return loss.detach()
        if self.cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self._module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    @property
    def module(self):
        return self._module

    def eval_model(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self._module, options=StateDictOptions(full_state_dict=True))
        self._replica.load_state_dict(full)
        return self._replica.to(self.device)

    def eval_done(self):
        self._replica.cpu()

    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def sync_buffers(self):
        average_buffers(self._module, self.env.world_size)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, ckpt_dir, tag, state):
        import torch.distributed.checkpoint as dcp

        ckpt_dir = Path(ckpt_dir)
        unique = unique_tag(tag, state)
        folder = ckpt_dir / unique
        folder.mkdir(parents=True, exist_ok=True)
        with ckpt.writing(folder):
            dcp.save(self._state(), checkpoint_id=str(folder))
        if self.env.is_main:
            ckpt.atomic_torch_save({**state, "scheduler": self.scheduler.state_dict()}, folder / CLIENT)
        publish(ckpt_dir, tag, unique, self.env.is_main)

    def load(self, ckpt_dir, tag="last"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        folder = pointed_folder(ckpt_dir, tag)
        if folder is None:
            return None
        sd = self._state()
        dcp.load(sd, checkpoint_id=str(folder))
        set_state_dict(self._module, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        client = ckpt.load(folder / CLIENT)
        self.scheduler.load_state_dict(client.pop("scheduler"))
        return client

    @classmethod
    def saved_bytes(cls, ckpt_dir, tag):
        return folder_bytes(ckpt_dir, tag)

    @classmethod
    def read_weights(cls, path, tag):
        import torch.distributed.checkpoint as dcp

        folder = pointed_folder(path, tag)
        if folder is None and (Path(path) / CLIENT).is_file():
            folder = Path(path)
        if folder is None or not (folder / CLIENT).is_file():
            return None
        client = ckpt.load(folder / CLIENT)
        from cxrdist.models import model_from_client

        model = model_from_client(client)
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True)
        return sd["model"], client
