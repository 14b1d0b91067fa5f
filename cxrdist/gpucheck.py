"""`make gpu-check`: every GPU path of cxrdist, run for real on one bare GPU node, in minutes.

    python -m cxrdist.gpucheck [--dry] [--out reports/gpu]

Each check prints one ``PASS`` / ``FAIL`` / ``SKIP`` line and lands in ``reports/gpu/gpucheck.json`` and
``gpucheck.md``. The checks: device and driver facts; GPU augmentation (uint8 and 16-bit in, normalised
channels_last out, seeded, equal to the CPU path for the same parameters); the dtype the convolutions run
in for single / ddp / deepspeed x bf16 / fp16 (forward hooks); channels_last after each backend's setup
and a step; DDP over NCCL at world size 1 (group, buffer broadcast, object collectives, the gloo control
group); DeepSpeed ZeRO-0/1/2 with a checkpoint round trip; ``cxrdist train`` end to end (a preemption
mid-epoch and ``--resume``, fp16 with its GradScaler, DeepSpeed then ``cxrdist eval`` on its checkpoint);
synchronised throughput and memory per arm next to the loader's images/s.

``--dry`` runs the same harness on the CPU (gloo, 32-px images, nothing timed): ``make test`` runs it so the
harness cannot rot. On CPU the GPU condition that made DeepSpeed drop bf16 (an outer CUDA autocast) is
simulated, and the old recipe is shown to fall back to fp32 under it while the current one stays bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cxrdist import dist
from cxrdist.config import TrainConfig
from cxrdist.labels import NUM_CLASSES  # the poster's head: random targets for the checks

GOAL_IPS = 1600  # densenetblur121d, 224 px, bf16 + channels_last, one H100/H200 (timm: 789 on an RTX 3090)
MODEL = "densenetblur121d"


@dataclass
class Ctx:
    dry: bool
    device: torch.device
    work: Path
    size: int  # training resolution
    packed: int  # shard resolution
    batch: int
    images: int  # synthetic dataset size
    shards: Path | None = None
    results: dict = field(default_factory=dict)
    deadline: float = float("inf")  # time.monotonic() when --budget-s is spent

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def make_ctx(dry: bool, work: Path) -> Ctx:
    device = torch.device("cpu") if dry or not torch.cuda.is_available() else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return Ctx(dry, device, work, size=224, packed=256, batch=64, images=1200)
    return Ctx(dry, device, work, size=32, packed=40, batch=8, images=96)  # ~9 steps an epoch: plumbing only


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
def train_cfg(ctx: Ctx, backend: str, precision: str, **kw) -> TrainConfig:
    cfg = TrainConfig()
    cfg.dist.backend, cfg.run.precision, cfg.run.out = backend, precision, str(ctx.work / "unused")
    cfg.optim.batch_size = ctx.batch
    cfg.run.channels_last = kw.pop("channels_last", False)
    cfg.dist.zero_stage = kw.pop("zero", 0)
    assert not kw, kw
    return cfg


def ensure_group(ctx: Ctx) -> None:
    """One process group for the in-process checks: NCCL on the GPU, gloo in the dry run (world 1)."""
    dist.init_process_group(dist.read_env(), ctx.device, timeout_s=120, always=True)


def conv_output_dtypes(module: nn.Module, run: Callable[[], object]) -> dict:
    """The dtypes and memory formats of every Conv2d's output while ``run()`` runs (forward hooks)."""
    seen = {"dtypes": set(), "channels_last": set()}

    def hook(mod, inputs, output):
        seen["dtypes"].add(str(output.dtype).replace("torch.", ""))
        seen["channels_last"].add(bool(output.is_contiguous(memory_format=torch.channels_last)))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {k: sorted(v) for k, v in seen.items()}


@contextlib.contextmanager
def simulated_cuda_autocast(on: bool):
    """What a GPU run looks like to DeepSpeed: CUDA autocast enabled around the engine (no GPU needed)."""
    prev = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", on or prev)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", prev)


def tiny_step(backend, ctx: Ctx, size: int | None = None):
    """One real ``train_step`` on a random batch in the backend's input format."""
    s, n = size or ctx.size, arm_batch(ctx)
    fmt = torch.channels_last if backend.cfg.run.channels_last else torch.contiguous_format
    x = torch.randn(n, 1, s, s, device=ctx.device).contiguous(memory_format=fmt)
    y = (torch.rand(n, NUM_CLASSES, device=ctx.device) < 0.3).float()
    return backend.train_step(lambda m: nn.functional.binary_cross_entropy_with_logits(m(x).float(), y))


def build_backend(ctx: Ctx, cfg: TrainConfig, cls=None):
    from cxrdist.engine.backends import get_backend
    from cxrdist.models import build_model

    env = dist.read_env()
    backend = cls(cfg, env, ctx.device) if cls else get_backend(cfg, env, ctx.device)
    torch.manual_seed(0)
    backend.setup(build_model(MODEL, in_chans=1), total_steps=100)
    return backend


def legacy_deepspeed():
    """The recipe cxrdist used before: an outer torch.autocast, no ``torch_autocast`` section."""
    from cxrdist.engine.backends import Backend
    from cxrdist.engine.backends.deepspeed import DeepSpeedBackend

    class Legacy(DeepSpeedBackend):
        def ds_config(self):
            c = super().ds_config()
            c.pop("torch_autocast", None)
            return c

        def train_step(self, loss_fn):
            with Backend.autocast(self):
                return super().train_step(loss_fn)

    return Legacy


RANK_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NUM_NODES",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def child_env(**extra: str) -> dict:
    """This process's environment without the rank variables its own process group exported."""
    return {**{k: v for k, v in os.environ.items() if k not in RANK_VARS}, **extra}


def cli(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cxrdist.cli", *argv], capture_output=True, text=True, timeout=timeout, env=child_env()
    )


def need(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise AssertionError(f"{what} exited {proc.returncode}:\n{tail}")


# --------------------------------------------------------------------------------------------------------
# the checks: each returns (status, one-line summary, details)
# --------------------------------------------------------------------------------------------------------
def check_device(ctx: Ctx):
    from cxrdist import provenance

    facts = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "python": sys.version.split()[0],
        "cpus": dist.cpu_count(),
        "device": str(ctx.device),
        "device_name": dist.device_name(ctx.device),
        "versions": provenance.versions(),  # timm, DeepSpeed, NCCL, cuDNN, cxrdist and its commit
    }
    if ctx.gpu:
        props = torch.cuda.get_device_properties(ctx.device)
        facts.update(
            capability=f"{props.major}.{props.minor}",
            memory_gb=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            driver=dist.driver_version(),
            cudnn=torch.backends.cudnn.version(),
            bf16=torch.cuda.is_bf16_supported(),
            tf32_convolutions=dist.tf32_convolutions(ctx.device),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        return (
            "PASS",
            f"{facts['device_name']} sm_{props.major}{props.minor}, driver {facts['driver']}, "
            f"torch {torch.__version__} (CUDA {torch.version.cuda})",
            facts,
        )
    if not ctx.dry:
        return "FAIL", f"no usable GPU: {dist.cuda_unavailable_reason()}", facts
    return "PASS", f"dry run on {facts['device_name']} ({facts['cpus']} CPUs), torch {torch.__version__}", facts


def check_augmentation(ctx: Ctx):
    from cxrdist.data.transforms import Augment

    aug = Augment(ctx.size, train=True, in_chans=3, channels_last=True)
    out = {}
    for name, dtype, top in (("uint8", torch.uint8, 256), ("16-bit", torch.int32, 65536)):
        raw = torch.randint(0, top, (ctx.batch, 1, ctx.packed, ctx.packed), dtype=dtype)
        params = aug.draw(ctx.batch, torch.Generator().manual_seed(1))
        on_dev = aug(raw.to(ctx.device), params=params)
        again = aug(raw.to(ctx.device), generator=torch.Generator().manual_seed(1))
        on_cpu = aug(raw, params=params)
        assert on_dev.shape == (ctx.batch, 3, ctx.size, ctx.size) and on_dev.dtype == torch.float32, on_dev.shape
        assert on_dev.is_contiguous(memory_format=torch.channels_last), f"{name}: output not channels_last"
        assert torch.equal(on_dev, again), f"{name}: the same seed gave a different batch"
        diff = (on_dev.cpu() - on_cpu).abs().max().item()
        assert diff < 1e-3, f"{name}: device and CPU paths differ by {diff} for the same parameters"
        out[name] = {
            "max_abs_diff_vs_cpu": diff,
            "mean": round(on_dev.mean().item(), 3),
            "std": round(on_dev.std().item(), 3),
        }
    return (
        "PASS",
        f"uint8 + 16-bit -> float channels_last {ctx.size} px, seeded, CPU path equal within "
        f"{max(v['max_abs_diff_vs_cpu'] for v in out.values()):.1e}",
        out,
    )


def check_conv_dtypes(ctx: Ctx):
    ensure_group(ctx)
    from cxrdist.config import ConfigError
    from cxrdist.engine.backends import layout_of, names

    table, bad = {}, []
    for backend in (n for n in names() if not layout_of(n).all_gpus):  # dp needs >= 2 GPUs
        for precision in ("bf16", "fp16"):
            key = f"{backend} {precision}"
            if precision == "fp16" and not ctx.gpu:
                table[key] = "skipped (fp16 needs a GPU)"
                continue
            try:
                b = build_backend(ctx, train_cfg(ctx, backend, precision))
            except ConfigError as e:
                table[key] = f"refused: {e}"
                continue
            with simulated_cuda_autocast(not ctx.gpu):
                seen = conv_output_dtypes(b.module, lambda: tiny_step(b, ctx))
            want = {"bf16": "bfloat16", "fp16": "float16"}[precision]
            table[key] = seen["dtypes"]
            if seen["dtypes"] != [want]:
                bad.append(f"{key}: convolutions ran in {seen['dtypes']}, want {want}")
    if not ctx.gpu:  # the simulation must reproduce the old defect, or it proves nothing
        legacy = build_backend(ctx, train_cfg(ctx, "deepspeed", "bf16"), legacy_deepspeed())
        with simulated_cuda_autocast(True):
            table["deepspeed bf16, old recipe, simulated CUDA autocast"] = conv_output_dtypes(
                legacy.module, lambda: tiny_step(legacy, ctx)
            )["dtypes"]
        if table["deepspeed bf16, old recipe, simulated CUDA autocast"] != ["float32"]:
            bad.append("the simulated CUDA autocast did not reproduce DeepSpeed's fall-back to fp32")
    if bad:
        return "FAIL", "; ".join(bad), table
    return (
        "PASS",
        ", ".join(
            f"{k}: {v if isinstance(v, str) else '/'.join(v)}" for k, v in table.items() if "old recipe" not in k
        ),
        table,
    )


def check_channels_last(ctx: Ctx):
    ensure_group(ctx)
    arms = [("single", 0), ("ddp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("fsdp", 0)]
    out, bad = {}, []
    for backend, zero in arms:
        key = backend + (f" zero-{zero}" if backend == "deepspeed" else "")
        b = build_backend(ctx, train_cfg(ctx, backend, "bf16", channels_last=True, zero=zero))
        weights = [p for p in b.module.parameters() if p.dim() == 4]
        seen = conv_output_dtypes(b.module, lambda: tiny_step(b, ctx))
        kept = all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        out[key] = {
            "mode": b.channels_last,
            "weights_channels_last_after_step": kept,
            "activations_channels_last": seen["channels_last"],
        }
        if b.channels_last == "model" and not kept:
            bad.append(f"{key}: weights lost channels_last")
        if seen["channels_last"] != [True]:
            bad.append(f"{key}: convolutions produced non-channels_last outputs")
    if bad:
        return "FAIL", "; ".join(bad), out
    return "PASS", ", ".join(f"{k}: {v['mode']}" for k, v in out.items()), out


def check_ddp(ctx: Ctx):
    import torch.distributed as tdist

    ensure_group(ctx)
    b = build_backend(ctx, train_cfg(ctx, "ddp", "fp32"))
    wrapped = type(b.wrapped).__name__
    tiny_step(b, ctx)
    buf = next(x for x in b.module.buffers() if x.is_floating_point())
    before = buf.clone()
    tdist.broadcast(buf, src=0)
    objs = [None]
    tdist.all_gather_object(objs, {"host": dist.read_env().host})
    ctrl = dist.control_group(60, separate=True)  # the gloo group NCCL runs use
    flag = torch.tensor([1.0], dtype=torch.float64)
    tdist.all_reduce(flag, group=ctrl)
    ok = torch.equal(before, buf) and objs[0]["host"] and flag.item() == 1.0 and wrapped == "DistributedDataParallel"
    facts = {
        "backend": tdist.get_backend(),
        "wrapped": wrapped,
        "control_group": tdist.get_backend(ctrl),
        "objects": objs,
    }
    return (
        ("PASS" if ok else "FAIL"),
        f"{facts['backend']} group, {wrapped}, buffer broadcast, "
        f"all_gather_object, {facts['control_group']} control group",
        facts,
    )


def check_deepspeed(ctx: Ctx):
    ensure_group(ctx)
    out = {}
    for zero in (0, 1, 2):
        cfg = train_cfg(ctx, "deepspeed", "bf16" if ctx.gpu else "fp32", zero=zero)
        b = build_backend(ctx, cfg)
        tiny_step(b, ctx)
        folder = ctx.work / f"ds-zero{zero}"
        b.save(folder, "last", {"global_step": 1, "saves": 1})
        saved = [p.detach().float().clone() for p in b.module.parameters()]
        tiny_step(b, ctx)
        moved = any(not torch.equal(a, p.detach().float()) for a, p in zip(saved, b.module.parameters()))
        state = b.load(folder, "last")
        back = all(torch.equal(a, p.detach().float()) for a, p in zip(saved, b.module.parameters()))
        out[f"zero-{zero}"] = {"moved_after_save": moved, "restored": back, "client_state": state.get("global_step")}
        if not (moved and back and state.get("global_step") == 1):
            return "FAIL", f"ZeRO-{zero}: checkpoint round trip failed ({out[f'zero-{zero}']})", out
    return "PASS", "ZeRO-0/1/2: train, save, step, load back to the saved weights", out


def ensure_shards(ctx: Ctx) -> Path:
    if ctx.shards is None:
        from cxrdist.shards.pack import synth_shards

        _, ctx.shards = synth_shards(
            ctx.work,
            n=ctx.images,
            raw_size=ctx.packed + 32,
            size=ctx.packed,
            workers=min(8, dist.cpu_count()),
            samples_per_shard=max(20, ctx.images // 24),
        )
    return ctx.shards


def train_argv(ctx: Ctx, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--shards",
        str(ensure_shards(ctx)),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--image-size",
        str(ctx.size),
        "--batch-size",
        str(ctx.batch),
        "--epochs",
        "2",
        "--log-every",
        "2",
        "--device",
        ctx.device.type,
        *extra,
    ]


def preempt_and_resume(ctx: Ctx, out: Path, *extra: str) -> dict:
    """Start a run, send it SIGUSR2 mid-epoch (what SLURM sends before the time limit), then --resume it (the
    dry run: one epoch, preempted inside it)."""
    extra = (*extra, "--epochs", "1") if ctx.dry else extra
    argv = [sys.executable, "-m", "cxrdist.cli", *train_argv(ctx, out, *extra)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    tel = out / "telemetry" / "rank0.jsonl"
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:
        if tel.is_file() and sum('"event": "step"' in ln for ln in tel.read_text().splitlines()) >= 1:
            proc.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    first = json.loads((out / "summary.json").read_text())
    assert first["status"] == "preempted", f"expected a preempted run, got {first['status']}: {err[-800:]}"
    need(cli(*train_argv(ctx, out, *extra, "--resume")), "the resumed run")
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "completed" and final["restarts"] == 1, final["status"]
    return {
        "preempted_at_step": first["global_step"],
        "final_steps": final["global_step"],
        "val_auc": final["epochs"][-1]["val_auc_mean"],
        "precision": final["precision"],
    }


def boot(ctx: Ctx) -> tuple[str, ...]:
    """`cxrdist eval`'s bootstrap: its 1,000 replicates on the node; a few in the dry run (its plumbing)."""
    return () if ctx.gpu else ("--bootstrap", "50")


def fsdp_round_trip(ctx: Ctx, precision: str) -> dict:
    """FSDP's sharded checkpoint: one epoch saved, a second resumed from it, then `cxrdist eval` reads it in
    one process without a group."""
    run = ctx.work / "e2e-fsdp"
    fsdp = ("--backend", "fsdp", "--precision", precision, "--channels-last", "--epochs", "1")
    # the dry run saves after a few steps and resumes into the test evaluation; on a GPU, a whole epoch each
    first, then = (("--max-steps", "4", "--no-test"), ()) if ctx.dry else (("--no-test",), ("--epochs", "2"))
    need(cli(*train_argv(ctx, run, *fsdp, *first)), "FSDP training")
    need(cli(*train_argv(ctx, run, *fsdp, *then, "--resume")), "FSDP resumed from its checkpoint")
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "completed" and s["restarts"] == 1 and s["test"], s["status"]
    ev = cli("eval", "--run", str(run), "--split", "test", "--checkpoint", "last", *boot(ctx))  # the run's test
    need(ev, "cxrdist eval on the FSDP checkpoint")
    result = json.loads(ev.stdout[ev.stdout.index("{") :])
    assert result["n"] == s["test"]["n"], (result["n"], s["test"]["n"])
    return {"restarts": s["restarts"], "train_test_auc": s["test"]["auc_mean"], "eval": result["mean"]}


def e2e_precision(ctx: Ctx) -> str:
    """bf16 on the node; the dry run's whole trainings use bf16 only where the CPU has bf16 units: emulated, it
    is ~7x slower than fp32 (the dry throughput arms: 1.8 against 12.4 img/s on a 2-core EPYC), and what bf16
    does to each backend is the conv dtypes and channels_last checks' subject, in-process, on any CPU."""
    from cxrdist.engine.benchstep import native_bf16

    return "bf16" if ctx.gpu or native_bf16() else "fp32"


def check_end_to_end(ctx: Ctx):
    out = {}
    precision = e2e_precision(ctx)
    out["precision"] = precision
    out[f"single {precision} channels_last, preempted + resumed"] = preempt_and_resume(
        ctx, ctx.work / "e2e", "--precision", precision, "--channels-last", "--checkpoint-every", "4"
    )
    if ctx.gpu:
        run = ctx.work / "e2e-fp16"
        need(cli(*train_argv(ctx, run, "--precision", "fp16", "--epochs", "1")), "fp16 training")
        s = json.loads((run / "summary.json").read_text())
        scaler = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["scaler"]
        out["single fp16"] = {"status": s["status"], "grad_scale": scaler.get("scale")}
        assert scaler.get("scale"), "fp16 ran without a GradScaler"
    else:
        out["single fp16"] = "skipped (fp16 needs a GPU)"
    run = ctx.work / "e2e-deepspeed"
    need(
        cli(
            *train_argv(
                ctx, run, "--backend", "deepspeed", "--zero-stage", "1", "--precision", precision, "--epochs", "1"
            )
        ),
        "DeepSpeed training",
    )
    ev = cli("eval", "--run", str(run), "--split", "test", *boot(ctx))
    need(ev, "cxrdist eval on the DeepSpeed checkpoint")
    out["deepspeed zero-1 + eval"] = json.loads(ev.stdout[ev.stdout.index("{") :])
    out["fsdp save + resume + eval"] = fsdp_round_trip(ctx, precision)
    trained = out[f"single {precision} channels_last, preempted + resumed"]["final_steps"]
    tel = [json.loads(ln) for ln in (ctx.work / "e2e" / "telemetry" / "rank0.jsonl").read_text().splitlines()]
    steps = [r for r in tel if r.get("event") == "step"]
    wait = sum(r["data_time_s"] for r in steps) / max(1e-9, sum(r["step_time_s"] for r in steps))
    out["data_wait_share"] = round(wait, 4)
    return (
        "PASS",
        f"{precision}: preempt + resume ({trained} steps), "
        f"fp16: {'GradScaler' if ctx.gpu else 'skipped'}, DeepSpeed eval AUC "
        f"{out['deepspeed zero-1 + eval']['mean']['all']}, data wait {100 * wait:.1f}%",
        out,
    )


THROUGHPUT_ARMS = [
    {"name": "fp32", "backend": "single", "precision": "fp32"},
    {"name": "bf16", "backend": "single", "precision": "bf16"},
    {"name": "bf16 channels_last", "backend": "single", "precision": "bf16", "channels_last": True},
    {
        "name": "bf16 channels_last, no cudnn.benchmark",
        "backend": "single",
        "precision": "bf16",
        "channels_last": True,
        "cudnn_benchmark": False,
    },
    {"name": "fp16 channels_last", "backend": "single", "precision": "fp16", "channels_last": True},
    {"name": "bf16 channels_last compiled", "backend": "single", "precision": "bf16", "channels_last": True}
    | {"compile": True},  # --compile: its warm-up (the compilation) is reported apart
    {
        "name": "ddp world 1 bf16 channels_last",
        "backend": "ddp",
        "precision": "bf16",
        "channels_last": True,
        "group_at_world1": True,
    },
    {
        "name": "ddp world 1 bf16 channels_last compiled",
        "backend": "ddp",
        "precision": "bf16",
        "channels_last": True,
        "group_at_world1": True,
        "compile": True,
    },
    {"name": "fsdp bf16 channels_last (activations)", "backend": "fsdp", "precision": "bf16", "channels_last": True},
    {
        "name": "deepspeed zero-0 bf16 channels_last",
        "backend": "deepspeed",
        "precision": "bf16",
        "channels_last": True,
        "zero": 0,
    },
    {
        "name": "deepspeed zero-1 bf16 channels_last (activations)",
        "backend": "deepspeed",
        "precision": "bf16",
        "channels_last": True,
        "zero": 1,
    },
]


def run_arms(ctx: Ctx, arms: list[dict], steps: int) -> dict[str, dict]:
    """Arms measured in one `benchstep many` process (one import, one cuDNN autotune cache), within the time
    left: ``{name: numbers}``, or ``{name: {"error": ...}}`` for an arm that failed or was not reached."""
    specs = [{"model": MODEL, "image_size": ctx.size, "batch": arm_batch(ctx), "steps": steps} | a for a in arms]
    for spec in specs:
        spec["warmup"] = 3 if ctx.gpu else 0  # the dry run times nothing: one step shows that an arm runs
    env = child_env(CXRDIST_THREADS=str(min(8, dist.cpu_count())))
    argv = [sys.executable, "-m", "cxrdist.engine.benchstep", "many", json.dumps(specs)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=max(30.0, ctx.left()))
        stdout, why = p.stdout, f"the process exited {p.returncode}: {(p.stderr or '').strip()[-300:]}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        why = "not reached within --budget-s"
    got = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            got[r.pop("name")] = r
    return {
        a["name"]: arm_numbers(spec, got[a["name"]]) if a["name"] in got else {"error": why}
        for a, spec in zip(arms, specs)
    }


def arm_batch(ctx: Ctx) -> int:
    """The images of a throughput arm's and an in-process check's steps. The dry run times nothing: their
    plumbing on 2 images (BatchNorm's least; bf16 is emulated on most CPUs, ~0.5 s an image at 32 px)."""
    return ctx.batch if ctx.gpu else 2


def arm_numbers(spec: dict, r: dict) -> dict:
    if "error" in r:
        return r
    return {
        "images_per_s": round(spec["batch"] * spec["steps"] / r["seconds"], 1),
        "warmup_s": round(r["warmup_s"], 1),
        "tf32": r["tf32"],
        "channels_last": r["channels_last"],
        **{k: round(v, 1) for k, v in r["memory"].items() if isinstance(v, (int, float))},
    }


def loader_rate(ctx: Ctx, workers: int, batches: int) -> float:
    from cxrdist.data.stream import train_loader
    from cxrdist.data.world import World
    from cxrdist.shards.shardset import ShardSet

    world = World.of(rank=0, world_size=1, workers=workers, seed=0, micro_batch=ctx.batch)
    loader = train_loader(ShardSet.open(ensure_shards(ctx)), world, pin_memory=ctx.gpu)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 1:
            t0 = time.perf_counter()  # after the workers' start-up
        elif i > 1:
            n += len(b["key"])
        if i > batches:
            break
    return n / max(1e-9, time.perf_counter() - (t0 or time.perf_counter()))


def throughput_arms(ctx: Ctx) -> list[list[dict]]:
    """The arms, grouped by process: every eager arm in one, each compiled arm in its own (a compiler that
    fails on the node's triton must not take the eager numbers with it). The dry run leaves out fp16 (CUDA
    only) and compile (minutes on 2 cores; tests/test_recipe.py trains it on every backend)."""
    arms = [a for a in THROUGHPUT_ARMS if ctx.gpu or (a["precision"] != "fp16" and not a.get("compile"))]
    eager = [a for a in arms if not a.get("compile")]
    if ctx.gpu:  # the goal's batch range: the better of 64 and 128
        eager.insert(3, THROUGHPUT_ARMS[2] | {"name": "bf16 channels_last, batch 128", "batch": 128})
    return [eager] + [[a] for a in arms if a.get("compile")]


def check_throughput(ctx: Ctx):
    steps = 20 if ctx.gpu else 1
    out = {"arms": {}, "batch": arm_batch(ctx), "image_size": ctx.size}
    skipped = []
    for group in throughput_arms(ctx):
        if ctx.left() < (60 if ctx.gpu else 5):
            skipped += [a["name"] for a in group]
            continue
        out["arms"].update(run_arms(ctx, group, steps))
    for name in skipped:
        out["arms"][name] = {"error": "skipped: --budget-s spent"}
    workers = (2, 12) if ctx.gpu else (0, 1)
    out["loader_ips"] = {str(w): round(loader_rate(ctx, w, 30 if ctx.gpu else 3), 1) for w in workers}
    if ctx.left() > (120 if ctx.gpu else 5):  # the trainer's own data path against a bare loop
        from cxrdist.engine.benchstep import bench_trainer

        steps = 0 if ctx.gpu else 2  # the dry run: that the arm runs, not what it measures
        bt = bench_trainer(not ctx.gpu, MODEL, ctx.size, ctx.batch, steps=steps, workdir=str(ctx.work))
        out["trainer_vs_bare"] = bt["trainer"] | bt["ratios"]
    failed = [k for k, v in out["arms"].items() if "error" in v and k not in skipped]
    status = "FAIL" if failed else "PASS"
    note = f"; failed: {', '.join(failed)}" if failed else ""
    note += f"; skipped for time: {', '.join(skipped)}" if skipped else ""
    if not ctx.gpu:
        return status, "dry run: every arm ran one step (not timed)" + note, out
    arms = {k: v for k, v in out["arms"].items() if "images_per_s" in v}
    best = max(
        (v["images_per_s"] for k, v in arms.items() if k.startswith("bf16 channels_last") and "no cudnn" not in k
         and "compiled" not in k),
        default=0.0,
    )  # fmt: skip
    if "bf16 channels_last compiled" in arms and "bf16 channels_last" in arms:
        out["compile_vs_eager"] = round(
            arms["bf16 channels_last compiled"]["images_per_s"] / arms["bf16 channels_last"]["images_per_s"], 3
        )
    out["goal"] = {
        "want_ips": GOAL_IPS,
        "best_bf16_channels_last_ips": best,
        "met": best >= GOAL_IPS,
        "loader_12_workers_feeds_it": out["loader_ips"]["12"] >= best,
    }
    table = ", ".join(f"{k} {v['images_per_s']:.0f}" for k, v in arms.items())
    tvb = out.get("trainer_vs_bare", {}).get("trainer_vs_bare")
    return (
        status,
        f"img/s: {table}; loader 2/12 workers {out['loader_ips']['2']:.0f}/{out['loader_ips']['12']:.0f}; "
        f"goal {GOAL_IPS}: {'met' if best >= GOAL_IPS else 'MISSED'} ({best:.0f}); "
        f"--compile x{out.get('compile_vs_eager')}; trainer/bare x{tvb}" + note,
        out,
    )


CHECKS = [
    ("device", check_device),
    ("augmentation", check_augmentation),
    ("conv dtypes", check_conv_dtypes),
    ("channels_last", check_channels_last),
    ("ddp", check_ddp),
    ("deepspeed", check_deepspeed),
    ("end to end", check_end_to_end),
    ("throughput", check_throughput),
]


# --------------------------------------------------------------------------------------------------------
# run + report
# --------------------------------------------------------------------------------------------------------
def run(dry: bool, out_dir: Path, only: list[str] | None = None, budget_s: float = 420.0) -> dict:
    """Every check in order, each within the time left of ``budget_s`` (what is left when it is spent is a
    SKIP line with the reason); gpucheck.json/.md are rewritten after every check, so a node that dies or a
    job that times out keeps every number measured until then."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"dry": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s, "checks": []}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxrdist-gpucheck-") as tmp:
        ctx = make_ctx(dry, Path(tmp))
        ctx.deadline = time.monotonic() + budget_s
        for name, fn in CHECKS:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            if ctx.left() <= 0:
                status, summary, details = "SKIP", f"--budget-s {budget_s:g} spent before this check", {}
            else:
                status, summary, details = run_check(fn, ctx)
            secs = time.perf_counter() - t0
            print(f"{status} {name} ({secs:.1f} s): {summary}", flush=True)
            report["checks"].append(
                {"name": name, "status": status, "summary": summary, "seconds": round(secs, 1), "details": details}
            )
            write_report(report, out_dir, time.perf_counter() - t_all)
        dist.destroy(sync=True)
    write_report(report, out_dir, time.perf_counter() - t_all)
    print(
        f"{'PASS' if report['passed'] else 'FAIL'} gpu-check{' (dry)' if dry else ''} in {report['seconds']:.0f} s; "
        f"{out_dir / 'gpucheck.json'}",
        flush=True,
    )
    return report


def run_check(fn, ctx: Ctx) -> tuple[str, str, dict]:
    try:
        return fn(ctx)
    except Exception as e:  # one check failing must not hide the others
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return "FAIL", f"{type(e).__name__}: {first}", {"traceback": traceback.format_exc().splitlines()[-12:]}


def write_report(report: dict, out_dir: Path, seconds: float) -> None:
    """gpucheck.json and gpucheck.md as they stand (atomically: a kill mid-write keeps the previous ones)."""
    from cxrdist.atomic import atomic_write_bytes

    report["seconds"] = round(seconds, 1)
    report["passed"] = all(c["status"] != "FAIL" for c in report["checks"])
    atomic_write_bytes(out_dir / "gpucheck.json", (json.dumps(report, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out_dir / "gpucheck.md", markdown(report).encode())


def markdown(report: dict) -> str:
    lines = [
        f"# cxrdist gpu-check{' (dry run on CPU)' if report['dry'] else ''}",
        "",
        f"{report['started']}, {report['seconds']:.0f} s",
        "",
        "| check | status | s | result |",
        "|---|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']} | {c['summary'].replace('|', '/')} |")
    thr = next((c["details"] for c in report["checks"] if c["name"] == "throughput" and "arms" in c["details"]), None)
    if thr:
        lines += [
            "",
            f"## Throughput ({MODEL}, {thr['image_size']} px, batch {thr['batch']})",
            "",
            "| arm | images/s | allocator peak MB | reserved MB | device used MB |",
            "|---|---|---|---|---|",
        ]
        for k, v in thr["arms"].items():
            lines.append(
                f"| {k} | {v.get('images_per_s', v.get('error', ''))} | {v.get('mem_peak_mb', '')} | "
                f"{v.get('mem_reserved_mb', '')} | {v.get('mem_device_used_mb', '')} |"
            )
        lines += ["", "loader images/s by workers: " + ", ".join(f"{w}: {r}" for w, r in thr["loader_ips"].items())]
        if "trainer_vs_bare" in thr:
            t = thr["trainer_vs_bare"]
            lines += [
                f"trainer vs bare loop: {t['trainer_ips']} / {t['bare_loop_ips']} img/s = x{t['trainer_vs_bare']}"
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxrdist.gpucheck",
        allow_abbrev=False,
        description="Run every GPU path of cxrdist on this node (or --dry on the CPU).",
    )
    p.add_argument("--dry", action="store_true", help="CPU, gloo, tiny images, nothing timed")
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("GPU_REPORT") or "reports/gpu"), metavar="DIR",
        help="where gpucheck.json/.md go (default: $GPU_REPORT, else reports/gpu)",
    )  # fmt: skip
    p.add_argument(
        "--budget-s", type=float, default=420.0, metavar="S",
        help="stop starting checks and arms after S seconds; what is left is SKIP with the reason (default 420)",
    )  # fmt: skip
    p.add_argument(
        "--only", default="", metavar="NAMES", help="comma list of checks: " + ", ".join(n for n, _ in CHECKS)
    )
    a = p.parse_args(argv)
    report = run(a.dry, a.out, [x.strip() for x in a.only.split(",") if x.strip()] or None, a.budget_s)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
