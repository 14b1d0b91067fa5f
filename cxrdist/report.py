"""Run folders -> the poster's comparison tables (backend / input format -> accuracy, AUC, time per epoch).

Reads files only (``RUN/summary.json``, ``RUN/config.yaml``, ``RUN/telemetry/rank{R}.jsonl``, see
docs/ARCHITECTURE.md "The run folder"); never imports torch. ``build_report`` writes into ``out``:

- ``report.csv``  one row per run (numbers with their unit in the column name: ``_s``, ``_min``, ``_pct``,
  ``_mb``), skipped backends included as rows with status ``skipped`` and the reason;
- ``report.md``   the same table formatted like the poster (epoch minutes, AUC in percent) + a flags section;
- ``throughput.png``, ``epoch_time.png``, ``memory.png``;
and prints a rich table and the flags on the terminal.

A path given to ``build_report`` may also be a sweep folder written by ``launchers/compare.py`` (it holds a
``sweep.json``): its runs and skipped backends are expanded in place.

Flags: a straggler is a rank whose mean step time is >= 10% above that of the run's median rank (the lower
median, so with two ranks the faster one is the reference); a run is loader-bound when its ranks spend more
than 20% of their step time waiting for data. Missing summaries, missing/empty telemetry, ranks that never
wrote and unreadable lines are flagged as well, never fatal.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cxrdist import log, seeds
from cxrdist.metrics import fmt_interval
from cxrdist.runfolder import RunFolder, RunSummary

STRAGGLER_THRESHOLD = 0.10  # a rank >= 10% slower than the median rank
LOADER_BOUND_THRESHOLD = 0.20  # data wait > 20% of the step time

# what a run's backend is (order, reference, layout) comes from its summary.json ("backend_info", written
# by the backend itself): this floor never imports the engine and never names a backend
FORMAT_ORDER = ("shards", "jpeg", "dicom")

COLUMNS = [
    "run",
    "model",
    "model_description",
    "params_m",
    "backend",
    "format",
    "layout",
    "world_size",
    "nodes",
    "device",
    "precision",
    "labels",
    "batch_per_rank",
    "epochs",
    "epoch_time_s",
    "epoch_time_min",
    "images_per_s",
    "images_per_s_per_rank",
    "speedup",
    "efficiency_pct",
    "speedup_ref",
    "mem_peak_mb_max",
    "mem_peak_mb_spread",
    "data_wait_pct",
    "val_auc_pct",
    "val_acc_pct",
    "test_auc_pct",
    "test_auc_ci",
    "test_comp5_ci",
    "test_comp5_pct",
    "test_acc_pct",
    "seed",
    "protocol",
    "status",
    "restarts",
    "reason",
    "path",
    "provenance",
]


# --- loading --------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """One run folder -> ``{name, path, summary, config, status, world_size, steps, epochs, ranks, problems}``.

    ``steps`` / ``epochs`` are DataFrames of the telemetry step / epoch records of all ranks (column ``rank``);
    ``ranks`` maps rank -> ``{"steps": df, "epochs": df}``. A failed, preempted or still-running run loads the
    same way: ``status`` is the summary's, or ``incomplete`` when there is no summary; ``problems`` lists what
    is missing. Never raises for a missing or partial folder.
    """
    folder = RunFolder(run_dir)
    run_dir = folder.path
    problems: list[str] = []
    if not run_dir.is_dir():
        problems.append(f"run folder {run_dir} does not exist")
    summary = folder.read_summary(problems)
    if run_dir.is_dir() and not folder.summary_path.exists():
        problems.append("no summary.json (the run did not finish)")
    summary = summary or RunSummary()
    config = folder.read_config(problems) or summary.config

    ranks: dict[int, dict[str, pd.DataFrame]] = {}
    files = folder.telemetry_files()
    if run_dir.is_dir() and not files:
        problems.append("no telemetry (telemetry/rank*.jsonl missing)")
    for rank in files:
        recs = folder.records(rank, problems)
        steps = pd.DataFrame([r for r in recs if r.get("event") == "step"])
        epochs = pd.DataFrame([r for r in recs if r.get("event") == "epoch"])
        for df in (steps, epochs):
            if not df.empty:
                df["rank"] = rank
        ranks[rank] = {"steps": steps, "epochs": epochs}

    world = _int(summary.world_size)
    if world is None:
        dist = config.get("dist") or {}
        world = _int(dist.get("nproc")) if (_int(dist.get("nproc")) or 1) > 1 else None
    if world is None:
        world = max(ranks) + 1 if ranks else None
    if world is not None and run_dir.is_dir():
        silent = [r for r in range(world) if r not in ranks or (ranks[r]["steps"].empty and ranks[r]["epochs"].empty)]
        if silent and files:
            problems.append(f"rank(s) {', '.join(map(str, silent))} wrote no telemetry")

    def cat(kind: str) -> pd.DataFrame:
        frames = [v[kind] for v in ranks.values() if not v[kind].empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    status = summary.status
    return {
        "name": run_dir.name,
        "path": run_dir,
        "summary": summary,
        "config": config,
        "status": status,
        "world_size": world,
        "steps": cat("steps"),
        "epochs": cat("epochs"),
        "ranks": ranks,
        "problems": problems,
    }


def _int(v) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _mean(values: Iterable) -> float:
    vals = [x for x in (_num(v) for v in values) if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if df.empty or name not in df:
        return pd.Series(dtype=float)
    return pd.to_numeric(df[name], errors="coerce")


# --- one row per run ---------------------------------------------------------------------------------------


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[dict]]:
    """Run folders as given, with sweep folders (``sweep.json``) replaced by their runs and skipped entries."""
    runs: list[Path] = []
    skipped: list[dict] = []
    for p in map(Path, paths):
        sweep = p / "sweep.json"
        if sweep.is_file():
            try:
                data = json.loads(sweep.read_text())
            except ValueError:
                data = {}
            for r in data.get("runs", []):
                rd = Path(r.get("run_dir", ""))
                runs.append(rd if rd.is_absolute() else p / rd)
            skipped += [dict(s) for s in data.get("skipped", [])]
        else:
            runs.append(p)
    return runs, skipped


def _layout(world: int | None, nodes: int | None, device: str, gpus: int | None, info: dict) -> str:
    if world is None:
        return ""
    if device.startswith("cpu"):
        return f"{world} CPU rank" + ("s" if world != 1 else "")
    nodes = nodes or 1
    if info.get("all_gpus") and not gpus:
        return f"1 node, {info['name']}"  # one process driving every visible GPU; the summary does not say how many
    total = gpus or world
    return f"{nodes}×{max(1, total // nodes)} GPU"


def _test_means(path, test: dict) -> tuple[dict, str]:
    """The test split's mean AUROCs with intervals: `cxrdist eval`'s metrics.json where the run has one (the
    reference, with its protocol), else the trainer's end-of-run test evaluation."""
    m = RunFolder(path).read_metrics("test")
    if m and isinstance(m.get("mean"), dict):
        return m["mean"], str(m.get("protocol", ""))
    return {"all": test.get("auc_mean_ci"), "competition5": test.get("competition5")}, ""


def run_row(run: dict) -> dict[str, Any]:
    """The numbers of one loaded run (see COLUMNS); speed-up/efficiency are filled in by ``build_report``."""
    s, cfg = run["summary"], run["config"]
    steps, epochs = run["steps"], run["epochs"]
    dist, data = cfg.get("dist") or {}, cfg.get("data") or {}
    optim, runc = cfg.get("optim") or {}, cfg.get("run") or {}
    world = run["world_size"]
    nodes = _int(s.nodes)
    if nodes is None and not steps.empty and "host" in steps:
        nodes = int(steps["host"].nunique())
    device = str(
        s.device or (steps["device"].iloc[0] if "device" in steps and not steps.empty else runc.get("device", ""))
    )
    gpus = _int(s.gpus)

    # avg time per epoch: the summary's epochs, else the slowest rank's epoch record per epoch
    sum_epochs = s.epochs
    epoch_time = _mean(e.get("time_s") for e in sum_epochs)
    if math.isnan(epoch_time) and not epochs.empty and "epoch_time_s" in epochs:
        epoch_time = _mean(epochs.assign(t=_col(epochs, "epoch_time_s")).groupby("epoch")["t"].max())

    # images/s: total = sum over ranks per epoch, averaged over epochs; per rank = mean of the rank-epochs
    if not epochs.empty and "images_per_s" in epochs:
        ips = epochs.assign(ips=_col(epochs, "images_per_s"))
        total = _mean(ips.groupby("epoch")["ips"].sum(min_count=1)) if "epoch" in ips else _mean(ips["ips"])
        per_rank = _mean(ips["ips"])
    else:
        total = _mean(e.get("images_per_s") for e in sum_epochs)
        per_rank = total / world if world and not math.isnan(total) else math.nan

    peaks = _rank_peaks(run)  # per rank: max over the summary's epochs and every telemetry record
    mem_max = max(peaks.values()) if peaks else math.nan
    mem_spread = (max(peaks.values()) - min(peaks.values())) if peaks else math.nan

    dt, st = _col(steps, "data_time_s").sum(), _col(steps, "step_time_s").sum()
    data_wait = 100.0 * dt / st if st > 0 else math.nan

    last = sum_epochs[-1] if sum_epochs else {}
    test = s.test or {}
    means, protocol = _test_means(run["path"], test)
    pct = lambda v: 100.0 * _num(v)  # noqa: E731
    model = s.model or {}
    return {
        "run": run["name"],
        "model": model.get("name") or (cfg.get("model") or {}).get("name", ""),
        "model_description": model.get("description", ""),
        "params_m": _num(model.get("params")) / 1e6,
        "backend": s.backend or dist.get("backend", ""),
        "format": s.format or data.get("format", ""),
        "layout": _layout(world, nodes, device, gpus, s.backend_info),
        "_info": s.backend_info,
        "world_size": world,
        "nodes": nodes,
        "device": device,
        "precision": s.precision or runc.get("precision", ""),
        "labels": s.labels or "chexpert",  # summaries before label sets: CheXpert's
        "batch_per_rank": _int(optim.get("batch_size")),
        "epochs": len(sum_epochs) or (int(epochs["epoch"].nunique()) if "epoch" in epochs else 0),
        "epoch_time_s": epoch_time,
        "epoch_time_min": epoch_time / 60.0,
        "images_per_s": total,
        "images_per_s_per_rank": per_rank,
        "speedup": math.nan,
        "efficiency_pct": math.nan,
        "speedup_ref": "",
        "mem_peak_mb_max": mem_max,
        "mem_peak_mb_spread": mem_spread,
        "data_wait_pct": data_wait,
        "val_auc_pct": pct(last.get("val_auc_mean")),
        "val_acc_pct": pct(last.get("val_accuracy_mean")),
        "test_auc_pct": pct(test.get("auc_mean")),
        "test_auc_ci": fmt_interval(means["all"]) if means["all"] else "",
        "test_comp5_ci": fmt_interval(means["competition5"]) if means["competition5"] else "",
        "test_comp5_pct": pct(means["competition5"][0] if means["competition5"] else None),
        "test_acc_pct": pct(test.get("accuracy_mean")),
        "seed": _int(runc.get("seed")),
        "protocol": protocol,
        "status": run["status"],
        "restarts": _int(s.restarts) or 0,
        "reason": "; ".join(([f"error: {s.error}"] if s.error else []) + run["problems"]),
        "path": str(run["path"]),
        "provenance": provenance_line(s.provenance),
        "_gpus": gpus,
    }


def provenance_line(prov: dict | None) -> str:
    """One line of what ran (summary.json's ``provenance``): versions, hardware, the SLURM job, reduce dtype."""
    if not prov:
        return ""
    v = prov.get("versions") or {}
    parts = [" ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "cudnn", "nccl", "deepspeed", "timm") if v.get(k))]
    if v.get("cxrdist"):
        parts.append(f"cxrdist {v['cxrdist']}" + (f" @ {v['git_commit'][:12]}" if v.get("git_commit") else ""))
    for host, hw in (prov.get("hardware") or {}).items():
        gpus = hw.get("gpus") or []
        names = sorted({f"{g['name']} (sm {g['capability']})" for g in gpus})
        what = f"{len(gpus)} x {', '.join(names)}, driver {hw.get('driver')}" if gpus else hw.get("cpu", "")
        parts.append(f"{host}: {what}")
    job = prov.get("slurm") or {}
    if job:
        parts.append(f"SLURM job {job.get('job_id')}" + (f" ({job['partition']})" if job.get("partition") else ""))
    if prov.get("reduce_precision"):
        parts.append(f"gradients reduced in {prov['reduce_precision']}")
    return "; ".join(p for p in parts if p)


def run_flags(run: dict) -> list[str]:
    """Stragglers, loader-bound, and what is missing or failed, each a sentence naming the run."""
    name, flags = run["name"], []
    if run["status"] not in ("completed",):
        err = run["summary"].error
        flags.append(f"{name}: status {run['status']}" + (f": {err}" if err else ""))
    flags += [f"{name}: {p}" for p in run["problems"]]
    steps = run["steps"]
    if steps.empty or "step_time_s" not in steps:
        return flags
    st = steps.assign(st=_col(steps, "step_time_s"))
    per_rank = st.groupby("rank")["st"].mean().dropna()
    if len(per_rank) >= 2:
        median = statistics.median_low(per_rank.tolist())
        hosts = (
            st.groupby("rank")["host"].agg(lambda h: h.dropna().iloc[0] if h.notna().any() else "")
            if "host" in st
            else {}
        )
        for rank, t in per_rank.items():
            if median > 0 and (t - median) / median >= STRAGGLER_THRESHOLD - 1e-9:
                host = hosts.get(rank, "") if hasattr(hosts, "get") else ""
                where = f" on {host}" if host else ""
                flags.append(
                    f"{name}: straggler: rank {rank}{where} is {100 * (t - median) / median:.0f}% "
                    f"slower than the median ({t:.3f} s vs {median:.3f} s per step)"
                )
    dt, total = _col(steps, "data_time_s").sum(), _col(steps, "step_time_s").sum()
    if total > 0 and dt / total > LOADER_BOUND_THRESHOLD:
        flags.append(
            f"{name}: loader-bound: {100 * dt / total:.0f}% of the step time is spent waiting for "
            f"data (more --workers, shards instead of loose files, or device augmentation)"
        )
    return flags


def _order_key(row: dict) -> tuple:
    f = row.get("format") or ""
    return (
        FORMAT_ORDER.index(f) if f in FORMAT_ORDER else len(FORMAT_ORDER),
        (row.get("_info") or {}).get("order", 99),
        row.get("backend") or "",
    )


def _is_reference(row: dict) -> bool:
    """The single-device run speed-ups are measured against (older summaries: one rank, at most one GPU)."""
    info = row.get("_info") or {}
    if "reference" in info:
        return bool(info["reference"])
    return (row["world_size"] or 1) == 1 and (row.get("_gpus") or 0) <= 1


def _add_speedup(rows: list[dict]) -> None:
    """Speed-up by epoch time over the single-device run of the same format and model (else of the same
    format, else any single-device run)."""
    refs = [
        r
        for r in rows
        if r["status"] != "skipped"
        and _is_reference(r)
        and (r["world_size"] or 1) == 1
        and not math.isnan(r["epoch_time_s"])
        and r["epoch_time_s"] > 0
    ]
    for r in rows:
        if r["status"] == "skipped" or math.isnan(r["epoch_time_s"]) or r["epoch_time_s"] <= 0 or not refs:
            continue
        same = [x for x in refs if x["format"] == r["format"]]
        ref = next((x for x in same if x.get("model") == r.get("model")), same[0] if same else refs[0])
        r["speedup"] = ref["epoch_time_s"] / r["epoch_time_s"]
        r["speedup_ref"] = ref["run"]
        devices = r.pop("_gpus", None) or r["world_size"] or 1
        if (r.get("_info") or {}).get("all_gpus") and devices == 1 and not str(r["device"]).startswith("cpu"):
            continue  # one process over several GPUs: without their number no efficiency
        r["efficiency_pct"] = 100.0 * r["speedup"] / devices


# --- output ---------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".2f", suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return "–"
    if isinstance(v, (int, float)) and spec:
        return f"{v:{spec}}{suffix}"
    return f"{v}{suffix}"


# (header, column, format spec, suffix)
DISPLAY = [
    ("Run", "run", "", ""),
    ("Model", "model", "", ""),
    ("Params (M)", "params_m", ".1f", ""),
    ("Backend", "backend", "", ""),
    ("Format", "format", "", ""),
    ("Layout", "layout", "", ""),
    ("Precision", "precision", "", ""),
    ("Labels", "labels", "", ""),
    ("Batch/rank", "batch_per_rank", "d", ""),
    ("Epoch (min)", "epoch_time_min", ".2f", ""),
    ("Epoch (s)", "epoch_time_s", ".1f", ""),
    ("img/s", "images_per_s", ".1f", ""),
    ("img/s/rank", "images_per_s_per_rank", ".1f", ""),
    ("Speed-up", "speedup", ".2f", "×"),
    ("Efficiency", "efficiency_pct", ".0f", "%"),
    ("Peak MB/rank", "mem_peak_mb_max", ".0f", ""),
    ("MB spread", "mem_peak_mb_spread", ".0f", ""),
    ("Data wait", "data_wait_pct", ".1f", "%"),
    ("Val AUC", "val_auc_pct", ".2f", ""),
    ("Val acc", "val_acc_pct", ".2f", ""),
    ("Test AUC (95% CI)", "test_auc_ci", "", ""),
    ("Comp-5 AUC (95% CI)", "test_comp5_ci", "", ""),
    ("Test acc", "test_acc_pct", ".2f", ""),
    ("Status", "status", "", ""),
    ("Restarts", "restarts", "d", ""),
]


# the poster's Table 2: one row per model (shown when the runs compare models, as compare.py --models does)
TABLE2 = [
    ("Model", "model", "", ""),
    ("Description", "model_description", "", ""),
    ("Test acc", "test_acc_pct", ".2f", ""),
    ("Test AUC (95% CI)", "test_auc_ci", "", ""),
    ("Comp-5 AUC (95% CI)", "test_comp5_ci", "", ""),
    ("Params (M)", "params_m", ".1f", ""),
    ("img/s", "images_per_s", ".1f", ""),
    ("Epoch (min)", "epoch_time_min", ".2f", ""),
    ("Peak MB/rank", "mem_peak_mb_max", ".0f", ""),
    ("Backend", "backend", "", ""),
    ("Run", "run", "", ""),
]


def _models_compared(df: pd.DataFrame) -> pd.DataFrame | None:
    """The completed runs, when they hold more than one model (else None: no Table 2)."""
    done = df[df["status"] == "completed"]
    return done if done["model"].nunique() > 1 else None


def _display_rows(df: pd.DataFrame, display: list[tuple[str, str, str, str]] = DISPLAY) -> list[list[str]]:
    out = []
    for _, r in df.iterrows():
        cells = []
        for _, col, spec, suffix in display:
            v = r[col]
            if spec == "d" and isinstance(v, float) and not math.isnan(v):
                v = int(v)
            cells.append(_fmt(v, spec, suffix))
        out.append(cells)
    return out


def _markdown(df: pd.DataFrame, flags: list[str], plots: list[str]) -> str:
    head = [h for h, *_ in DISPLAY]
    lines = [
        "# cxrdist backend comparison",
        "",
        "Epoch times are averages over the run's epochs; AUC and accuracy are means over each run's labels in "
        "percent (val: last epoch); test AUROCs carry 95% patient-bootstrap intervals, beside the CheXpert "
        "competition-5 mean: two runs whose intervals do not overlap differ beyond noise (overlap alone does not "
        "prove them equal). Speed-up is by epoch time over the single-device run of the same format; "
        "efficiency = speed-up / devices.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += _md_rows(_display_rows(df))
    models = _models_compared(df)
    if models is not None:
        lines += [
            "",
            "## Models (the poster's Table 2)",
            "",
            "Same data, backend, seed and schedule per model (`launchers/compare.py --models`); test accuracy "
            "at 0.5 and AUROC means in percent.",
            "",
            "| " + " | ".join(h for h, *_ in TABLE2) + " |",
            "|" + "|".join("---" for _ in TABLE2) + "|",
        ]
        lines += _md_rows(_display_rows(models, TABLE2))
    reasons = [
        (r["run"], r["status"], r["reason"]) for _, r in df.iterrows() if r["status"] == "skipped" and r["reason"]
    ]
    if reasons:
        lines += ["", "## Skipped", ""] + [f"- {run}: {why}" for run, _, why in reasons]
    lines += ["", "## Flags", ""]
    lines += [f"- {f}" for f in flags] if flags else ["- none: no stragglers, no loader-bound runs, nothing missing"]
    if "provenance" in df and df["provenance"].astype(bool).any():
        lines += ["", "## Provenance (what ran)", ""]
        lines += [f"- {r['run']}: {r['provenance']}" for _, r in df.iterrows() if r["provenance"]]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _md_rows(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def _print_models(console, models: pd.DataFrame) -> None:
    from rich.table import Table

    table = Table(title="models (the poster's Table 2; AUC / accuracy in %)", header_style="bold")
    for header, col, *_ in TABLE2:
        left = col in ("model", "model_description", "backend", "run")
        table.add_column(header, justify="left" if left else "right", overflow="fold")
    for cells in _display_rows(models, TABLE2):
        table.add_row(*cells)
    console.print(table)


def _print_terminal(df: pd.DataFrame, flags: list[str], out: Path) -> None:
    from rich.table import Table

    console = log.console()
    table = Table(title="cxrdist: backends × input formats (AUC / accuracy in %)", header_style="bold")
    cols = [
        ("Run", "run"),
        ("Model", "model"),
        ("Backend", "backend"),
        ("Format", "format"),
        ("Layout", "layout"),
        ("Epoch min", "epoch_time_min"),
        ("img/s", "images_per_s"),
        ("Speed-up", "speedup"),
        ("Eff.", "efficiency_pct"),
        ("Peak MB", "mem_peak_mb_max"),
        ("Wait", "data_wait_pct"),
        ("Val AUC", "val_auc_pct"),
        ("Test AUC (95% CI)", "test_auc_ci"),
        ("Comp-5 (95% CI)", "test_comp5_ci"),
        ("Test acc", "test_acc_pct"),
        ("Status", "status"),
    ]
    index = {col: i for i, (_, col, *_) in enumerate(DISPLAY)}
    for header, col in cols:
        left = col in ("run", "model", "backend", "format", "layout", "status")
        table.add_column(header, justify="left" if left else "right", no_wrap=col != "run", overflow="fold")
    for cells, (_, r) in zip(_display_rows(df), df.iterrows()):
        style = {"completed": None, "skipped": "dim"}.get(r["status"], "red")
        row = [cells[index[col]] for _, col in cols]
        if r["restarts"] and not (isinstance(r["restarts"], float) and math.isnan(r["restarts"])):
            row[-1] += f" ({int(r['restarts'])} restart{'s' if r['restarts'] != 1 else ''})"
        table.add_row(*row, style=style)
    console.print(table)
    models = _models_compared(df)
    if models is not None:
        _print_models(console, models)
    for f in flags:
        console.print(f"[yellow]flag[/yellow] {f}", highlight=False, markup=True)
    console.print(f"report: {out / 'report.md'}  {out / 'report.csv'}  plots: {out}/*.png", highlight=False)


def _figure(width=9.0, height=5.0):
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg on save

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.subplots()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="grey")


def _label(row) -> str:
    return f"{row['run']}\n({row['backend'] or '?'}/{row['format'] or '?'})"


def _plot_throughput(runs: list[dict], path: Path) -> None:
    fig, ax = _figure()
    styles = ["-", "--", ":", "-."]
    drew = False
    for i, run in enumerate(runs):
        steps = run["steps"]
        if steps.empty or not {"time", "images_per_s"} <= set(steps):
            continue
        t0 = _col(steps, "time").min()
        color = f"C{i % 10}"
        for j, (rank, g) in enumerate(sorted(steps.groupby("rank"), key=lambda kv: kv[0])):
            g = g.assign(t=_col(g, "time") - t0, ips=_col(g, "images_per_s")).dropna(subset=["t", "ips"])
            g = g.sort_values("t")
            if g.empty:
                continue
            ax.plot(
                g["t"],
                g["ips"],
                styles[j % len(styles)],
                color=color,
                marker="." if len(g) < 30 else None,
                label=f"{run['name']} rank {rank}",
            )
            drew = True
    ax.set_title("Training throughput per rank")
    ax.set_xlabel("time since the run's first step record (s)")
    ax.set_ylabel("images / s (one rank)")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize="small", ncol=2 if len(ax.lines) > 8 else 1)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no step records")
    fig.savefig(path)


def _plot_epoch_time(df: pd.DataFrame, path: Path, colours: dict[str, int]) -> None:
    fig, ax = _figure()
    d = df[df["epoch_time_s"].notna()]
    if d.empty:
        _empty(ax, "no run finished an epoch")
    else:
        minutes = d["epoch_time_s"].max() >= 120
        vals = d["epoch_time_min"] if minutes else d["epoch_time_s"]
        labels = [_label(r) for _, r in d.iterrows()]
        bars = ax.bar(range(len(d)), vals, color=[f"C{colours.get(b, 9) % 10}" for b in d["backend"]])
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], padding=2, fontsize="small")
        ax.set_xticks(range(len(d)), labels, fontsize="small")
        ax.set_ylabel("average time per epoch (" + ("min" if minutes else "s") + ")")
        ax.set_ylim(0, float(vals.max()) * 1.15 or 1)
    ax.set_title("Average time per epoch by backend / input format")
    ax.set_xlabel("run (backend/format)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _rank_peaks(run: dict) -> dict[int, float]:
    peaks: dict[int, float] = {}
    for e in run["summary"].epochs:
        for r, mb in ((e or {}).get("mem_peak_mb") or {}).items():
            if _int(r) is not None and not math.isnan(_num(mb)):
                peaks[_int(r)] = max(peaks.get(_int(r), 0.0), _num(mb))
    for df in (run["steps"], run["epochs"]):
        if not df.empty and "mem_peak_mb" in df:
            for r, mb in df.assign(m=_col(df, "mem_peak_mb")).groupby("rank")["m"].max().items():
                if not math.isnan(mb):
                    peaks[int(r)] = max(peaks.get(int(r), 0.0), float(mb))
    return peaks


def _plot_memory(runs: list[dict], path: Path) -> None:
    fig, ax = _figure()
    data = [(run, _rank_peaks(run)) for run in runs]
    data = [(run, p) for run, p in data if p]
    if not data:
        _empty(ax, "no memory records")
    else:
        width = 0.8 / max(len(p) for _, p in data)
        ticks, labels, seen = [], [], set()
        for i, (run, peaks) in enumerate(data):
            ranks = sorted(peaks)
            for j, r in enumerate(ranks):
                x = i + (j - (len(ranks) - 1) / 2) * width
                ax.bar(x, peaks[r], width * 0.9, color=f"C{r % 10}", label=None if r in seen else f"rank {r}")
                seen.add(r)
            ticks.append(i)
            s = run["summary"]
            labels.append(f"{run['name']}\n({s.backend or (run['config'].get('dist') or {}).get('backend', '?')})")
        ax.set_xticks(ticks, labels, fontsize="small")
        ax.set_ylabel("peak memory per rank (MB)")
        ax.legend(title="rank", fontsize="small")
    ax.set_title("Peak memory per rank")
    ax.set_xlabel("run")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def build_report(
    runs: list[Path],
    out: Path,
    skipped: list[dict] | None = None,
    print_table: bool = True,
    published: Path | None = None,
) -> pd.DataFrame:
    """Compare run folders (and sweep folders) -> rich table, ``out/report.{md,csv}`` and the plots.

    ``skipped``: ``[{"backend", "format", "reason"}]`` of runs that could not start; each becomes a row with
    status ``skipped``. ``published``: a csv of published figures shown beside the runs' test numbers
    (``cxrdist.published``). Returns the table written to ``report.csv``.
    """
    from cxrdist import published as pub

    quoted = pub.read_published(published) if published is not None else None  # a bad file: before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, sweep_skipped = expand_paths(runs)
    loaded = [load_run(p) for p in paths]
    rows = [run_row(r) for r in loaded]
    for s in list(skipped or []) + sweep_skipped:
        b, f, m = s.get("backend", ""), s.get("format", ""), s.get("model", "")
        row = {c: math.nan for c in COLUMNS}
        row.update(
            run=s.get("run") or "-".join(x for x in (m, b, f) if x),
            model=m,
            model_description="",
            backend=b,
            format=f,
            layout="",
            device="",
            precision="",
            labels="",
            speedup_ref="",
            status="skipped",
            reason=s.get("reason", ""),
            path="",
            restarts=0,
            epochs=0,
            _info=s.get("backend_info") or {},
        )
        rows.append(row)
    _add_speedup(rows)
    for r in rows:
        r.pop("_gpus", None)
    rows.sort(key=_order_key)
    colours = {r["backend"]: (r.pop("_info", None) or {}).get("order", 9) for r in rows}
    df = pd.DataFrame(rows, columns=COLUMNS)

    flags = [f for r in loaded for f in run_flags(r)]
    flags += [f"{r['run']}: skipped: {r['reason']}" for r in rows if r["status"] == "skipped"]
    sets = sorted({r["labels"] for r in rows if r["status"] != "skipped"})
    if len(sets) > 1:
        flags.append(
            f"the runs were trained on different label sets ({', '.join(sets)}): their AUC means differ in kind"
        )

    plots = ["throughput.png", "epoch_time.png", "memory.png"]
    _plot_throughput(loaded, out / plots[0])
    _plot_epoch_time(df, out / plots[1], colours)
    _plot_memory(loaded, out / plots[2])

    rounding = {
        "epoch_time_s": 3,
        "epoch_time_min": 3,
        "images_per_s": 2,
        "images_per_s_per_rank": 2,
        "speedup": 3,
        "efficiency_pct": 1,
        "mem_peak_mb_max": 1,
        "mem_peak_mb_spread": 1,
        "params_m": 2,
        "data_wait_pct": 2,
        "val_auc_pct": 2,
        "val_acc_pct": 2,
        "test_auc_pct": 2,
        "test_comp5_pct": 2,
        "test_acc_pct": 2,
    }
    csv = df.copy()
    for col, nd in rounding.items():
        csv[col] = pd.to_numeric(csv[col], errors="coerce").round(nd)
    for col in ("world_size", "nodes", "batch_per_rank", "epochs", "restarts", "seed"):
        csv[col] = pd.to_numeric(csv[col], errors="coerce").astype("Int64")
    csv.to_csv(out / "report.csv", index=False)
    text = _markdown(df, flags, plots) + seeds.section(rows)
    if quoted is not None:
        beside = pub.comparison(quoted, rows)
        text += "\n" + pub.markdown(beside)
        pd.DataFrame(beside, columns=[*pub.COLUMNS, "kind"]).to_csv(out / "published.csv", index=False)
    (out / "report.md").write_text(text)
    if print_table:
        _print_terminal(df, flags, out)
        if quoted is not None:
            _print_published(beside)
    return csv


def _print_published(rows: list[dict]) -> None:
    from rich.table import Table

    from cxrdist import published as pub

    table = Table(title="beside published figures (not rerun; %)", caption=pub.CAVEAT, header_style="bold")
    for col in ("model", "dataset", "accuracy", "AUC", "source"):
        table.add_column(col, justify="right" if col in ("accuracy", "AUC") else "left")
    for r in rows:
        style = "bold" if r["kind"] == "this run" else None
        cells = [
            _fmt(r["accuracy"]) if r["accuracy"] is not None else "—",
            _fmt(r["auc"]) if r["auc"] is not None else "—",
        ]
        table.add_row(r["model"], r["dataset"], *cells, r["source"], style=style)
    log.console().print(table)
