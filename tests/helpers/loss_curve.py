"""Run K optimizer steps of one backend on fixed global batches; print the per-step global loss as JSON.

Launched once per rank (RANK/WORLD_SIZE/... in the environment) by tests/test_backends.py. Each rank takes
its contiguous slice of every global batch, so all backends see exactly the same data per step.
"""

import json
import sys

import torch
import torch.distributed as tdist

from cxrdist import dist
from cxrdist.config import TrainConfig
from cxrdist.engine.backends import get_backend
from cxrdist.engine.trainer import masked_bce
from cxrdist.models import build_model

backend_name, zero, steps, global_batch, out = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
)
env = dist.read_env()
torch.set_num_threads(1)
cfg = TrainConfig()
cfg.dist.backend, cfg.dist.zero_stage = backend_name, zero
cfg.optim.batch_size, cfg.optim.lr = global_batch // env.world_size, 1e-3
cfg.run.out = out
backend = get_backend(cfg, env, torch.device("cpu"))
backend.init_distributed()
torch.manual_seed(0)
backend.setup(build_model("cxrtiny", in_chans=1), total_steps=steps)  # the plumbing model: backends are the subject
gen = torch.Generator().manual_seed(1234)
losses = []
for _ in range(steps):
    x = torch.randn(global_batch, 1, 32, 32, generator=gen)
    y = (torch.rand(global_batch, 14, generator=gen) < 0.3).float()
    y[:, 2] = (x[:, 0, :16].mean((1, 2)) > 0).float()  # a learnable label, so the loss moves
    lo = env.rank * cfg.optim.batch_size
    xs, ys = x[lo : lo + cfg.optim.batch_size], y[lo : lo + cfg.optim.batch_size]

    ms = torch.ones_like(ys)
    ms[:, 5] = 0  # a masked-out (u-ignore) label: the trainer's loss, masks included

    def loss_fn(model):
        return masked_bce(model(xs), ys, ms)

    loss = backend.train_step(loss_fn)
    if env.distributed:
        tdist.all_reduce(loss)
        loss /= env.world_size
    losses.append(loss.item())
if env.rank == 0:
    print("LOSSES " + json.dumps(losses), flush=True)
dist.destroy(sync=True)
dist.leave(0)
