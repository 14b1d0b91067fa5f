"""The launcher's planning rules one by one, against real-shaped `sinfo` / `scontrol ping` text, and the
launcher package running from a wheel install (no checkout on sys.path, another working directory)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cxrdist import dist
from cxrdist.config import TrainConfig
from cxrdist.launch import cluster, plan
from cxrdist.launch.args import LaunchError, get_args_parser, with_defaults
from cxrdist.launch.submit import slurm_parameters

REPO = Path(__file__).resolve().parents[1]

# `sinfo -h -o "%P|%D|%c|%G|%l"` on a mixed cluster: two node types in `gpu`, a CPU partition, a debug one
SINFO = """\
gpu*|12|64|gpu:a100:8(S:0-1)|2-00:00:00
gpu*|4|48|gpu:a100:4(S:0)|2-00:00:00
cpu|20|128|(null)|infinite
debug|2|16|gpu:1|30:00
"""


def args(*argv: str) -> argparse.Namespace:
    return get_args_parser().parse_args(list(argv))


def test_parse_sinfo_sums_nodes_and_keeps_the_smallest_node():
    parts = cluster.parse_sinfo(SINFO)
    assert parts["gpu"] == cluster.Partition("gpu", 16, 48, 4, 2880, default=True)
    assert parts["cpu"] == cluster.Partition("cpu", 20, 128, 0, None)
    assert parts["debug"] == cluster.Partition("debug", 2, 16, 1, 30)


@pytest.mark.parametrize(
    "gres, gpus",
    [("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:a100:4,gpu:v100:2", 6), ("(null)", 0), ("mps:100", 0)],
)
def test_gres_gpus(gres, gpus):
    assert cluster.gres_gpus(gres) == gpus


@pytest.mark.parametrize(
    "limit, minutes",
    [("infinite", None), ("UNLIMITED", None), ("30", 30), ("30:00", 30), ("1:00:00", 60), ("2-00:00:00", 2880),
     ("1-02:03:04", 1564)],
)  # fmt: skip
def test_time_limits(limit, minutes):
    assert cluster.minutes(limit) == minutes


def test_scontrol_ping_text():
    assert cluster.ping_up("Slurmctld(primary) at node1 is UP\n")
    assert cluster.ping_up("Slurmctld(primary) at a is UP\nSlurmctld(backup) at b is DOWN\n")
    assert not cluster.ping_up("Slurmctld(primary) at node1 is DOWN\n")


def test_hostlist_expansion():
    assert dist.expand_hostlist("node[1-3,7],gpu01") == ["node1", "node2", "node3", "node7", "gpu01"]
    assert dist.expand_hostlist("gpu[08-10]") == ["gpu08", "gpu09", "gpu10"]
    assert dist.expand_hostlist("single") == ["single"]


def test_visible_gpus():
    assert cluster.visible_count(None, 4) == 4
    assert cluster.visible_count("1,3", 4) == 2
    assert cluster.visible_count("", 4) == 0 and cluster.visible_count("-1", 4) == 0


def test_request_checks():
    cfg = TrainConfig()
    plan.check_request(args(), cfg)
    for argv, message in (
        (["--nodes", "0"], "--nodes must be >= 1, not 0"),
        (["--gpus", "-1"], "--gpus must be >= 0, not -1"),
        (["--time", "0"], "--time must be >= 1, not 0"),
        (["--tasks-per-node", "0"], "--tasks-per-node must be >= 1"),
        (["--time", "2", "--signal-delay", "120"], "is not longer than --signal-delay 120 s"),
    ):
        with pytest.raises(LaunchError, match=message):
            plan.check_request(args(*argv), cfg)


def test_partition_choice_and_fit():
    parts = cluster.parse_sinfo(SINFO)
    assert plan.pick_partition(parts, None).name == "gpu"
    assert plan.pick_partition(parts, "cpu").name == "cpu"
    with pytest.raises(LaunchError, match="unknown partition 'gpux'; this cluster has: cpu, debug, gpu"):
        plan.pick_partition(parts, "gpux")
    with pytest.raises(LaunchError, match="no default partition"):
        plan.pick_partition({"cpu": parts["cpu"]}, None)
    with pytest.raises(LaunchError, match="sinfo lists no partitions"):
        plan.pick_partition({}, None)
    plan.check_partition(parts["gpu"], nodes=16, gpus=4, time_min=2880)
    for p, nodes, gpus, time_min, message in (
        ("gpu", 1, 8, 60, "the nodes of partition 'gpu' have 4 GPUs"),  # the smallest node decides
        ("gpu", 17, 4, 60, "partition 'gpu' has 16 node"),
        ("debug", 1, 1, 31, "exceeds the 30 min limit of partition 'debug'"),
        ("cpu", 1, 1, 60, "partition 'cpu' has no GPUs"),
    ):
        with pytest.raises(LaunchError, match=message):
            plan.check_partition(parts[p], nodes, gpus, time_min)
    plan.check_node_cpus(4, 12, parts["gpu"])
    with pytest.raises(LaunchError, match=r"4 task\(s\) x 13 CPUs per task exceed the 48 CPUs"):
        plan.check_node_cpus(4, 13, parts["gpu"])


def test_local_target_rules():
    assert plan.check_local(1, 0, 0, 1) == []
    assert plan.check_local(1, 2, 2, 2) == []
    assert plan.check_local(1, 4, 0, 4) == [
        "warning: no SLURM controller and no GPU here: running 4 CPU rank(s) locally instead of 4 GPU(s)"
    ]
    with pytest.raises(LaunchError, match="this machine has 2 GPU"):
        plan.check_local(1, 4, 2, 4)
    with pytest.raises(LaunchError, match="multi-node runs need SLURM"):
        plan.check_local(2, 0, 0, 1)


def test_a_whole_plan_on_a_fake_cluster(monkeypatch):
    """plan() strings the rules together: here against the sinfo text above instead of a live sinfo."""
    monkeypatch.setattr(cluster, "slurm_partitions", lambda: cluster.parse_sinfo(SINFO))
    p = plan.plan(args("--nodes", "2", "--gpus", "4", "--backend", "ddp"), TrainConfig(), cluster="slurm")
    assert (p.nodes, p.tasks_per_node, p.gpus_per_node, p.cpus_per_task, p.partition) == (2, 4, 4, 12, "gpu")
    assert p.world_size == 8 and p.threads is None
    one = plan.plan(
        args("--gpus", "1", "--backend", "single", "--partition", "debug", "--time", "20"), TrainConfig(), "slurm"
    )
    assert (one.tasks_per_node, one.gpus_per_node, one.cpus_per_task) == (1, 1, 16)
    params = slurm_parameters(with_defaults(args("--nodes", "2", "--gpus", "4", "--account", "rad")), p)
    assert params["srun_args"] == ["--kill-on-bad-exit=1", "--cpus-per-task=12"]
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["account"]) == (4, 4, "rad")
    assert params["additional_parameters"] == {"requeue": True} and "qos" not in params


def test_a_backend_that_refuses_the_recipe_is_refused_before_a_job_is_queued():
    """compare.py --precision fp16 with fsdp among the backends: preflight names the reason (the sweep lists
    the arm as skipped) instead of a job that fails on the node."""
    fp16 = TrainConfig()
    fp16.run.precision = "fp16"
    on = ("--nodes", "1", "--gpus", "0", "--tasks-per-node", "2", "--cluster", "local")
    reason = plan.preflight(args(*on, "--backend", "fsdp"), fp16)
    assert reason and "--backend fsdp trains in bf16 or fp32" in reason
    assert plan.preflight(args(*on, "--backend", "ddp"), fp16) is None  # its GPU check is the node's


@pytest.mark.slow
def test_the_launcher_runs_from_a_wheel_install(tiny_shards, tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheels.glob("cxrdist-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheel) as z:  # ranges, not pins: a cluster's CUDA torch stays when cxrdist is installed
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = {
        ln.split(":", 1)[1].split(";")[0].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")
    }
    assert {"torch>=2.6", "torchvision>=0.21", "deepspeed>=0.17.2", "timm>=1.0.12"} <= requires, requires
    assert not [r for r in requires if "==" in r and "ruff" not in r], requires
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "SLURM_CONF": str(tmp_path / "none.conf")}
    where = subprocess.run(
        [sys.executable, "-c", "import cxrdist.launch; print(cxrdist.launch.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not the checkout
    argv = ["--cluster", "local", "--gpus", "0", "--backend", "single", "--time", "10", "--wait", "--"]
    argv += ["--shards", tiny_shards["shards"], "--out", "runs/w", "--epochs", "1", "--max-steps", "2"]
    argv += ["--model", "cxrtiny", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
    run = subprocess.run(
        [sys.executable, "-m", "cxrdist.launch", *map(str, argv)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (work / "runs" / "w" / "summary.json").is_file() and "done (completed" in run.stdout
