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
from typing import Any

import torch

from cxrdist import dist, log
from cxrdist.labels import NUM_CLASSES  # the poster's head: random targets for timing

# frontal images after the poster's preprocessing: what one epoch has to push through
EPOCH_IMAGES = {"chexpert": 212_498, "mimic": 356_225}


def goal(ratio: float, least: float | None, most: float | None) -> dict[str, Any]:
    """A benchmark goal's record: what is wanted of ``ratio`` and whether it is met."""
    want = f">= {least}" if most is None else f"<= {most}" if least is None else f"{least} .. {most}"
    met = (least is None or ratio >= least) and (most is None or ratio <= most)
    return {"want": want, "met": bool(met)}


def _arms(cpus: int, quick: bool) -> list[dict]:
    devices = torch.cuda.device_count() if torch.cuda.is_available() else cpus
    ranks = 2 if devices >= 2 else 1  # never two ranks on one GPU
    arms = [
        {"name": "single fp32", "backend": "single", "ranks": 1, "precision": "fp32"},
        {"name": f"ddp {ranks} ranks fp32", "backend": "ddp", "ranks": ranks, "precision": "fp32"},
        {
            "name": f"deepspeed zero-1 {ranks} ranks fp32",
            "backend": "deepspeed",
            "ranks": ranks,
            "precision": "fp32",
            "zero": 1,
        },
        {"name": "single bf16", "backend": "single", "ranks": 1, "precision": "bf16"},
        {
            "name": "single bf16 channels_last",
            "backend": "single",
            "ranks": 1,
            "precision": "bf16",
            "channels_last": True,
        },
        # torch.compile: the warm-up steps include the compilation (reported as warm-up s), the timed ones not
        {"name": "single fp32 compiled", "backend": "single", "ranks": 1, "precision": "fp32", "compile": True},
    ]
    if not quick:
        arms += [
            {
                "name": "single fp32 channels_last",
                "backend": "single",
                "ranks": 1,
                "precision": "fp32",
                "channels_last": True,
            },
            {"name": f"ddp {ranks} ranks fp32 compiled", "backend": "ddp", "ranks": ranks, "precision": "fp32"}
            | {"compile": True},
        ]
    return arms


def bench_step(
    quick: bool = False, model: str = "densenetblur121d", image_size: int = 64, global_batch: int = 32, steps: int = 0
) -> dict:
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
    ddp = next(r for r in results if r["backend"] == "ddp" and not r.get("compile"))["images_per_s"]
    ds = next(r for r in results if r["backend"] == "deepspeed")["images_per_s"]
    ratios = {
        "ddp_vs_single": ddp / single,
        "deepspeed_zero1_vs_ddp": ds / ddp,
        "bf16_vs_fp32": by["single bf16"]["images_per_s"] / single,
        "bf16_channels_last_vs_fp32": by["single bf16 channels_last"]["images_per_s"] / single,
        "compile_vs_eager": by["single fp32 compiled"]["images_per_s"] / single,
    }
    compiled_ddp = next((r for r in results if r["backend"] == "ddp" and r.get("compile")), None)
    if compiled_ddp:
        ratios["ddp_compile_vs_eager"] = compiled_ddp["images_per_s"] / ddp
    projection = {r["name"]: {ds: n / r["images_per_s"] / 60 for ds, n in EPOCH_IMAGES.items()} for r in results}
    result = {
        "step": {r["name"]: r["images_per_s"] for r in results},
        "ratios": ratios,
        "arms": results,
        "projected_epoch_min": projection,
        "settings": {
            "model": model,
            "image_size": image_size,
            "global_batch": global_batch,
            "steps": steps,
            "cpus": cpus,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
    }
    table = Table(title=f"train step, {model} @ {image_size}px, global batch {global_batch}, {cpus} CPUs")
    for col in (
        "arm",
        "ranks",
        "threads/rank",
        "images/s",
        "x single fp32",
        "warm-up (s)",
        "CheXpert epoch (min)",
        "MIMIC-CXR epoch (min)",
    ):
        table.add_column(col, justify="right" if col != "arm" else "left")
    for r in results:
        p = projection[r["name"]]
        table.add_row(
            r["name"] + (" (TF32 convs)" if r.get("tf32") else ""),
            str(r["ranks"]),
            str(r["threads"]),
            f"{r['images_per_s']:.1f}",
            f"{r['images_per_s'] / single:.2f}",
            f"{r['warmup_s']:.1f}",
            f"{p['chexpert']:.0f}",
            f"{p['mimic']:.0f}",
        )
    log.console(stderr=True).print(table)
    return result


def _run_arm(arm: dict, model: str, image_size: int, global_batch: int, steps: int, cpus: int) -> dict:
    from cxrdist.engine.spawn import free_port

    n = arm["ranks"]
    threads = max(1, cpus // n)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cxrdist.engine.benchstep",
        json.dumps({**arm, "model": model, "image_size": image_size, "batch": global_batch // n, "steps": steps}),
    ]
    procs = []
    for rank in range(n):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), CXRDIST_THREADS=str(threads))
        if n > 1:
            env.update(dist.local_rank_env(rank, n, port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"bench arm {arm['name']} failed:\n{err[-2000:]}")
    reports = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    seconds = max(r["seconds"] for r in reports)
    return {
        "threads": threads,
        "seconds": seconds,
        "warmup_s": max(r["warmup_s"] for r in reports),
        "images_per_s": global_batch * steps / seconds,
        "tf32": reports[0]["tf32"],
        "memory": {str(i): r["memory"] for i, r in enumerate(reports)},
    }


def _worker(spec: dict) -> None:
    """One rank of one arm, as its own process: ``_measure``, one JSON line, the group torn down."""
    print(json.dumps(_measure(spec)), flush=True)
    dist.destroy(sync=True)


def _many(specs: list[dict]) -> None:
    """Several one-rank arms in one process (one import, one cuDNN autotune cache: `make gpu-check`'s eager
    arms): one JSON line per arm, in order. An arm that fails reports its error and the next one runs; the
    arms that need a group share one (world 1), so DeepSpeed's, which keeps its own comm state, go last."""
    for spec in specs:
        try:
            result = _measure(spec)
        except Exception as e:  # noqa: BLE001 - one arm's failure must not lose the others' numbers
            text = str(e).strip().splitlines()
            result = {"error": f"{type(e).__name__}: {text[0] if text else ''}"[:300]}
        print(json.dumps({"name": spec.get("name", ""), **result}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dist.destroy(sync=True)


def _measure(spec: dict) -> dict:
    """Warm up (and compile), then time ``steps`` optimizer steps (synchronised), and report the rank's
    memory. Spec keys: backend, zero, precision, channels_last, cudnn_benchmark, compile, group_at_world1
    (DDP wrapped even for one rank, to measure its hooks), model, image_size, batch, steps."""
    from cxrdist.config import TrainConfig
    from cxrdist.engine.backends import get_backend
    from cxrdist.models import build_model

    env = dist.read_env()
    torch.set_num_threads(int(os.environ.get("CXRDIST_THREADS", "1")))
    cfg = TrainConfig()
    cfg.dist.backend, cfg.dist.zero_stage = spec["backend"], spec.get("zero", 0)
    cfg.run.precision, cfg.run.channels_last = spec["precision"], spec.get("channels_last", False)
    cfg.run.cudnn_benchmark = spec.get("cudnn_benchmark", True)
    cfg.run.compile = spec.get("compile", False)
    cfg.optim.batch_size, cfg.run.out = spec["batch"], "bench"
    device = dist.select_device(env, "auto")
    backend = get_backend(cfg, env, device)
    if spec.get("group_at_world1"):
        dist.init_process_group(env, device, always=True)
    backend.init_distributed()
    torch.manual_seed(0)
    backend.setup(build_model(spec["model"], in_chans=1), total_steps=spec["steps"] + 2)
    fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    x = torch.randn(spec["batch"], 1, spec["image_size"], spec["image_size"], device=device).contiguous(
        memory_format=fmt
    )
    y = (torch.rand(spec["batch"], NUM_CLASSES, device=device) < 0.3).float()

    def loss_fn(model):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)

    t0 = time.perf_counter()
    for _ in range(spec.get("warmup", 2)):
        backend.train_step(loss_fn)
    backend.synchronize()
    warmup_s = time.perf_counter() - t0
    dist.barrier()
    backend.synchronize()
    backend.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        backend.train_step(loss_fn)
    backend.synchronize()
    seconds = time.perf_counter() - t0
    dist.barrier()
    return {
        "seconds": seconds,
        "warmup_s": warmup_s,
        "memory": backend.peak_memory(),
        "channels_last": backend.channels_last,
        "tf32": dist.tf32_convolutions(device) and spec["precision"] == "fp32",
    }


# --------------------------------------------------------------------------------------------------
# `cxrdist bench trainer`: the whole trainer against a bare loop, same model / precision / batch / threads
# --------------------------------------------------------------------------------------------------
TRAINER_GOAL = 0.85


def native_bf16() -> bool:
    """bf16 runs in hardware here (a GPU since Ampere, or a CPU with AVX-512 BF16 / AMX); else it is emulated."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def bench_trainer(
    quick: bool = False,
    model: str = "densenetblur121d",
    image_size: int = 64,
    batch: int = 32,
    precision: str | None = None,
    steps: int = 0,
    workdir: str | None = None,
) -> dict:
    """Steady-state images/s of `cxrdist train --backend single` (shards, loader workers, telemetry, the real
    step) against a bare forward/backward/AdamW loop on tensors in memory, interleaved, best of each."""
    import tempfile
    from pathlib import Path

    from rich.table import Table

    precision = precision or ("bf16" if native_bf16() else "fp32")
    steps = steps or (10 if quick else 30)
    spec = {
        "model": model,
        "image_size": image_size,
        "batch": batch,
        "precision": precision,
        "channels_last": True,
        "steps": steps,
    }
    best = {"bare": 0.0, "trainer": 0.0}
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-trainer-", dir=workdir) as tmp:
        shards = _bench_shards(Path(tmp), n=batch * (steps + 12) * 10 // 8, size=image_size)
        for r in range(1 if quick else 2):
            best["bare"] = max(best["bare"], _bare_arm(spec))
            best["trainer"] = max(best["trainer"], _trainer_arm(spec, shards, Path(tmp) / f"run{r}"))
    ratio = best["trainer"] / best["bare"]
    result = {
        "trainer": {"bare_loop_ips": round(best["bare"], 1), "trainer_ips": round(best["trainer"], 1)},
        "ratios": {"trainer_vs_bare": round(ratio, 3)},
        "goals": {"trainer_vs_bare": goal(ratio, TRAINER_GOAL, None)},
        "settings": {
            **spec,
            "threads": dist.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "omp_wait_policy": "the trainer's own choice (cxrdist.cpus)",
            "rounds": 1 if quick else 2,
        },
    }
    table = Table(title=f"trainer vs bare loop: {model} {precision} channels_last @ {image_size}px, batch {batch}")
    for col in ("arm", "images/s", "x bare"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    table.add_row("bare loop (tensors in memory)", f"{best['bare']:.1f}", "1.00")
    table.add_row("cxrdist train --backend single (shards)", f"{best['trainer']:.1f}", f"{ratio:.2f}")
    log.console(stderr=True).print(table)
    return result


def _bench_shards(tmp, n: int, size: int) -> str:
    from cxrdist.shards.pack import synth_shards

    _, shards = synth_shards(tmp, n=n, raw_size=size + size // 2, size=size, workers=1, samples_per_shard=200)
    return str(shards)


def _bare_arm(spec: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "cxrdist.engine.benchstep", "bare", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    if out.returncode:
        raise RuntimeError(f"bench trainer: the bare loop failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


def _trainer_arm(spec: dict, shards: str, run_dir) -> float:
    log_every = 5
    argv = [
        sys.executable,
        "-m",
        "cxrdist.cli",
        "train",
        "--shards",
        shards,
        "--out",
        str(run_dir),
        "--backend",
        "single",
        "--model",
        spec["model"],
        "--image-size",
        str(spec["image_size"]),
        "--batch-size",
        str(spec["batch"]),
        "--precision",
        spec["precision"],
        "--channels-last",
        "--epochs",
        "1",
        "--max-steps",
        str(spec["steps"] + log_every),
        "--log-every",
        str(log_every),
        "--no-test",
        "--device",
        "cpu" if not torch.cuda.is_available() else "cuda",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, env=_clean_env())
    if out.returncode:
        raise RuntimeError(f"bench trainer: cxrdist train failed:\n{out.stderr[-2000:]}")
    records = [json.loads(ln) for ln in (run_dir / "telemetry" / "rank0.jsonl").read_text().splitlines()]
    windows = [r for r in records if r.get("event") == "step"][1:]  # the first window holds the warm-up
    images = sum(r["images_per_s"] * r["step_time_s"] * log_every for r in windows)
    seconds = sum(r["step_time_s"] * log_every for r in windows)
    return images / seconds


def _clean_env() -> dict:
    """Both arms choose their threads and OpenMP policy from the machine, as a user's run would."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "CXRDIST_THREADS", "OMP_WAIT_POLICY", "CXRDIST_OMP_WAIT")
    }
    return env


def _bare(spec: dict) -> None:
    """A bare loop: the model, AdamW, the same autocast and memory format, a fixed batch in memory."""
    from cxrdist.models import build_model

    threads = dist.threads_per_rank(dist.read_env())
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = build_model(spec["model"], in_chans=1).to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = torch.randn(spec["batch"], 1, spec["image_size"], spec["image_size"], device=device).contiguous(
        memory_format=fmt
    )
    y = (torch.rand(spec["batch"], NUM_CLASSES, device=device) < 0.3).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["precision"])

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(
        json.dumps({"images_per_s": spec["batch"] * spec["steps"] / (time.perf_counter() - t0), "threads": threads}),
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1] == "bare":
        _bare(json.loads(sys.argv[2]))
    elif sys.argv[1] == "many":
        _many(json.loads(sys.argv[2]))
    else:
        _worker(json.loads(sys.argv[1]))
    dist.leave(0)
