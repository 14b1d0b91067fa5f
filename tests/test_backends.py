"""The backends behind one interface: same data + same global batch => the same loss curve."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrdist import dist
from cxrdist.config import ConfigError, TrainConfig
from cxrdist.engine.backends import get_backend, names, validate_config
from cxrdist.engine.spawn import free_port

HELPER = Path(__file__).parent / "helpers" / "loss_curve.py"
STEPS, GLOBAL_BATCH = 6, 16


def run_ranks(backend: str, world: int, zero: int, tmp_path) -> list[float]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", **(dist.local_rank_env(rank, world, port) if world > 1 else {}))
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HELPER),
                    backend,
                    str(zero),
                    str(STEPS),
                    str(GLOBAL_BATCH),
                    str(tmp_path / backend),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    line = next(ln for ln in outs[0][0].splitlines() if ln.startswith("LOSSES "))
    return [float(v) for v in line[len("LOSSES ") :].strip("[]").split(",")]


@pytest.mark.slow
def test_ddp_and_deepspeed_follow_the_single_process_loss_curve(tmp_path):
    single = run_ranks("single", 1, 0, tmp_path)
    ddp = run_ranks("ddp", 2, 0, tmp_path)
    zero1 = run_ranks("deepspeed", 2, 1, tmp_path)
    fsdp = run_ranks("fsdp", 2, 0, tmp_path)
    assert single[-1] < single[0], f"the loss should move: {single}"
    # BatchNorm normalises over 8 images per rank instead of 16: close, not bitwise equal
    for name, curve in (("ddp", ddp), ("deepspeed zero-1", zero1), ("fsdp", fsdp)):
        for step, (a, b) in enumerate(zip(single, curve)):
            assert abs(a - b) <= 0.03 * abs(a) + 1e-3, f"{name} step {step}: {b} vs single {a}\n{single}\n{curve}"
    # DDP, ZeRO-1 and FSDP see identical per-rank batches: they agree much more tightly with each other
    for name, curve in (("zero-1", zero1), ("fsdp", fsdp)):
        for a, b in zip(ddp, curve):
            assert abs(a - b) <= 1e-3 * abs(a) + 1e-5, f"ddp {ddp} vs {name} {curve}"


def test_dp_is_refused_without_two_gpus():
    cfg = TrainConfig()
    cfg.dist.backend, cfg.run.out = "dp", "x"
    if torch.cuda.device_count() >= 2:
        pytest.skip("this host has >= 2 GPUs; the refusal is for hosts without")
    with pytest.raises(ConfigError, match="dp needs >= 2 visible GPUs, found"):
        get_backend(cfg, dist.DistEnv(), torch.device("cpu"))


def test_fp16_is_refused_on_cpu():
    cfg = TrainConfig()
    cfg.run.precision, cfg.run.out = "fp16", "x"
    for name in names():
        cfg.dist.backend = name
        with pytest.raises(ConfigError):
            get_backend(cfg, dist.DistEnv(), torch.device("cpu"))


def test_incompatible_options_are_refused_by_the_config():
    cfg = TrainConfig()
    cfg.run.out = "x"
    cfg.dist.zero_stage = 2
    with pytest.raises(ConfigError, match="--zero-stage 2 needs --backend deepspeed"):
        validate_config(cfg)
    cfg.dist.zero_stage, cfg.dist.backend, cfg.dist.nproc = 0, "single", 2
    with pytest.raises(ConfigError, match="runs one process"):
        validate_config(cfg)
    cfg.dist.backend = "horovod"
    with pytest.raises(ConfigError, match="--backend must be one of single, dp, ddp, deepspeed, fsdp, not 'horovod'"):
        validate_config(cfg)


LEAVE = """
import atexit, sys
import torch
from cxrdist import dist
atexit.register(lambda: print("FINALIZED", flush=True))
env = dist.read_env()
dist.init_process_group(env, torch.device("cpu"), timeout_s=60)
print("rank", env.rank)  # unflushed: leave() must flush it
dist.destroy(sync=True)
sys.exit(dist.leave(3) + 1)  # a rank with peers never gets here
"""


def test_a_rank_with_peers_leaves_without_interpreter_teardown_a_single_process_returns():
    """dist.leave skips the finalization where gloo aborts now and then, and loses no output."""
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", LEAVE],
            env=dict(os.environ, **dist.local_rank_env(r, 2, port)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for r, p in enumerate(ranks):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 3 and out.split() == ["rank", str(r)]
    single = subprocess.run([sys.executable, "-c", LEAVE], capture_output=True, text=True, timeout=120)
    assert single.returncode == 4 and "FINALIZED" in single.stdout
