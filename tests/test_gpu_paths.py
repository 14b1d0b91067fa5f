"""The GPU-correctness rules (issue 8), each shown on this CPU where the CPU can show it.

What needs a real GPU (NCCL, fp16, cuDNN, the memory counters) runs in `make gpu-check`; its CPU dry run
is tests/test_gpucheck.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cxrdist import cpus, dist, launch, telemetry
from cxrdist.config import ConfigError
from cxrdist.engine.backends.dp import AutocastForward
from cxrdist.engine.spawn import free_port

import runs
from runs import summary

TINY = ["--model", "densenet121", "--image-size", "32", "--batch-size", "8", "--log-every", "2", "--device", "cpu"]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("SLURM_")}
    return {**env, **extra}


def train(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return runs.train(*args, env=env or clean_env(), timeout=timeout, check=False)


# --------------------------------------------------------------------------------------------------------
# CPU layout: threads, workers, OpenMP waiting
# --------------------------------------------------------------------------------------------------------
def test_wait_policy_spins_only_where_a_ranks_threads_own_their_cores():
    assert cpus.wait_policy(1, 2, 2, gpu=False)[0] == "ACTIVE"
    assert cpus.wait_policy(2, 1, 2, gpu=False)[0] == "ACTIVE"
    assert cpus.wait_policy(4, 1, 2, gpu=False) == ("PASSIVE", "4 rank(s) x 1 thread(s) oversubscribe 2 core(s)")
    assert cpus.wait_policy(1, 8, 16, gpu=True)[0] == "PASSIVE"  # idle GPU-rank threads must not spin


def test_ranks_and_threads_come_from_torchrun_submitit_or_slurm():
    assert cpus.ranks_on_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert cpus.ranks_on_node({"SUBMITIT_LOCAL_NTASKS": "3"}) == 3
    assert cpus.ranks_on_node({"SLURM_TASKS_PER_NODE": "2(x3)"}) == 2
    assert cpus.ranks_on_node({}) == 1
    assert cpus.threads_per_rank({"SLURM_CPUS_PER_TASK": "6"}) == 6
    assert cpus.threads_per_rank({"CXRDIST_THREADS": "3", "SLURM_CPUS_PER_TASK": "6"}) == 3
    assert cpus.threads_per_rank({}, ranks=4, cores=16) == 4
    assert cpus.threads_per_rank({}, ranks=4, cores=2) == 1


def test_auto_workers_feed_gpus_and_leave_cpu_ranks_their_cores():
    assert cpus.auto_workers(8, gpu=True) == 7
    assert cpus.auto_workers(64, gpu=True) == cpus.MAX_AUTO_WORKERS
    assert cpus.auto_workers(1, gpu=True) == 1
    assert cpus.auto_workers(8, gpu=False) == 1


@pytest.mark.parametrize(
    "env,policy,why",
    [  # CUDA_VISIBLE_DEVICES="": a CPU node even where GPUs exist
        ({"LOCAL_WORLD_SIZE": "1", "CXRDIST_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, "ACTIVE", "fit"),
        ({"LOCAL_WORLD_SIZE": "4", "CXRDIST_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, "PASSIVE", "oversubscribe"),
        ({"LOCAL_WORLD_SIZE": "4", "CXRDIST_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", "set by the user"),
    ],
)
def test_the_wait_policy_is_chosen_before_torch_loads_openmp(env, policy, why):
    """A fresh process (torch not yet loaded): what `import cxrdist` decides, and records for telemetry."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "CXRDIST_OMP_WAIT", *RANK_VARS)}
    code = (
        "import sys, cxrdist, os; assert 'torch' not in sys.modules; "
        "print(os.environ['OMP_WAIT_POLICY'], '|', os.environ['CXRDIST_OMP_WAIT'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, check=True
    ).stdout
    got, record = (x.strip() for x in out.split("|"))
    assert got == policy and record.startswith(policy) and why in record, out


# --------------------------------------------------------------------------------------------------------
# devices: refusals before any rank starts
# --------------------------------------------------------------------------------------------------------
def test_reading_the_rank_layout_does_not_load_torch():
    """The submitit job imports these before it chooses OpenMP's wait policy: torch must not load yet."""
    code = "import sys, cxrdist.launch, cxrdist.dist, cxrdist.cpus; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_two_ranks_on_one_gpu_are_refused():
    dist.check_gpu_sharing(4, 4)  # one GPU per rank
    dist.check_gpu_sharing(4, 1)  # srun --gpus-per-task=1: each task sees its own
    with pytest.raises(ConfigError, match="4 ranks on this node but 2 visible GPU"):
        dist.check_gpu_sharing(4, 2)
    with pytest.raises(ConfigError, match="SLURM gave it 2 GPU"):
        dist.check_gpu_sharing(4, 1, gpus_on_node=2)
    with pytest.raises(ConfigError, match="2 ranks on this node but 1 visible GPU"):
        dist.check_gpu_sharing(2, 1, same_view=True)  # --nproc 2 on a 1-GPU machine


def test_gpus_asked_for_but_cuda_unavailable_fails_loudly_with_the_reason(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA works on this host")
    with pytest.raises(ConfigError, match="--device cuda was asked for but CUDA is unavailable: "):
        dist.select_device(dist.DistEnv(), "cuda")
    monkeypatch.setattr(cpus, "gpu_node", lambda env=None: True)  # NVIDIA devices present, CUDA dead
    with pytest.raises(ConfigError, match="this node has NVIDIA devices but CUDA is unavailable"):
        dist.select_device(dist.DistEnv(), "auto")
    monkeypatch.setattr(cpus, "gpu_node", lambda env=None: False)
    assert dist.select_device(dist.DistEnv(), "auto").type == "cpu"  # no GPU at all: the CPU, as asked


def test_cuda_unavailable_reason_names_the_wheel_and_the_driver(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "hides every GPU" in dist.cuda_unavailable_reason()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(dist, "_driver_version", lambda: "535.104")
    reason = dist.cuda_unavailable_reason()
    if torch.version.cuda:
        assert f"CUDA {torch.version.cuda}" in reason and "driver 535.104" in reason


def test_cxrdist_train_device_cuda_without_a_gpu_is_one_line(tiny_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA works on this host")
    proc = train("--shards", tiny_shards["shards"], "--out", tmp_path / "r", *TINY[:-2], "--device", "cuda")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--device cuda was asked for but CUDA is unavailable" in proc.stderr


# --------------------------------------------------------------------------------------------------------
# precision: DataParallel's replica threads, DeepSpeed (also gpucheck's conv-dtype check)
# --------------------------------------------------------------------------------------------------------
def test_dp_replicas_autocast_in_their_own_threads():
    """DataParallel runs each replica in a new thread, which does not inherit the caller's autocast: the
    cast must happen inside the forward. Shown on CPU with the same thread-local autocast state."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 1, 8, 8)

    def in_thread(m):
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("y", m(x)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t.start()
            t.join()
        return out["y"].dtype

    # a new thread runs without the caller's cast (DataParallel re-enters autocast there, with CUDA's
    # default dtype, fp16; the real path is gpu-check's); AutocastForward casts with the dtype it was given
    assert in_thread(model) == torch.float32
    assert in_thread(AutocastForward(model, "cpu", torch.bfloat16)) == torch.bfloat16


# --------------------------------------------------------------------------------------------------------
# DeepSpeed with one rank, channels_last everywhere it is asked for
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,zero,mode", [("single", 0, "model"), ("deepspeed", 0, "model"), ("deepspeed", 1, "activations")]
)
def test_one_rank_trains_with_channels_last(tiny_shards, tmp_path, backend, zero, mode):
    run = tmp_path / f"{backend}{zero}"
    proc = train(
        "--shards",
        tiny_shards["shards"],
        "--out",
        run,
        "--backend",
        backend,
        "--zero-stage",
        zero,
        "--channels-last",
        "--precision",
        "bf16",
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--no-test",
        *TINY[:6],
        "--log-every",
        "100",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(run)
    assert s["status"] == "completed" and s["world_size"] == 1 and s["channels_last"] == mode
    records = [json.loads(ln) for ln in (run / "telemetry" / "rank0.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["channels_last"] == mode and start["omp_wait_policy"] in ("ACTIVE", "PASSIVE")
    steps = [r for r in records if r["event"] == "step"]
    assert steps and isinstance(steps[-1]["loss"], float)  # --log-every 100 > steps: still one record
    assert "device cpu" in proc.stderr and "[cxrdist rank 0/1" in proc.stderr  # the first log line


# --------------------------------------------------------------------------------------------------------
# --nproc inside an srun step
# --------------------------------------------------------------------------------------------------------
def srun_step_env(tasks: int) -> dict:
    return clean_env(
        SLURM_PROCID="0",
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_NTASKS=str(tasks),
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="localhost",
        SLURM_JOB_NODELIST="localhost",
    )


@pytest.mark.slow
def test_nproc_inside_a_one_task_srun_step_starts_the_ranks(tiny_shards, tmp_path):
    run = tmp_path / "pty"
    proc = train(
        "--shards",
        tiny_shards["shards"],
        "--out",
        run,
        "--backend",
        "ddp",
        "--nproc",
        "2",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--no-test",
        "--workers",
        "0",
        *TINY,
        env=srun_step_env(1),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(run)["world_size"] == 2


def test_nproc_inside_a_multi_task_srun_step_is_refused(tiny_shards, tmp_path):
    proc = train(
        "--shards",
        tiny_shards["shards"],
        "--out",
        tmp_path / "x",
        "--backend",
        "ddp",
        "--nproc",
        "2",
        *TINY,
        env=srun_step_env(4),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--nproc 2 inside a launch of 4 ranks (slurm)" in proc.stderr


# --------------------------------------------------------------------------------------------------------
# the gloo control group's timeout
# --------------------------------------------------------------------------------------------------------
CTRL = """
import sys, time, datetime, torch, torch.distributed as tdist
from cxrdist import dist
rank = int(sys.argv[1])
tdist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                         timeout=datetime.timedelta(seconds=120))
ctrl = dist.control_group(3, separate=True)    # what an NCCL run makes: gloo, the run's --timeout
if rank == 1:
    time.sleep(40)                              # a rank that died outside NCCL, as far as rank 0 can tell
    sys.exit(0)
t = time.monotonic()
try:
    tdist.all_reduce(torch.ones(1), group=ctrl)
except Exception as e:
    print("TIMEOUT", round(time.monotonic() - t, 1), type(e).__name__, flush=True)
    import os; os._exit(0)
print("NO TIMEOUT", flush=True)
"""


@pytest.mark.timeout(120)
def test_the_control_group_times_out_after_the_runs_timeout_not_gloos_30_minutes():
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CTRL, str(r), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for r in (0, 1)
    ]
    out, err = procs[0].communicate(timeout=90)
    procs[1].kill()
    assert out.startswith("TIMEOUT"), (out, err[-2000:])
    assert float(out.split()[1]) < 20, out


# --------------------------------------------------------------------------------------------------------
# telemetry: synchronised windows, memory per epoch
# --------------------------------------------------------------------------------------------------------
def test_a_window_is_timed_after_the_device_has_finished_it(tmp_path):
    """With asynchronous CUDA, the last step of a window is still running when the clock is read: the
    sync must come before the clock (here a sync that takes 0.3 s stands for the queued work)."""
    tel = telemetry.Telemetry(
        tmp_path,
        rank=0,
        local_rank=0,
        host="h",
        device="cpu",
        world_size=1,
        log_every=1,
        memory_fn=lambda: {},
        show_progress=False,
        sync_fn=lambda: time.sleep(0.3),
    )
    tel.start_epoch(0, 1, 1)
    rec = tel.step(epoch=0, step=0, images=30, step_time=0.0, data_time=0.0, loss_fn=lambda: 0.5, lr=1e-3)
    tel.close()
    assert rec["images_per_s"] <= 30 / 0.3


def test_peak_memory_starts_again_every_epoch():
    telemetry.reset_peak_rss()
    block = torch.ones(300 * 2**20 // 4)  # 300 MB
    high = telemetry.peak_rss_mb()
    del block
    telemetry.reset_peak_rss()
    assert telemetry.peak_rss_mb() < high - 200, (telemetry.peak_rss_mb(), high)


# --------------------------------------------------------------------------------------------------------
# loader: persistent workers give the same batches as a fresh loader
# --------------------------------------------------------------------------------------------------------
def test_persistent_training_workers_replay_each_epoch_exactly(tiny_shards):
    from cxrdist.data.stream import make_loader

    def keys(loader):
        return [k for b in loader for k in b["key"]]

    common = dict(batch_size=8, workers=2, train=True, seed=3)
    kept = make_loader(tiny_shards["shards"], "train", persistent=True, **common)
    first = keys(kept)
    pool = kept.dataloader()
    for epoch, start in ((1, 0), (2, 3)):
        fresh = make_loader(tiny_shards["shards"], "train", epoch=epoch, start_batch=start, **common)
        assert keys(kept.restart(epoch, start)) == keys(fresh), (epoch, start)
        assert kept.dataloader() is pool and len(kept) == len(fresh)
    assert keys(kept.restart(0)) == first


# --------------------------------------------------------------------------------------------------------
# the launcher: CPUs per task from the node, CUDA_VISIBLE_DEVICES kept
# --------------------------------------------------------------------------------------------------------
def test_cpus_per_task_default_is_the_nodes_share():
    assert launch.size_cpus(None, 1, 2, "slurm") == (2, None)  # 2-CPU node, 1 task: both CPUs
    assert launch.size_cpus(None, 8, 64, "slurm", 8, 8) == (8, None)  # 64 cores, 8 GPUs: 8 each, none idle
    assert launch.size_cpus(None, 1, 64, "slurm", 1, 8) == (8, None)  # 1 of 8 GPUs: 1/8 of the node
    assert launch.size_cpus(3, 8, 64, "slurm") == (3, None)  # asked for
    cpus_, threads = launch.size_cpus(None, 2, dist.cpu_count(), "local")
    assert cpus_ == max(1, dist.cpu_count() // 2) and threads == cpus_


def test_the_local_executor_keeps_the_users_visible_gpus():
    assert launch.visible_gpu_parameters("2,3", 2) == {"visible_gpus": (2, 3)}
    assert launch.visible_gpu_parameters("GPU-aa,GPU-bb", 1) == {"setup": ["export CUDA_VISIBLE_DEVICES=GPU-aa"]}
    assert launch.visible_gpu_parameters(None, 2) == {} and launch.visible_gpu_parameters("0,1", 0) == {}


def test_the_sbatch_template_ends_the_step_on_a_bad_rank_and_gives_srun_the_cpus():
    text = (Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch").read_text()
    assert 'srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"' in text
    assert "--device cuda" in text


@pytest.mark.slurm
def test_defaults_fit_a_two_cpu_node_partition(slurm_cluster, tmp_path):
    """The test cluster's nodes have 2 CPUs: `--nodes 2 --gpus 0 --tasks-per-node 1` was refused with
    3 CPUs per task (2 workers + 1); now a task gets its node's CPUs, and two tasks one each."""
    from cxrdist.config import parse_train_argv

    cfg = parse_train_argv(["--shards", str(tmp_path), "--out", str(tmp_path / "r")])
    for tasks, want in ((1, 2), (2, 1)):
        args = launch.get_args_parser().parse_args(
            ["--nodes", "2", "--gpus", "0", "--tasks-per-node", str(tasks), "--backend", "ddp", "--cluster", "slurm"]
        )
        p = launch.plan.plan(args, cfg)
        assert (p.cpus_per_task, p.nodes, p.tasks_per_node) == (want, 2, tasks), p
