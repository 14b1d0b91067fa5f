"""The training recipe every backend shares: the optimizer (timm's), the learning-rate schedule, torch.compile.

Backends call ``make_optimizer``/``make_scheduler`` on the module they train and ``compiled`` on the module
their training forward goes through; ``check_recipe`` is the hardware-free part of ``validate_config``.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from cxrdist.config import OptimConfig, TrainConfig

SCHEDULES = ("cosine", "step")
# torch.compile's modes ("default" is torch's own default: no mode argument)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_recipe(cfg: TrainConfig) -> list[str]:
    """One line per problem with the optimizer, schedule and compile options."""
    from timm.optim import list_optimizers

    o, errors = cfg.optim, []
    known = list_optimizers()
    if o.opt.lower() not in known:
        close = difflib.get_close_matches(o.opt.lower(), known, n=3)
        errors.append(
            f"--opt {o.opt!r} is not a timm optimizer"
            + (f" (closest: {', '.join(close)})" if close else " (timm.optim.list_optimizers() has them all)")
        )
    if o.sched not in SCHEDULES:
        errors.append(f"--sched must be one of {', '.join(SCHEDULES)}, not {o.sched!r}")
    if o.sched == "step" and (o.decay_epochs < 1 or not 0 < o.decay_rate <= 1):
        errors.append("--sched step needs --decay-epochs >= 1 and 0 < --decay-rate <= 1")
    if cfg.run.compile_mode not in COMPILE_MODES:
        errors.append(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, not {cfg.run.compile_mode!r}")
    return errors


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``--opt`` through timm's ``create_optimizer_v2`` (adamw by default; ``sgd`` is SGD with Nesterov
    momentum, ``momentum`` without): weight decay on weight matrices and kernels only, never on biases and
    norm parameters (timm's ``param_groups_weight_decay``); betas where the optimizer has two."""
    from timm.optim import create_optimizer_v2, get_optimizer_info

    o = cfg.optim
    info = get_optimizer_info(o.opt.lower())
    extra = {"betas": (o.beta1, o.beta2)} if info.has_betas and info.num_betas == 2 else {}
    return create_optimizer_v2(
        module, opt=o.opt.lower(), lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, **extra
    )


def lr_factor(step: int, o: OptimConfig, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of ``--lr``: a linear warm-up over
    ``warmup_steps``, then cosine to zero at the last step, or (``step``) times ``decay_rate`` every
    ``decay_epochs`` epochs. ``total_steps`` is steps per epoch x epochs."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.sched == "step":
        epoch = step // max(1, total_steps // o.epochs)
        return o.decay_rate ** (epoch // o.decay_epochs)
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step (the schedule is in steps, so a mid-epoch resume continues it)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.optim, total_steps))


def compile_kwargs(cfg: TrainConfig) -> dict:
    return {} if cfg.run.compile_mode == "default" else {"mode": cfg.run.compile_mode}


def compiled(module: nn.Module, cfg: TrainConfig, **options) -> nn.Module:
    """The module the training forward calls: ``torch.compile(module)`` under ``--compile``, else ``module``.

    The compiled wrapper is used for training steps only; checkpoints and evaluation use the module itself,
    so state-dict keys stay those of the model (no ``_orig_mod.`` prefix) and evaluation's smaller last
    batch and eval-mode BatchNorm do not trigger recompilations.
    """
    return torch.compile(module, **compile_kwargs(cfg), **options) if cfg.run.compile else module


def compile_stats(cfg: TrainConfig) -> dict | None:
    """What torch.compile did in this process (rank 0's, for the summary): the graphs dynamo captured and the
    graph breaks it met (each break is Python between two graphs: what to look at when --compile is slow)."""
    if not cfg.run.compile:
        return None
    from torch._dynamo.utils import counters

    return {
        "mode": cfg.run.compile_mode,
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
