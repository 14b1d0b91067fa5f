#!/usr/bin/env python3
"""Run the same training under several backends (and input formats), then compare them (poster Tables 3/4).

    python launchers/compare.py --nodes 1 --gpus 4 --backends single,dp,ddp,deepspeed,fsdp [--formats shards,jpeg] \\
        [--models densenet121,densenet121d,densenetblur121d,resnet50] --epochs 3 [submit.py's launcher flags] \\
        [--wait] [--report-dir DIR] -- --shards shards/x --image-size 224

One run per model x backend x format with identical data, per-rank batch, schedule and seed: only
``model.name``, ``dist.backend``, ``data.format`` and the run folder (``<sweep dir>/<backend>-<format>``, with
``<model>-`` in front under ``--models``) differ; ``--models`` regenerates the poster's Table 2. ``--seeds
0,1,2`` runs every arm once per seed (``-s<seed>`` folders): the report then gives each arm's mean ± sd over
seeds, its pooled interval and paired comparisons (``cxrdist.seeds``; after ``cxrdist eval`` of each run). The sweep
dir is the train option ``--out`` (default ``runs/compare-<time>``); it gets a ``sweep.json`` listing the runs
and the skipped backends, so ``cxrdist report <sweep dir>`` can be re-run at any time. A backend that cannot run on the
target (``cxrdist.launch.preflight``: e.g. dp without >= 2 GPUs) is recorded as skipped with the reason.

On SLURM every run is submitted at once; on the local executor (this machine) the runs go one after
another, each waited for before the next starts, so they do not share the CPU and the timings stay honest.
With ``--wait`` (always, on the local executor) the report is written to ``--report-dir`` (default
``<sweep dir>/report``). All the work is in cxrdist.launch and cxrdist.report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from bootstrap import use_repo_python  # launchers/ is sys.path[0] when run as a script


def _csv(choices: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what} must be a comma list of {', '.join(choices)}; got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def _names(text: str) -> list[str]:
    from cxrdist.errors import UserError
    from cxrdist.models import check_model_name

    items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    try:
        for name in items:
            check_model_name(name)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not items:
        raise argparse.ArgumentTypeError("--models needs at least one name")
    return items


def _seeds(text: str) -> list[int]:
    try:
        items = list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be a comma list of integers; got {text!r}") from None
    if not items or min(items) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be a comma list of integers >= 0; got {text!r}")
    return items


def get_args_parser() -> argparse.ArgumentParser:
    from cxrdist.launch import get_args_parser as launch_parser

    p = argparse.ArgumentParser(
        prog="launchers/compare.py",
        parents=[launch_parser(add_help=False, backend_flag=False)],  # one backend per run: --backends
        allow_abbrev=False,
        description="Run one training per backend x input format with identical settings, then compare "
        "accuracy, AUC and time per epoch (cxrdist report).",
        epilog="Everything after `--` is a `cxrdist train` option shared by every run (not --backend/--format: "
        "use --backends/--formats). --out after `--` names the sweep folder.",
    )
    from cxrdist.config import FORMATS
    from cxrdist.engine.backends import names

    g = p.add_argument_group("sweep")
    g.add_argument(
        "--backends",
        type=_csv(names(), "--backends"),
        default=list(names()),
        metavar="NAMES",
        help=f"comma list of {','.join(names())} (default: all)",
    )
    g.add_argument(
        "--formats",
        type=_csv(FORMATS, "--formats"),
        default=["shards"],
        help="comma list of shards,jpeg,dicom (default: shards)",
    )
    g.add_argument(
        "--models",
        type=_names,
        default=None,
        metavar="NAMES",
        help="comma list of models to sweep (the poster's three, any timm name; default: the train option --model)",
    )
    g.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        metavar="LIST",
        help="comma list of seeds: every arm once per seed (run folders end -s<seed>); the report gives mean ± sd "
        "over seeds, pooled intervals and paired comparisons (after `cxrdist eval` of each run)",
    )
    g.add_argument("--epochs", type=int, default=None, help="epochs per run (same as the train option --epochs)")
    g.add_argument("--report-dir", type=Path, default=None, help="where the report goes (default: <sweep dir>/report)")
    return p


def plan_runs(
    models: list[str] | None, formats: list[str], backends: list[str], seeds: list[int] | None = None
) -> list[tuple[str, str, str, int | None]]:
    """(model, format, backend, seed) of every run, in submission order; model '' and seed None when not
    swept. Seeds innermost: a sweep cut short still has every arm on its first seed."""
    return [(m, f, b, s) for s in (seeds or [None]) for m in (models or [""]) for f in formats for b in backends]


def run_name(model: str, backend: str, fmt: str, seed: int | None) -> str:
    return "-".join(x for x in (model, backend, fmt, None if seed is None else f"s{seed}") if x)


def _write_sweep(sweep_dir: Path, data: dict) -> None:
    tmp = sweep_dir / "sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(sweep_dir / "sweep.json")


def launch_args_for(args: argparse.Namespace, backend: str, fmt: str, model: str = "") -> argparse.Namespace:
    """The submit.py flags of one run: one-process backends on one node, the others as asked."""
    from cxrdist.engine.backends import layout_of

    la = argparse.Namespace(**vars(args))
    for k in ("backends", "formats", "models", "seeds", "epochs", "report_dir"):
        delattr(la, k)
    la.backend, la.wait = backend, False
    la.name = "-".join(x for x in (args.name or "cxrdist", model, backend, fmt) if x)
    if not layout_of(backend).per_gpu:
        la.nodes, la.tasks_per_node = 1, None
    return la


def main(argv: list[str] | None = None) -> int:
    use_repo_python()
    from cxrdist import launch
    from cxrdist.config import parse_train_argv
    from cxrdist.engine.backends import backend_class
    from cxrdist.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--") if "--" in argv else len(argv)
    launcher_argv, train_argv = argv[:i], argv[i + 1 :]
    if "--backend" in launcher_argv:  # not a flag of this parser: say what to use instead of argparse's "unrecognized"
        print("compare: error: compare.py takes --backends (a comma list), not --backend", file=sys.stderr)
        return 2
    args = get_args_parser().parse_args(launcher_argv)
    try:
        swept = ("--backend", "--format", "--nproc") + (("--model",) if args.models else ())
        swept += ("--seed",) if args.seeds else ()
        for flag in swept:
            if flag in train_argv:
                raise UserError(
                    f"{flag} after `--` is set per run by the sweep: use --backends / --formats / --models "
                    "before `--` (and --gpus / --tasks-per-node for the ranks)"
                )
        if args.epochs is not None:
            if "--epochs" in train_argv:
                raise UserError("--epochs given twice (before and after `--`)")
            train_argv += ["--epochs", str(args.epochs)]
        base = parse_train_argv(train_argv)
        cluster = launch.resolve_cluster(args)
    except UserError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2

    sweep_dir = Path(base.run.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    report_dir = (args.report_dir or sweep_dir / "report").absolute()
    sequential = cluster == "local"
    sweep = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cluster": cluster,
        "nodes": args.nodes,
        "gpus": args.gpus,
        "tasks_per_node": args.tasks_per_node,
        "backends": args.backends,
        "formats": args.formats,
        "models": args.models or [base.model.name],
        "seeds": args.seeds or [base.run.seed],
        "train_argv": train_argv,
        "command": ["launchers/compare.py", *argv],
        "report_dir": str(report_dir),
        "runs": [],
        "skipped": [],
    }
    _write_sweep(sweep_dir, sweep)
    print(
        f"sweep: {len(args.models or [base.model.name])} model(s) x {len(args.backends)} backend(s) x "
        f"{len(args.formats)} format(s) on {cluster} "
        f"-> {sweep_dir}" + (" (one run at a time)" if sequential else ""),
        flush=True,
    )

    subs: list[tuple[dict, object]] = []
    failed = 0
    try:
        for model, fmt, backend, seed in plan_runs(args.models, args.formats, args.backends, args.seeds):
            la = launch_args_for(args, backend, fmt, model)
            run_dir = sweep_dir / run_name(model, backend, fmt, seed)
            cfg = replace(
                base,
                model=replace(base.model, name=model or base.model.name),
                dist=replace(base.dist, backend=backend),
                data=replace(base.data, format=fmt),
                run=replace(base.run, out=str(run_dir), seed=base.run.seed if seed is None else seed),
            )
            reason = launch.preflight(la, cfg)
            sub = None
            if reason is None:
                try:
                    sub = launch.submit(la, cfg)
                except UserError as e:
                    reason = f"not submitted: {e}"
            if sub is None:
                print(f"skip {run_dir.name}: {reason}", flush=True)
                sweep["skipped"].append(
                    {
                        "backend": backend,
                        "format": fmt,
                        "model": model,
                        "reason": reason,
                        "backend_info": backend_class(backend).info(),
                    }
                )
                _write_sweep(sweep_dir, sweep)
                continue
            entry = {
                "backend": backend,
                "format": fmt,
                "model": model or base.model.name,
                "seed": cfg.run.seed,
                "run_dir": run_dir.name,
                "job_id": sub.job_id,
                "log_dir": str(sub.log_dir),
                "executor": sub.executor,
                "world_size": sub.plan.world_size if sub.plan else None,
                "gpus_per_node": sub.plan.gpus_per_node if sub.plan else None,
                "rc": None,
            }
            sweep["runs"].append(entry)
            _write_sweep(sweep_dir, sweep)
            print(launch.describe(sub), flush=True)
            if sequential:  # local: finish this one before the next starts
                entry["rc"] = launch.wait(sub, stream=True)
                failed += entry["rc"] != 0
                _write_sweep(sweep_dir, sweep)
            else:
                subs.append((entry, sub))
        if subs and args.wait:
            for entry, sub in subs:
                entry["rc"] = launch.wait(sub, stream=True)
                failed += entry["rc"] != 0
                _write_sweep(sweep_dir, sweep)
    except KeyboardInterrupt:
        print(
            f"\nstopped; submitted jobs keep running. Their list: {sweep_dir / 'sweep.json'}; "
            f"report later with: cxrdist report {sweep_dir} --out {report_dir}",
            file=sys.stderr,
        )
        return 130

    if not (args.wait or sequential):
        print(f"submitted {len(subs)} job(s); when they are done: cxrdist report {sweep_dir} --out {report_dir}")
        return 0
    from cxrdist.report import build_report

    build_report([sweep_dir], out=report_dir)  # the sweep folder expands into its runs and skipped ones
    if not sweep["runs"]:
        print("compare: nothing ran (every backend was skipped)", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
