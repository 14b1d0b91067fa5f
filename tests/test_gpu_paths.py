"""The GPU-correctness rules (issue 8), each shown on this CPU where the CPU can show it.

What needs a real GPU (NCCL, fp16, cuDNN, the memory counters) runs in `make gpu-check`; its CPU dry run
is tests/test_gpucheck.py.
"""

from __future__ import annotations

import contextlib
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

TINY = ["--model", "cxrtiny", "--image-size", "32", "--batch-size", "8", "--log-every", "2", "--device", "cpu"]
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


@pytest.mark.parametrize(
    "layout, local_world, visible, gpus_on_node, same_view, want",
    [
        # srun --gpus-per-task=1: each of 4 tasks sees its own one GPU
        ("--gpus-per-task=1", 4, 1, 4, False, [0, 0, 0, 0]),
        # srun --gpu-bind=closest on an 8-GPU, 2-socket node: 8 tasks, each sees its socket's 4
        ("--gpu-bind=closest", 8, 4, 8, False, [0, 1, 2, 3, 0, 1, 2, 3]),
        # gres: 4 tasks, all 4 GPUs visible to each
        ("gres 4 tasks on 4 GPUs", 4, 4, 4, False, [0, 1, 2, 3]),
        # CUDA_VISIBLE_DEVICES=MIG-<uuid> per task (a MIG slice is one device to CUDA)
        ("MIG UUIDs, one per task", 2, 1, None, False, [0, 0]),
        # CUDA_VISIBLE_DEVICES=GPU-<uuid>,GPU-<uuid> for 2 ranks of --nproc 2
        ("GPU UUIDs, --nproc 2", 2, 2, None, True, [0, 1]),
        # --nproc beyond the GPUs: every rank sees both, 4 ranks cannot have one each
        ("--nproc 4 on 2 GPUs", 4, 2, None, True, "4 ranks on this node but 2 visible GPU"),
        # more tasks than SLURM gave the node GPUs
        ("4 tasks, 2 GPUs on the node", 4, 1, 2, False, "SLURM gave it 2 GPU"),
    ],
)
def test_each_rank_picks_its_gpu_from_its_own_view(layout, local_world, visible, gpus_on_node, same_view, want):
    pick = lambda r: dist.gpu_index(r, local_world, visible, gpus_on_node, same_view)  # noqa: E731
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=want):
            pick(0)
    else:
        assert [pick(r) for r in range(local_world)] == want, layout


def test_two_ranks_on_one_physical_gpu_are_found_by_uuid():
    # gpu-bind=closest, 4 tasks on each of 2 nodes: distinct per host, the same UUIDs across hosts are fine
    ok = [(h, f"GPU-{h}-{i}") for h in ("n1", "n2") for i in range(4)]
    assert dist.shared_gpus(ok) == []
    # two tasks whose views overlap (a map_gpu typo): ranks 1 and 3 on n1 land on one GPU
    bad = [("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-c"), ("n1", "GPU-b")]
    assert dist.shared_gpus(bad) == [("n1", "GPU-b", [1, 3])]


@pytest.mark.parametrize(
    "capability, archs, ok",
    [
        ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # V100 on cu130 torch 2.14
        ((6, 0), ["sm_75", "sm_80", "sm_90"], False),  # P100
        ((8, 6), ["sm_80", "sm_90"], True),  # A40/A6000: sm_80 cubins run on 8.6
        ((9, 0), ["sm_90a"], True),  # H100/H200: arch-specific
        ((8, 9), ["sm_90a"], False),
        ((12, 0), ["sm_80", "compute_90"], True),  # PTX the driver compiles for a newer GPU
        ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),  # cu126 builds
        ((10, 0), ["sm_100", "sm_120"], True),
    ],
)
def test_a_gpu_the_wheel_has_no_kernels_for_is_found(capability, archs, ok):
    assert dist.arch_supported(capability, archs) is ok


def test_an_unsupported_gpu_is_refused_before_any_rank_starts(monkeypatch):
    """select_device (check_run calls it for local rank 0 before --nproc spawns) names the GPU and a wheel."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device before the arch check"))
    with pytest.raises(ConfigError, match=r"GPU 0 \(Tesla V100-SXM2-32GB\) is sm_70.*kernels for sm_75.*cu126"):
        dist.select_device(dist.DistEnv(), "auto")


def test_nccl_socket_ifname_is_translated_for_gloo_on_this_hosts_interfaces():
    """NCCL's forms against this machine's real interfaces (here: lo and eth0)."""
    interfaces = dist.ipv4_interfaces()
    others = [i for i in interfaces if not i.startswith("lo")]
    assert "lo" in interfaces and others, interfaces
    nic = others[0]
    table = {
        nic.rstrip("0123456789"): nic,  # a prefix, as NCCL reads it ("eth" -> eth0)
        f"={nic}": nic,  # exact
        "^docker0,lo": nic,  # exclusions: anything else
        "^lo": nic,  # not loopback (copying the text over bound gloo to lo)
        "no-such-nic": None,  # "ib" on a host without InfiniBand: gloo is left to pick
        "lo": "lo",  # named explicitly
        f"^={nic}": others[1] if len(others) > 1 else None,  # everything but it
    }
    for spec, want in table.items():
        assert dist.nccl_ifname_to_gloo(spec, interfaces) == want, spec


def test_gloo_binds_to_the_interface_nccls_spec_selects(monkeypatch):
    """A real gloo group (one rank, TCP rendezvous) built with NCCL_SOCKET_IFNAME in NCCL's own syntax."""
    from torch import distributed as tdist

    from cxrdist.engine.spawn import free_port

    interfaces = dist.ipv4_interfaces()
    for spec in ("^docker0,lo", "eth", "^lo"):
        monkeypatch.setenv("NCCL_SOCKET_IFNAME", spec)
        monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
        dist.gloo_interface()
        chosen = os.environ.get("GLOO_SOCKET_IFNAME")
        assert chosen == dist.nccl_ifname_to_gloo(spec, interfaces) and chosen != "lo", spec
        if chosen is None:
            continue
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            t = torch.ones(1)
            tdist.all_reduce(t)
            assert t.item() == 1.0
        finally:
            tdist.destroy_process_group()


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
    monkeypatch.setattr(dist, "driver_version", lambda: "535.104")
    reason = dist.cuda_unavailable_reason()
    if torch.version.cuda:
        assert f"CUDA {torch.version.cuda}" in reason and "driver 535.104" in reason


def test_cxrdist_train_device_cuda_without_a_gpu_is_one_line(tiny_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA works on this host")
    proc = runs.in_process(
        "train", "--shards", tiny_shards["shards"], "--out", tmp_path / "r", *TINY[:-2], "--device", "cuda"
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
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
def srun_step_vars(tasks: int) -> dict:
    return dict(
        SLURM_PROCID="0",
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_NTASKS=str(tasks),
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_STEP_NODELIST="localhost",
        SLURM_JOB_NODELIST="localhost",
    )


def srun_step_env(tasks: int) -> dict:
    return clean_env(**srun_step_vars(tasks))


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


def test_nproc_inside_a_multi_task_srun_step_is_refused(tiny_shards, tmp_path, monkeypatch):
    for k in [*RANK_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(k, raising=False)
    for k, v in srun_step_vars(4).items():
        monkeypatch.setenv(k, v)
    proc = runs.in_process(
        "train",
        "--shards",
        tiny_shards["shards"],
        "--out",
        tmp_path / "x",
        "--backend",
        "ddp",
        "--nproc",
        "2",
        *TINY,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
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
    from cxrdist.data import World, train_loader
    from cxrdist.shards.shardset import ShardSet

    def keys(loader):
        return [k for b in loader for k in b["key"]]

    shards = ShardSet.open(tiny_shards["shards"])
    world = World.of(rank=0, world_size=1, workers=2, seed=3, micro_batch=8)
    kept = train_loader(shards, world, persistent=True)
    first = keys(kept)
    pool = kept.dataloader()
    for epoch, start in ((1, 0), (2, 3)):
        fresh = train_loader(shards, world.at_epoch(epoch), start_step=start)
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


# --------------------------------------------------------------------------------------------------------
# fixed before, tested here: DeepSpeed's device, the CUDA RNG of this rank's device, cudnn.benchmark
# --------------------------------------------------------------------------------------------------------
def test_deepspeed_takes_the_device_cxrdist_chose_not_local_rank(monkeypatch):
    """srun --gpus-per-task=1: local rank 3 sees one GPU, index 0; DeepSpeed must be told 0, not 3."""
    from cxrdist.config import TrainConfig
    from cxrdist.engine.backends.deepspeed import DeepSpeedBackend

    monkeypatch.setenv("LOCAL_RANK", "3")
    env = dist.DistEnv(rank=3, world_size=4, local_rank=3, local_world_size=4)
    backend = DeepSpeedBackend(TrainConfig(), env, torch.device("cuda", 0))
    assert backend.ds_args().device_rank == 0
    backend = DeepSpeedBackend(TrainConfig(), env, torch.device("cuda", 2))  # --gpu-bind=closest: 3 % 4 -> ...
    assert backend.ds_args().device_rank == 2


def test_the_rng_state_is_this_ranks_device_only(monkeypatch):
    """A requeued task may see one GPU where the first run saw four: only its own device's state is kept and
    restored, on whatever index the device has now."""
    from cxrdist.engine import checkpoint as ckpt

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or torch.full((4,), d))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("set", d, s.tolist())))
    state = ckpt.rng_state()
    assert torch.equal(state["cuda"], torch.full((4,), 3)) and calls == [("get", 3)]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ckpt.set_rng_state(state)
    assert calls[-1] == ("set", 0, [3, 3, 3, 3])


@pytest.mark.parametrize("flag, device, want", [(True, "cuda", True), (False, "cuda", False), (True, "cpu", False)])
def test_cudnn_benchmark_is_set_on_cuda_and_off_with_the_flag(flag, device, want, monkeypatch):
    from cxrdist.config import TrainConfig
    from cxrdist.engine.backends.single import SingleBackend

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not flag)  # the opposite first: a CPU run leaves it
    cfg = TrainConfig()
    cfg.run.cudnn_benchmark = flag
    SingleBackend(cfg, dist.DistEnv(), torch.device(device))
    assert torch.backends.cudnn.benchmark is want


def test_evaluation_runs_without_cudnn_benchmark_and_restores_it(monkeypatch):
    """Evaluation batches end short (a shape per worker): no re-tuning for them, the training setting after."""
    from cxrdist.engine.evaluation import predict_loader

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return super().forward(x.flatten(1))

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    batch = {"image": torch.zeros(3, 1, 1, 2), "labels": torch.zeros(3, 2), "mask": torch.ones(3, 2)}
    batch |= {"age": torch.zeros(3), "sex": torch.zeros(3), "key": ["a", "b", "c"]}
    out = predict_loader(Probe(2, 2), [batch], lambda b: b["image"], contextlib.nullcontext, 2)
    assert seen == [False] and torch.backends.cudnn.benchmark is True and out["prob"].shape == (3, 2)


def test_backends_record_the_precision_gradients_are_reduced_in():
    from cxrdist.config import TrainConfig
    from cxrdist.engine.backends import get_backend

    def backend(name, precision="bf16", world=2, **dist_opts):
        cfg = TrainConfig()
        cfg.dist.backend, cfg.run.precision, cfg.run.out = name, precision, "x"
        for k, v in dist_opts.items():
            setattr(cfg.dist, k, v)
        return get_backend(cfg, dist.DistEnv(world_size=world), torch.device("cpu"))

    assert backend("ddp").reduce_precision() == "fp32"
    assert backend("fsdp").reduce_precision() == "fp32"
    ds = backend("deepspeed", zero_stage=2)
    assert ds.reduce_precision() == "fp32"  # DeepSpeed's own default would reduce Conv/Linear grads in bf16
    assert ds.ds_config()["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    assert backend("single", world=1).reduce_precision() == "none (one device)"


def test_provenance_names_versions_hardware_and_the_slurm_job(monkeypatch):
    from cxrdist import provenance

    v = provenance.versions()
    assert v["torch"] == torch.__version__ and v["python"] and v["timm"] and v["deepspeed"]
    assert v["git_commit"] is None or len(v["git_commit"].removesuffix("+dirty")) == 40
    assert provenance.hardware("cpu")["cpu"] == dist.device_name(torch.device("cpu"))
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_PARTITION": "gpu", "SLURM_RESTART_COUNT": "1"}
    assert provenance.slurm(job) == {"job_id": "4242", "partition": "gpu", "restart_count": "1"}
    assert provenance.slurm({}) is None
    from cxrdist.report import provenance_line

    line = provenance_line(
        {
            "versions": v,
            "hardware": {"gpu07": {"gpus": [{"name": "NVIDIA H200", "capability": "9.0"}] * 8, "driver": "580.1"}},
            "slurm": provenance.slurm(job),
            "reduce_precision": "fp32",
        }
    )
    assert f"torch {torch.__version__}" in line and "gpu07: 8 x NVIDIA H200 (sm 9.0), driver 580.1" in line
    assert "SLURM job 4242 (gpu)" in line and "gradients reduced in fp32" in line
