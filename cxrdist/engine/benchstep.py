"""`cxrdist bench step`: training images/s per backend and precision, all measured in one run.

Every arm trains the same model on the same global batch of synthetic images for the same steps, through
the real ``Backend.train_step``; the data path is left out (``cxrdist bench loader`` measures that). CPU
arms share the machine's cores: one process with all threads vs N ranks with cores/N threads each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from cxrdist import dist

# frontal images after the poster's preprocessing: what one epoch has to push through
EPOCH_IMAGES = {"chexpert": 212_498, "mimic": 356_225}


def _arms(cpus: int, quick: bool) -> list[dict]:
    devices = torch.cuda.device_count() if torch.cuda.is_available() else cpus
    ranks = 2 if devices >= 2 else 1  # never two ranks on one GPU
    arms = [
        {"name": "single fp32", "backend": "single", "ranks": 1, "precision": "fp32"},
        {"name": f"ddp {ranks} ranks fp32", "backend": "ddp", "ranks": ranks, "precision": "fp32"},
        {"name": f"deepspeed zero-1 {ranks} ranks fp32", "backend": "deepspeed", "ranks": ranks,
         "precision": "fp32", "zero": 1},
        {"name": "single bf16", "backend": "single", "ranks": 1, "precision": "bf16"},
        {"name": "single bf16 channels_last", "backend": "single", "ranks": 1, "precision": "bf16",
         "channels_last": True},
    ]
    if not quick:
        arms.append({"name": "single fp32 channels_last", "backend": "single", "ranks": 1, "precision": "fp32",
                     "channels_last": True})
    return arms


def bench_step(quick: bool = False, model: str = "densenetblur121d", image_size: int = 64,
               global_batch: int = 32, steps: int = 0) -> dict:
    from rich.console import Console
    from rich.table import Table

    cpus = dist.cpu_count()
    steps = steps or (3 if quick else 10)
    arms = _arms(cpus, quick)
    best: dict[str, dict] = {}
    for _ in range(1 if quick else 2):  # interleaved rounds, best of each: other load only slows an arm down
        for arm in arms:
            r = _run_arm(arm, model, image_size, global_batch, steps, cpus)
            if arm["name"] not in best or r["images_per_s"] > best[arm["name"]]["images_per_s"]:
                best[arm["name"]] = r
    results = [{**arm, **best[arm["name"]]} for arm in arms]
    by = {r["name"]: r for r in results}
    single = by["single fp32"]["images_per_s"]
    ddp = next(r for r in results if r["backend"] == "ddp")["images_per_s"]
    ds = next(r for r in results if r["backend"] == "deepspeed")["images_per_s"]
    ratios = {"ddp_vs_single": ddp / single, "deepspeed_zero1_vs_ddp": ds / ddp,
              "bf16_vs_fp32": by["single bf16"]["images_per_s"] / single,
              "bf16_channels_last_vs_fp32": by["single bf16 channels_last"]["images_per_s"] / single}
    projection = {r["name"]: {ds: n / r["images_per_s"] / 60 for ds, n in EPOCH_IMAGES.items()} for r in results}
    result = {"step": {r["name"]: r["images_per_s"] for r in results}, "ratios": ratios, "arms": results,
              "projected_epoch_min": projection,
              "settings": {"model": model, "image_size": image_size, "global_batch": global_batch,
                           "steps": steps, "cpus": cpus, "device": "cuda" if torch.cuda.is_available() else "cpu"}}
    table = Table(title=f"train step, {model} @ {image_size}px, global batch {global_batch}, {cpus} CPUs")
    for col in ("arm", "ranks", "threads/rank", "images/s", "x single fp32", "CheXpert epoch (min)",
                "MIMIC-CXR epoch (min)"):
        table.add_column(col, justify="right" if col != "arm" else "left")
    for r in results:
        p = projection[r["name"]]
        table.add_row(r["name"], str(r["ranks"]), str(r["threads"]), f"{r['images_per_s']:.1f}",
                      f"{r['images_per_s'] / single:.2f}", f"{p['chexpert']:.0f}", f"{p['mimic']:.0f}")
    Console(stderr=True).print(table)
    return result


def _run_arm(arm: dict, model: str, image_size: int, global_batch: int, steps: int, cpus: int) -> dict:
    from cxrdist.engine.spawn import free_port

    n = arm["ranks"]
    threads = max(1, cpus // n)
    port = free_port()
    cmd = [sys.executable, "-m", "cxrdist.engine.benchstep", json.dumps(
        {**arm, "model": model, "image_size": image_size, "batch": global_batch // n, "steps": steps})]
    procs = []
    for rank in range(n):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), CXRDIST_THREADS=str(threads))
        if n > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"bench arm {arm['name']} failed:\n{err[-2000:]}")
    times = [json.loads(o.strip().splitlines()[-1])["seconds"] for o, _ in outs]
    return {"threads": threads, "seconds": max(times), "images_per_s": global_batch * steps / max(times)}


def _worker(spec: dict) -> None:
    """One rank of one arm: warm up, then time ``steps`` optimizer steps."""
    from cxrdist.config import TrainConfig
    from cxrdist.engine.backends import get_backend
    from cxrdist.models import build_model

    env = dist.read_env()
    torch.set_num_threads(int(os.environ.get("CXRDIST_THREADS", "1")))
    cfg = TrainConfig()
    cfg.dist.backend, cfg.dist.zero_stage = spec["backend"], spec.get("zero", 0)
    cfg.run.precision, cfg.run.channels_last = spec["precision"], spec.get("channels_last", False)
    cfg.optim.batch_size, cfg.run.out = spec["batch"], "bench"
    device = dist.select_device(env, "auto")
    backend = get_backend(cfg, env, device)
    backend.init_distributed()
    torch.manual_seed(0)
    backend.setup(build_model(spec["model"], in_chans=1), total_steps=spec["steps"] + 2)
    fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    x = torch.randn(spec["batch"], 1, spec["image_size"], spec["image_size"], device=device).contiguous(memory_format=fmt)
    y = (torch.rand(spec["batch"], 14, device=device) < 0.3).float()

    def loss_fn(model):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)

    for _ in range(2):
        backend.train_step(loss_fn)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        backend.train_step(loss_fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    dist.destroy()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
