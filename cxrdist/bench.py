"""`cxrdist bench loader|pack|step|trainer`: the throughput ratios behind the poster's Table 4, measured here.

- ``loader``: images/s of ONE loader worker (in-process, one torch thread) on a synthetic CheXpert-layout set
  packed at 256 px: raw JPEG decode alone (the ceiling), the shard loader as it feeds a GPU (read, decode,
  collate), the same plus the CPU augmentation at 224, loose JPEG files, and the DICOM source (a synthetic
  MIMIC-CXR DICOM set), and the shard loader without its sha256 check. Goals: shards >= 0.7x raw decode and
  >= 20x DICOM; the sha256 check <= 5% of the loader's time.
- ``pack``: images/s of the packer with 1 and N (= CPU count) workers, and the scaling.
- ``step``: training-step throughput per backend (cxrdist.engine.benchstep).
- ``trainer``: the trainer's steady-state images/s against a bare loop (goal >= 0.85x), same everything.

``run(what, out=None, quick=False)`` returns the result dict and writes it as JSON to ``out``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrdist import log
from cxrdist.dist import cpu_count

# (ratio, at least, at most): the sha256 check may cost the loader at most 5% (else it becomes a flag)
GOALS = {"shards_vs_raw": (0.7, None), "shards_vs_dicom": (20.0, None), "sha256_cost": (None, 0.05)}

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
    from cxrdist.data.files import make_file_loader
    from cxrdist.data.stream import make_loader, read_shard_list, warm_decoders
    from cxrdist.data.transforms import Augment
    from cxrdist.engine.benchstep import goal
    from cxrdist.shards.tario import iter_shard

    repeats = 5 if quick else 3  # quick: short measures, so more rounds to take the best of
    bs = 32
    with tempfile.TemporaryDirectory(prefix="cxrdist-bench-", dir=workdir) as tmp:
        data = _prepare(Path(tmp), quick)
        _, shards = read_shard_list(data["jpg"], "train")
        jpegs = [m["jpg"] for s in shards for _, _, m in iter_shard(s)]
        warm_decoders()

        def raw() -> int:
            for b in jpegs:
                imaging.decode(b, "jpg")
            return len(jpegs)

        kw = dict(batch_size=bs, workers=0, train=True, epoch=0, seed=0)
        aug = Augment(224, train=True)
        rates, wall = _best_rates(
            {
                "raw_decode_ips": raw,
                "shards_ips": lambda: _count(make_loader(data["jpg"], "train", **kw)),
                "shards_unhashed_ips": lambda: _count(make_loader(data["jpg"], "train", check_sha256=False, **kw)),
                "shards_cpu_aug_ips": lambda: _count(make_loader(data["jpg"], "train", augment=aug, **kw)),
                "jpeg_files_ips": lambda: _count(make_file_loader(data["jpg"], "train", "jpeg", **kw)),
            },
            repeats,
        )
        # the DICOM arm: every image of the (small, slow) DICOM set once, in eval order
        dicom_cpu, dicom_wall = _best_rates(
            {
                "dicom_ips": lambda: _count(
                    make_file_loader(data["dcm"], "train", "dicom", batch_size=4, workers=0, train=False)
                )
            },
            1,
        )
        rates.update(dicom_cpu)
        wall.update(dicom_wall)
    ratios = {
        "shards_vs_raw": rates["shards_ips"] / rates["raw_decode_ips"],
        "shards_vs_dicom": rates["shards_ips"] / rates["dicom_ips"],
        "shards_vs_jpeg_files": rates["shards_ips"] / rates["jpeg_files_ips"],
        "cpu_aug_cost": rates["shards_cpu_aug_ips"] / rates["shards_ips"],
        "sha256_cost": 1 - rates["shards_ips"] / rates["shards_unhashed_ips"],
    }
    return {
        "loader": {k: round(v, 1) for k, v in rates.items()},
        "wall": {k: round(v, 1) for k, v in wall.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": {k: goal(ratios[k], *v) for k, v in GOALS.items()},
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
    else:
        raise ValueError(f"bench what? loader, pack, step or trainer, not {what!r}")
    if what in ("loader", "pack"):
        _print(what, result)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result
