"""Shared pytest fixtures: the registry of fixture modules, and the SLURM cluster.

Fixture modules live next to this file and are registered in ``pytest_plugins`` below (data sets:
``fixtures_data.py``). Defined here:

``slurm_cluster`` (session): a real, throw-away SLURM cluster on this host (slurm/cluster.sh: slurmctld +
two slurmd, node1/node2, loopback only). Installs Debian's slurm-wlm + munge when missing (what
``make slurm-deps`` does). In CI (``CI=true``) a cluster that cannot be installed or started fails the
tests; elsewhere it skips them with the reason. A cluster already running in the same state dir is reused
and left running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist the test workers share the machine's cores, which cxrdist's layout rules cannot see: a
# single rank would take every core with ACTIVE (spinning) OpenMP threads while the other worker's ranks run,
# and two workers' processes then spin against each other (the gpu-check dry run took 300 s a test in
# parallel, 100-120 s alone). One torch thread per process and passive waits: the cores go to the work.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("CXRDIST_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = ["fixtures_data", "fixtures_runs"]  # shards; reference runs


# --- honest markers ------------------------------------------------------------------------------------
# fixtures that train (or start a cluster job): a test using one is in the second tier, `slow`
TRAINING_FIXTURES = {"tiny_run", "straight_run", "nih_run", "ddp_reference"}


# the longest tests of the second tier (each a whole gpu-check dry run): started first, so that the two
# pytest-xdist workers end together instead of one of them finishing a long test alone (longest first)
FIRST = ("tests/test_gpucheck.py::test_gpu_check_dry_run",)


def pytest_collection_modifyitems(config, items):
    """`make test` runs the fast tier first on the word of the markers; a test that trains without saying so
    would make that tier slow again, so it is an error at collection. Under pytest-xdist the tests that use
    the one SLURM cluster run in one group, on one worker (``--dist loadgroup``); the ``FIRST`` tests start
    first."""
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest in file order
    for item in items:
        trains = TRAINING_FIXTURES & set(getattr(item, "fixturenames", ()))
        if trains and not item.get_closest_marker("slow"):
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(sorted(trains))} (it trains): mark it slow")
        if item.get_closest_marker("slurm") or "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


# --- SLURM ---------------------------------------------------------------------------------------------
@dataclass
class SlurmCluster:
    dir: Path  # state dir: slurm.conf, logs, spool, jobcomp.txt
    conf: Path  # SLURM_CONF
    bin: Path  # first on PATH: the sacct shim
    env: dict = field(default_factory=dict)  # SLURM_CONF and PATH, as set in os.environ
    started_here: bool = True

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, check=check, capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env}
        )

    def job_state(self, job_id: str | int) -> str:
        """Current state of a job (``squeue -t all``; '' once the controller has forgotten it)."""
        out = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False).stdout
        return out.strip().splitlines()[0] if out.strip() else ""

    def wait_state(self, job_id: str | int, states: str | tuple[str, ...], timeout: float = 60) -> str:
        states = (states,) if isinstance(states, str) else states
        end = time.monotonic() + timeout
        state = ""
        while time.monotonic() < end:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s, wanted {states}")

    def release(self, job_id: str | int, timeout: float = 60) -> None:
        """Start a requeued job now instead of after SLURM's ~120 s requeue delay.

        Not at once: the nodes revoke the old run's credential with a one-second timestamp, and a new launch
        in the same second fails with "Job credential revoked" (the job ends FAILED).
        """
        self.wait_state(job_id, ("PENDING", "REQUEUED"), timeout=timeout)
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def _fail_or_skip(msg: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def _ensure_slurm_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _fail_or_skip(
            "SLURM is not installed and cannot be installed here (needs root + apt): run `make slurm-deps` as root"
        )
    proc = subprocess.run(["make", "-s", "-C", str(REPO), "slurm-deps"], capture_output=True, text=True)
    if proc.returncode or not shutil.which("slurmctld"):
        _fail_or_skip(f"`make slurm-deps` failed (rc={proc.returncode}): {proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="session")
def slurm_cluster():
    _ensure_slurm_installed()
    state = Path(os.environ.get("CXRDIST_SLURM_DIR", "/tmp/cxrdist-slurm"))
    script = REPO / "slurm" / "cluster.sh"
    already = subprocess.run([str(script), "status", str(state)], capture_output=True, text=True).returncode == 0
    proc = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=60)
    if proc.returncode:
        _fail_or_skip(f"slurm/cluster.sh start failed: {proc.stderr.strip()[-1500:]}")
    cluster = SlurmCluster(dir=state, conf=state / "slurm.conf", bin=state / "bin", started_here=not already)
    cluster.env = {"SLURM_CONF": str(cluster.conf), "PATH": f"{cluster.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cluster.started_here:
            subprocess.run([str(script), "stop", str(state)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def mount_disk(tmp_path):
    """``mount_disk(mb)``: a real file system of that size (tmpfs; mounting needs root, as on CI), for what
    a full disk does. Unmounted after the test."""
    mounts = []

    def mount(mb: int) -> Path:
        mnt = tmp_path / f"disk-{len(mounts)}"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(mnt)], capture_output=True)
        if proc.returncode:
            _fail_or_skip(f"cannot mount a {mb} MB tmpfs (root needed): {proc.stderr.decode().strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(mount_disk) -> Path:
    return mount_disk(12)
