"""cxrdist.launch / launchers/submit.py against the throw-away SLURM cluster and the local executor.

Tiny runs: the plumbing recipe (tests/runs.py) on CPU ranks, 2 epochs of ~15 steps. Timings are printed
(pytest -s).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cxrdist import launch
from cxrdist.config import parse_train_argv

import runs
from runs import records

REPO = Path(__file__).resolve().parents[1]
TINY = [*runs.TINY, "--epochs", "2"]
DDP_2x1 = [
    "--nodes",
    "2",
    "--gpus",
    "0",
    "--tasks-per-node",
    "1",
    "--backend",
    "ddp",
    "--cluster",
    "slurm",
    "--time",
    "20",
    "--signal-delay",
    "30",
]


def launch_args(*argv: str, log_dir: Path):
    return launch.get_args_parser().parse_args([*argv, "--log-dir", str(log_dir / "%j")])


def train_cfg(shards: Path, out: Path, *extra: str):
    return parse_train_argv(["--shards", str(shards), "--out", str(out), *TINY, *extra])


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# hang guards, not speed checks: a loaded 2-core machine runs the 2-node job at 1-3 img/s per rank
def run_to_end(sub, timeout: float = 300) -> tuple[int, str]:
    out = io.StringIO()
    rc = launch.wait(sub, stream=True, out=out, poll_s=0.5, timeout_s=timeout)
    return rc, out.getvalue()


# --------------------------------------------------------------------------------------------------
# no cluster needed
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_controller(monkeypatch, tmp_path):
    """srun/sbatch may be installed, but no controller answers (SLURM_CONF names a missing file)."""
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-such-slurm.conf"))


def test_auto_without_a_controller_is_local_and_checks_are_one_line(no_controller, tmp_path):
    args = launch_args("--gpus", "0", "--backend", "ddp", log_dir=tmp_path)
    assert launch.resolve_cluster(args) == "local"
    cfg = train_cfg(tmp_path, tmp_path / "run")
    assert (
        launch.preflight(launch_args("--gpus", "0", "--backend", "dp", log_dir=tmp_path), cfg)
        == "dp needs >= 2 GPUs per node; the target has 0"
    )
    assert (
        launch.preflight(launch_args("--gpus", "0", "--backend", "ddp", "--tasks-per-node", "2", log_dir=tmp_path), cfg)
        is None
    )
    assert "local executor runs on this machine only" in launch.preflight(
        launch_args("--nodes", "2", "--gpus", "0", log_dir=tmp_path), cfg
    )
    assert "--signal-delay" in launch.preflight(
        launch_args("--time", "2", "--signal-delay", "120", log_dir=tmp_path), cfg
    )
    with pytest.raises(launch.LaunchError, match="no SLURM controller answers"):
        launch.resolve_cluster(launch_args("--cluster", "slurm", log_dir=tmp_path))


def test_submit_py_bad_input_is_one_line_exit_2(no_controller, tmp_path):
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "none.conf")}
    for argv, message in (
        (["--gpus", "0", "--backend", "dp"], "dp needs >= 2 GPUs per node"),
        (["--gpus", "0", "--", "--backend", "ddp"], "--backend goes before `--`"),
        (["--gpus", "0", "--", "--nproc", "2"], "--nproc is `cxrdist train`'s own"),
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "launchers" / "submit.py"), *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("submit: error: ") and message in proc.stderr


def test_checkpoint_resubmits_the_same_run_with_resume(tmp_path):
    job = launch.TrainJob(train_cfg(tmp_path, tmp_path / "run"), threads=2)
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, launch.TrainJob) and again.cfg.run.resume and not job.cfg.run.resume
    assert again.cfg.run.out == job.cfg.run.out and again.threads == 2 and delayed.args == ()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_executor_runs_cpu_ranks_for_gpus_with_one_warning(
    no_controller, tiny_shards, tmp_path, capsys, monkeypatch
):
    """`--gpus 2` on a host with neither SLURM nor GPUs: 2 local CPU ranks, a one-line warning, --wait -> 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    rc = launch.main(
        [
            "--nodes",
            "1",
            "--gpus",
            "2",
            "--backend",
            "ddp",
            "--wait",
            "--log-dir",
            str(tmp_path / "logs" / "%j"),
            "--",
            "--shards",
            str(tiny_shards["shards"]),
            "--out",
            str(run),
            *TINY,
            "--epochs",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "2 CPU rank(s)" in warnings[0]
    assert "submitted job" in captured.out and "(local, ddp" in captured.out and str(run) in captured.out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["device"] == "cpu"
    assert {r["rank"] for r in records(run, 0, "step") + records(run, 1, "step")} == {0, 1}
    assert not (tmp_path / "logs" / "%j").exists()  # submitit's local controller leaves it; wait() tidies


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_local_failing_job_surfaces_the_ranks_error(no_controller, tiny_shards, tmp_path):
    args = launch_args(
        "--gpus", "0", "--tasks-per-node", "2", "--backend", "ddp", "--cluster", "local", log_dir=tmp_path / "logs"
    )
    sub = launch.submit(args, train_cfg(tiny_shards["shards"], tmp_path / "run", "--precision", "fp16"))
    rc, log = run_to_end(sub, timeout=100)
    assert rc == 1 and "FAILED" in log and "rank 0 raised: " in log and "--precision fp16 needs a GPU" in log, log


# --------------------------------------------------------------------------------------------------
# the SLURM cluster
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_reference(slurm_cluster, tiny_shards, tmp_path_factory):
    """One uninterrupted 2-node x 1-task DDP job, both nodes streaming the shards from an HTTP server (on
    loopback here): no shard folder in the job. Also the reference weights of the preemption test, which
    reads the same shards from the folder (streamed and local reads are the same samples, test_streaming)."""
    import shutil

    from servers import http_server

    tmp = tmp_path_factory.mktemp("ddp-ref")
    shutil.copytree(tiny_shards["shards"], tmp / "www" / "shards")
    with http_server(tmp / "www") as (base, faults, _):
        t0 = time.time()
        cfg = train_cfg(f"{base}/shards", tmp / "run")
        sub = launch.submit(launch_args(*DDP_2x1, log_dir=tmp / "logs"), cfg)
        rc, log = run_to_end(sub)
    steps = records(sub.run_dir, 0, "step")
    first = steps[0]["time"] - t0 if steps else float("nan")
    print(
        f"\n[timing] DDP 2x1 job {sub.job_id}: submission -> first step {first:.1f} s, "
        f"whole run {time.time() - t0:.1f} s"
    )
    return {"sub": sub, "rc": rc, "log": log, "requests": list(faults.requests)}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ddp_across_two_nodes_streaming_from_an_http_server(ddp_reference, tiny_shards):
    sub, rc, log = ddp_reference["sub"], ddp_reference["rc"], ddp_reference["log"]
    assert rc == 0, log
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["config"]["data"]["shards"].startswith("http://127.0.0.1:")
    manifest = json.loads((tiny_shards["shards"] / "manifest.json").read_text())
    assert summary["test"]["n"] == manifest["splits"]["test"]["samples"]  # exact-once over the stream
    tars = {name for name, _ in ddp_reference["requests"] if name.endswith(".tar")}
    assert tars == {s["name"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ddp_across_two_nodes(ddp_reference):
    sub, rc, log = ddp_reference["sub"], ddp_reference["rc"], ddp_reference["log"]
    assert rc == 0, log
    assert sub.executor == "slurm" and sub.plan.world_size == 2
    assert "RUNNING on node[1-2]" in log and "done (completed, 2 epoch(s)" in log
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["nodes"] == 2
    assert summary["hosts"] == ["node1", "node2"]
    assert {r["host"] for r in records(sub.run_dir, 0, "step")} == {"node1"}
    assert {r["host"] for r in records(sub.run_dir, 1, "step")} == {"node2"}
    assert (sub.log_dir / f"{sub.job_id}_submission.sh").read_text().count("#SBATCH --requeue") == 1


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_deepspeed_two_tasks_on_one_node(slurm_cluster, tiny_shards, tmp_path):
    args = launch_args(
        "--nodes",
        "1",
        "--gpus",
        "0",
        "--tasks-per-node",
        "2",
        "--backend",
        "deepspeed",
        "--cluster",
        "slurm",
        "--time",
        "20",
        "--signal-delay",
        "30",
        log_dir=tmp_path / "logs",
    )
    sub = launch.submit(args, train_cfg(tiny_shards["shards"], tmp_path / "run", "--epochs", "1"))
    rc, log = run_to_end(sub, timeout=420)  # DeepSpeed JIT-builds its CPU comm op on first use (minutes)
    assert rc == 0, log
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["backend"] == "deepspeed" and summary["status"] == "completed" and summary["world_size"] == 2
    assert len({r["host"] for r in records(sub.run_dir, 0, "step") + records(sub.run_dir, 1, "step")}) == 1


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_slurm_checks_before_submission(slurm_cluster, tmp_path):
    cfg = train_cfg(tmp_path, tmp_path / "run")
    cases = {
        ("--gpus", "2", "--backend", "ddp"): "partition 'debug' has no GPUs",
        ("--gpus", "0", "--partition", "gpu"): "unknown partition 'gpu'; this cluster has: debug",
        ("--gpus", "0", "--nodes", "3"): "partition 'debug' has 2 node(s)",
        ("--gpus", "0", "--tasks-per-node", "2", "--cpus-per-task", "2"): "exceed the 2 CPUs of a node",
        ("--gpus", "0", "--backend", "single", "--nodes", "2"): "single is one process on one device",
    }
    for argv, message in cases.items():
        reason = launch.preflight(launch_args(*argv, "--cluster", "slurm", log_dir=tmp_path), cfg)
        assert reason and message in reason, (argv, reason)
    assert launch.preflight(launch_args(*DDP_2x1, log_dir=tmp_path), cfg) is None
    assert launch.resolve_cluster(launch_args("--cluster", "auto", log_dir=tmp_path)) == "slurm"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cancelled_job_ends_wait_promptly(slurm_cluster, tiny_shards, tmp_path):
    sub = launch.submit(
        launch_args(*DDP_2x1, log_dir=tmp_path / "logs"),
        train_cfg(tiny_shards["shards"], tmp_path / "run", "--epochs", "50"),
    )
    slurm_cluster.wait_state(sub.job_id, "RUNNING", timeout=30)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", sub.job_id)
    rc, log = run_to_end(sub, timeout=60)
    assert rc == 1 and "CANCELLED" in log, log
    assert time.monotonic() - t0 < 15, "wait() must not sit out submitit's result timeout"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_failing_job_surfaces_the_ranks_error(slurm_cluster, tiny_shards, tmp_path):
    # fp16 needs a GPU: the launcher cannot know the nodes' devices, the job's backend check refuses
    sub = launch.submit(
        launch_args(*DDP_2x1, log_dir=tmp_path / "logs"),
        train_cfg(tiny_shards["shards"], tmp_path / "run", "--precision", "fp16"),
    )
    rc, log = run_to_end(sub, timeout=90)
    assert rc == 1, log
    # every rank refuses; whichever the launcher reads first is named
    assert "FAILED" in log and re.search(r"rank \d raised: ", log) and "--precision fp16 needs a GPU" in log, log


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preemption_requeues_and_resumes(slurm_cluster, tiny_shards, tmp_path, ddp_reference):
    """USR2 to every task mid-epoch -> one checkpoint, requeue, resume: each epoch once, restarts >= 1, and
    the final weights match the uninterrupted run's (module fixture ddp_reference, same config)."""
    import torch

    sub = launch.submit(
        launch_args(*DDP_2x1, log_dir=tmp_path / "logs"), train_cfg(tiny_shards["shards"], tmp_path / "run")
    )
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.update(zip(("rc", "log"), run_to_end(sub, timeout=200))))
    waiter.start()
    wait_for(
        lambda: [r for r in records(sub.run_dir, 0, "step") if r["epoch"] == 0 and r["step"] >= 3],
        90,
        "a few steps of epoch 1",
    )
    t0 = time.time()
    slurm_cluster.run("scancel", "--signal=USR2", sub.job_id)  # every step's tasks: both ranks
    slurm_cluster.release(sub.job_id, timeout=60)
    waiter.join()
    rc, log = waited["rc"], waited["log"]
    print(log)
    assert rc == 0, log
    resumed = records(sub.run_dir, 0, "resume")
    preempted = records(sub.run_dir, 0, "preempted")
    assert len(resumed) == 1 and len(preempted) == 1, log
    print(
        f"\n[timing] preemption round trip (USR2 -> checkpoint -> requeue -> released -> resumed): "
        f"{resumed[0]['time'] - t0:.1f} s (includes the 2 s release delay)"
    )
    assert "requeued: waiting to restart" in log
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] >= 1
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert [r["epoch"] for r in records(sub.run_dir, 0, "epoch")] == [0, 1]
    ref = torch.load(ddp_reference["sub"].run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(sub.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert ref.keys() == got.keys()

    def worst(keys) -> float:
        return max((ref[k].double() - got[k].double()).abs().max().item() for k in keys)

    params = [k for k in ref if ref[k].is_floating_point() and "running_" not in k]
    assert worst(params) < 1e-5, f"resumed weights differ from the uninterrupted run's by up to {worst(params):g}"
    # DDP runs on rank 0's BatchNorm statistics (broadcast at every forward) and checkpoints keep exactly
    # those, so the extra mid-epoch checkpoint of a preempted run changes nothing there either
    stats = [k for k in ref if "running_" in k]
    assert worst(stats) < 1e-5, f"resumed BN statistics differ by up to {worst(stats):g}"


# --------------------------------------------------------------------------------------------------
# the sbatch templates (no submitit)
# --------------------------------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_sbatch_template_runs_ddp_on_two_nodes_and_requeues_itself(slurm_cluster, tiny_shards, tmp_path):
    run = tmp_path / "run"
    job = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=20",
        f"--output={tmp_path}/%x-%j.out",
        str(REPO / "slurm" / "train.sbatch"),
        "--backend",
        "ddp",
        "--shards",
        str(tiny_shards["shards"]),
        "--out",
        str(run),
        *[a for a in TINY if a not in ("--device", "cpu")],  # the template picks it: no GPUs in the step
    ).stdout.strip()
    log = tmp_path / f"cxrdist-{job}.out"
    wait_for(
        lambda: [r for r in records(run, 0, "step") if r["epoch"] == 0 and r["step"] >= 3], 90, "a few steps of epoch 1"
    )
    slurm_cluster.run("scancel", "--signal=USR2", job)
    slurm_cluster.release(job, timeout=60)
    state = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=150)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "preempted after a checkpoint: requeueing" in text and "restart 1:" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts"] == 1 and summary["hosts"] == ["node1", "node2"]
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
    assert summary["config"]["run"]["device"] == "cpu"  # --gpus-per-node=0: the template passes --device cpu


def test_layout_tasks_follow_each_backends_declared_layout():
    """The launcher's task/GPU rules come from the backend's Layout, not from its name."""
    from cxrdist.engine.backends import layout_of

    one, dp, per_gpu = layout_of("single"), layout_of("dp"), layout_of("fsdp")
    assert launch.layout_tasks("single", one, 1, 4, None, cpu_only=False) == (
        1,
        1,
        "note: --backend single uses 1 of the 4 GPUs asked for",
    )
    assert launch.layout_tasks("single", one, 1, 0, None, cpu_only=True) == (1, 0, None)
    assert launch.layout_tasks("dp", dp, 1, 4, None, cpu_only=False) == (1, 4, None)
    assert launch.layout_tasks("fsdp", per_gpu, 2, 8, None, cpu_only=False) == (8, 8, None)
    assert launch.layout_tasks("fsdp", per_gpu, 2, 0, 3, cpu_only=True) == (3, 0, None)
    for args, message in (
        (("dp", dp, 1, 1, None, False), "dp needs >= 2 GPUs per node; --gpus 1 asks for 1"),
        (("dp", dp, 1, 0, None, True), "dp needs >= 2 GPUs per node; the target has 0"),
        (("dp", dp, 2, 4, None, False), "dp is one process on one node"),
        (("single", one, 2, 1, None, False), "single is one process on one device"),
        (("single", one, 1, 1, 2, False), "single runs one task: drop --tasks-per-node"),
        (("fsdp", per_gpu, 1, 4, 2, False), "fsdp runs one task per GPU: --tasks-per-node 2 does not match"),
    ):
        with pytest.raises(launch.LaunchError, match=message):
            launch.layout_tasks(*args[:5], cpu_only=args[5])
