"""`cxrdist bench loader|pack|step|trainer|eval`: the throughput ratios behind the poster's Table 4, measured here.

- ``loader``: images/s of ONE loader worker (in-process, one torch thread) on a synthetic CheXpert-layout set
  packed at 256 px: raw JPEG decode alone (the ceiling), the shard loader as it feeds a GPU (read, decode,
  collate), the same plus the CPU augmentation at 224, loose JPEG files, and the DICOM source (a synthetic
  MIMIC-CXR DICOM set), and the shard loader without its sha256 check. Goals: shards >= 0.7x raw decode and
  >= 20x DICOM; the sha256 check <= 5% of the loader's time. Then the same shards streamed from loopback
  servers in their own processes (HTTP; S3 through moto's server where the test extra is installed; goals
  >= 0.8x the local path by the wall clock) and from the shard cache after a first pass (>= 0.95x).
- ``pack``: images/s of the packer with 1 and N (= CPU count) workers, and the scaling.
- ``step``: training-step throughput per backend (cxrdist.engine.benchstep).
- ``trainer``: the trainer's steady-state images/s against a bare loop (goal >= 0.85x), same everything.
- ``eval``: seconds `cxrdist eval` spends scoring a MIMIC-test-sized split (5,159 images, 14 labels, 1,000
  patient-bootstrap replicates, subgroups) once its predictions are in (goal <= 30 s).

``run(what, out=None, quick=False)`` returns the result dict and writes it as JSON to ``out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cxrdist import log
from cxrdist.dist import cpu_count

# (ratio, at least, at most): the sha256 check may cost the loader at most 5% (else it becomes a flag)
GOALS = {"shards_vs_raw": (0.7, None), "shards_vs_dicom": (20.0, None), "sha256_cost": (None, 0.05)}
# streamed from servers on loopback (their own processes: their CPU time is not the loader's)
STREAM_GOALS = {"http_vs_local": (0.8, None), "s3_vs_local": (0.8, None), "cached_vs_local": (0.95, None)}

DICOM_SIZE = 2048  # the DICOM arm's long side: MIMIC-CXR's DICOMs are ~2500 x 3000 16-bit


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _best_rates(fns: dict[str, Callable[[], int]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Images/s of each ``fn`` (it returns the images it handled), best of ``repeats`` interleaved rounds.

    Two clocks: this process's CPU time (what one loader worker can deliver, steady on a shared machine;
    the measures run in-process on one thread, so CPU time is the worker's time) and the wall clock.
    """
    cpu = {k: 0.0 for k in fns}
    wall = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            n = fn()
            cpu[k] = max(cpu[k], n / max(time.process_time() - c, 1e-9))
            wall[k] = max(wall[k], n / (time.perf_counter() - t))
    return cpu, wall


def _count(loader) -> int:
    return sum(len(b["key"]) for b in loader)


def _epochs(loader) -> Callable[[], int]:
    """One more epoch of the same training loader per call, as the trainer runs them (the manifest and the
    location are read once, when the loader is made, not in every measure)."""
    epoch = iter(range(1_000_000))
    return lambda: _count(loader.restart(next(epoch)))


def _prepare(work: Path, quick: bool) -> dict[str, Any]:
    """Synthesise the two sources and pack them into few large shards (one process)."""
    from cxrdist.shards.pack import pack
    from cxrdist.synth import synthesize

    n_jpg, n_dcm = (300, 8) if quick else (1500, 40)
    jpg_root = synthesize(layout="chexpert", out=work / "chexpert", n=n_jpg, size=256, seed=0)
    dcm_root = synthesize(layout="mimic-dicom", out=work / "mimic", n=n_dcm, size=DICOM_SIZE, seed=0)
    common = dict(
        size=256,
        encoding="jpg",
        views="all",
        policy="u-zeros",
        split="patient",
        workers=1,
        samples_per_shard=1000,
        min_shards=1,
        seed=0,
        quiet=True,
    )
    pack(source="chexpert", root=jpg_root, out=work / "shards-jpg", **common)
    pack(source="mimic", root=dcm_root, out=work / "shards-dcm", **common)
    return {"jpg": work / "shards-jpg", "dcm": work / "shards-dcm", "images": {"chexpert": n_jpg, "mimic-dicom": n_dcm}}


@contextlib.contextmanager
def _server(argv: list[str], url: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A server process on 127.0.0.1, up once ``url`` answers; stopped on exit."""
    import urllib.error
    import urllib.request

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (a 404 is an answer)
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _streamed(folder: Path) -> Iterator[dict[str, str]]:
    """The shard folder behind an HTTP server and (moto installed: the test extra) an S3 API server."""
    import shutil

    from cxrdist.engine.spawn import free_port

    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        port = free_port()
        http = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(folder.parent)]
        base = stack.enter_context(_server([*http, str(port)], f"http://127.0.0.1:{port}/"))
        urls["http"] = f"{base}{folder.name}"
        moto = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        if Path(moto).is_file():
            port = free_port()
            endpoint = stack.enter_context(
                _server([moto, "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}/")
            )
            keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            stack.enter_context(_environ({**keys, "AWS_ENDPOINT_URL": endpoint}))
            urls["s3"] = _upload(folder, "cxrdist-bench")
        yield urls


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(folder: Path, bucket: str) -> str:
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(bucket)
    for p in sorted(folder.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{bucket}/{folder.name}/{p.name}")
    return f"s3://{bucket}/{folder.name}"


def bench_loader(quick: bool = False, workdir: str | Path | None = None) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_loader(quick, workdir)
    finally:
        torch.set_num_threads(threads)


def _bench_loader(quick: bool, workdir: str | Path | None) -> dict[str, Any]:
    from cxrdist import imaging
    from cxrdist.data.files import file_eval_loader, file_train_loader
    from cxrdist.data.stream import train_loader, warm_decoders
    from cxrdist.data.transforms import Augment
    from cxrdist.engine.benchstep import goal
    from cxrdist.shards.shardset import ShardSet
    from cxrdist.shards.tario import iter_shard

    repeats = 5 if quick else 3  # quick: short measures, so more rounds to take the best of
    bs = 32
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-", dir=workdir) as tmp:
        data = _prepare(Path(tmp), quick)
        jpg, dcm = ShardSet.open(data["jpg"]), ShardSet.open(data["dcm"])  # each read once, as a run reads it
        jpegs = [m["jpg"] for s in jpg.shards("train") for _, _, m in iter_shard(s)]
        warm_decoders()

        def raw() -> int:
            for b in jpegs:
                imaging.decode(b, "jpg")
            return len(jpegs)

        world = _world(bs)
        aug = Augment(224, train=True)
        rates, wall = _best_rates(
            {
                "raw_decode_ips": raw,
                "shards_ips": _epochs(train_loader(jpg, world)),  # every epoch hashed
                "shards_unhashed_ips": _epochs(train_loader(jpg, world, check_sha256=False)),
                "shards_cpu_aug_ips": lambda: _count(train_loader(jpg, world, augment=aug)),
                "jpeg_files_ips": lambda: _count(file_train_loader(jpg, world, "jpeg", persistent=False)),
            },
            repeats,
        )
        # the DICOM arm: every image of the (small, slow) DICOM set once, in eval order
        dicom_cpu, dicom_wall = _best_rates(
            {"dicom_ips": lambda: _count(file_eval_loader(dcm, "train", _world(4), "dicom"))}, 1
        )
        rates.update(dicom_cpu)
        wall.update(dicom_wall)
        stream_rates, stream_wall = _bench_streamed(data["jpg"], Path(tmp) / "cache", world, repeats)
        rates.update(stream_rates)
        wall.update(stream_wall)
    ratios = {
        "shards_vs_raw": rates["shards_ips"] / rates["raw_decode_ips"],
        "shards_vs_dicom": rates["shards_ips"] / rates["dicom_ips"],
        "shards_vs_jpeg_files": rates["shards_ips"] / rates["jpeg_files_ips"],
        "cpu_aug_cost": rates["shards_cpu_aug_ips"] / rates["shards_ips"],
        "sha256_cost": 1 - rates["shards_ips"] / rates["shards_unhashed_ips"],
    }
    goals = dict(GOALS)
    for arm, ratio in (("shards_http_ips", "http_vs_local"), ("shards_s3_ips", "s3_vs_local")):
        if arm in wall:  # a network arm by the wall clock: its CPU time leaves out the waiting
            ratios[ratio] = wall[arm] / wall["shards_local_ips"]
            goals[ratio] = STREAM_GOALS[ratio]
    if "shards_cached_ips" in rates:
        ratios["cached_vs_local"] = rates["shards_cached_ips"] / rates["shards_local_ips"]
        goals["cached_vs_local"] = STREAM_GOALS["cached_vs_local"]
    return {
        "loader": {k: round(v, 1) for k, v in rates.items()},
        "wall": {k: round(v, 1) for k, v in wall.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": {k: goal(ratios[k], *v) for k, v in goals.items()},
        "setup": {
            "images": data["images"],
            "packed_size": 256,
            "dicom_size": DICOM_SIZE,
            "train_size": 224,
            "batch_size": bs,
            "workers": 0,
            "torch_threads": 1,
            "rounds": repeats,
            "clock": "loader: process CPU time (one in-process worker, one thread); wall: wall clock",
        },
        "machine": machine(),
    }


def _world(batch: int):
    """One in-process reader (the loader measured is one worker's), one rank."""
    from cxrdist.data.world import World

    return World.of(rank=0, world_size=1, workers=0, seed=0, micro_batch=batch)


def _bench_streamed(folder: Path, cache_dir: Path, world, repeats: int) -> tuple[dict, dict]:
    """The shard loader reading ``folder`` over HTTP, over S3 (moto installed) and, after a first pass
    filled it, from the shard cache (best of the rounds: every round after the first reads the cache)."""
    from cxrdist.data.stream import train_loader
    from cxrdist.shards.cache import ShardCache
    from cxrdist.shards.shardset import ShardSet

    cache = ShardCache(str(cache_dir), 10**12)
    with _streamed(folder) as urls:
        # the local loader again, in the same interleaved rounds: the streamed arms' reference (this shared
        # machine's speed drifts between the groups of one run by more than the differences measured)
        arms = {"shards_local_ips": _epochs(train_loader(ShardSet.open(folder), world))}
        arms |= {f"shards_{k}_ips": _epochs(train_loader(ShardSet.open(u), world)) for k, u in urls.items()}
        arms["shards_cached_ips"] = _epochs(train_loader(ShardSet.open(urls["http"], cache=cache), world))
        return _best_rates(arms, repeats)


def bench_pack(quick: bool = False, workdir: str | Path | None = None) -> dict[str, Any]:
    from cxrdist.shards.pack import pack_rate
    from cxrdist.synth import synthesize

    n = 200 if quick else 1500
    cpus = cpu_count()
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-", dir=workdir) as tmp:
        root = synthesize(layout="chexpert", out=Path(tmp) / "chexpert", n=n, size=256, seed=0)
        rates = {}
        for workers in sorted({1, cpus}):
            rates[workers] = pack_rate(
                source="chexpert",
                root=root,
                out=Path(tmp) / f"shards-{workers}",
                workers=workers,
                size=256,
                encoding="jpg",
            )
    one, many = rates[1], rates[cpus]
    return {
        "pack": {"ips_1_worker": round(one, 1), "ips_n_workers": round(many, 1), "n_workers": cpus},
        "ratios": {"scaling": round(many / one, 2), "efficiency": round(many / one / cpus, 2)},
        "setup": {"images": n, "size": 256, "encoding": "jpg", "workers": sorted({1, cpus})},
        "machine": machine(),
    }


def _print(what: str, result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"cxrdist bench {what}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for group in (what, "ratios"):
        for k, v in (result.get(group) or {}).items():
            table.add_row(f"{group}.{k}" if group == "ratios" else k, f"{v:,.2f}" if isinstance(v, float) else str(v))
    for k, v in (result.get("goals") or {}).items():
        table.add_row(f"goal {k} {v['want']}", "[green]met" if v["met"] else "[red]missed")
    log.console(stderr=True).print(table)


MIMIC_TEST_IMAGES, MIMIC_TEST_PATIENTS = 5159, 1800  # MIMIC-CXR-JPG's official test split, about


def bench_eval(quick: bool = False) -> dict[str, Any]:
    """`cxrdist eval`'s scoring (bootstrap over patients, operating points, calibration, subgroups) on a
    MIMIC-test-sized split of predictions: seconds of one rank-0 CPU, the model's forward excluded."""
    from cxrdist.engine.benchstep import goal
    from cxrdist.evaluate.record import Predictions, fit_operating_points, score
    from cxrdist.labels import CHEXPERT

    n, patients, reps = (800, 300, 200) if quick else (MIMIC_TEST_IMAGES, MIMIC_TEST_PATIENTS, 1000)
    import numpy as np

    rng = np.random.default_rng(0)
    labels = (rng.random((n, len(CHEXPERT))) < 0.15).astype(np.float64)
    pred = Predictions(
        list(CHEXPERT),
        [f"k{i:06d}" for i in range(n)],
        [f"p{i}" for i in rng.integers(0, patients, n)],
        np.clip(rng.normal(0.2 + 0.4 * labels, 0.2), 0.0, 1.0),
        labels,
        (rng.random(labels.shape) < 0.9).astype(np.float64),
        rng.choice([0.0, 1.0], n),
        rng.uniform(18, 95, n),
        list(rng.choice(["AP", "PA"], n)),
    )
    t0 = time.perf_counter()
    points = fit_operating_points(pred)
    t1 = time.perf_counter()
    score(pred, points, protocol="bench", split="test", replicates=reps)
    t2 = time.perf_counter()
    seconds = {"fit_operating_points_s": t1 - t0, "score_s": t2 - t1}
    return {
        "eval": {"images": n, "patients": patients, "labels": len(CHEXPERT), "replicates": reps, **seconds},
        "ratios": {},
        "goals": {"score_s": goal(seconds["score_s"], None, 30.0)},
    }


def run(what: str, out: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    if what == "loader":
        result = bench_loader(quick=quick)
    elif what == "pack":
        result = bench_pack(quick=quick)
    elif what == "step":
        from cxrdist.engine.benchstep import bench_step  # the training-step benchmark (engine floor)

        result = bench_step(quick=quick)
    elif what == "trainer":
        from cxrdist.engine.benchstep import bench_trainer

        result = bench_trainer(quick=quick)
    elif what == "eval":
        result = bench_eval(quick=quick)
    else:
        raise ValueError(f"bench what? loader, pack, step, trainer or eval, not {what!r}")
    if what in ("loader", "pack", "eval"):
        _print(what, result)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result
