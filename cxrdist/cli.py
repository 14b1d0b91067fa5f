"""The `cxrdist` command: one function per subcommand.

Imports are lazy so that `cxrdist --help` and the data commands do not pay for torch/DeepSpeed start-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrdist.config import add_train_args, config_from_args
from cxrdist.labels import DEFAULT_POLICY, POLICIES


def cmd_synth(a) -> int:
    from cxrdist.synth import synthesize

    out = synthesize(layout=a.layout, out=a.out, n=a.n, size=a.size, seed=a.seed)
    print(f"wrote a synthetic {a.layout} dataset of {a.n} images to {out}")
    return 0


def cmd_shard(a) -> int:
    from cxrdist.shards.pack import pack

    manifest = pack(
        source=a.source,
        root=a.root,
        out=a.out,
        size=a.size,
        encoding=a.encoding,
        views=a.views,
        policy=a.policy,
        split=a.split,
        workers=a.workers,
        samples_per_shard=a.samples_per_shard,
        dry_run=a.dry_run,
        strict=a.strict,
        seed=a.seed,
        min_shards=a.min_shards,
        labels=a.labels,
        staging=a.staging,
        source_options=source_options(a),
    )
    return 0 if manifest is not None else 1


def source_options(a) -> dict:
    """The reader options given on the command line (each belongs to one source; build_table checks)."""
    given = {"expert_labels": a.expert_labels, "label_method": a.label_method}
    return {k: v for k, v in given.items() if v is not None}


def cmd_verify(a) -> int:
    from cxrdist.shards.verify import verify

    problems = verify(a.dir)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    if not problems:
        print(f"{a.dir}: every shard matches the manifest")
    return 1 if problems else 0


def cmd_train(a) -> int:
    cfg = config_from_args(a)
    cfg.validate()  # the options' own checks need no torch: a mistake is said in a fraction of a second
    from cxrdist.engine.trainer import launch

    summary = launch(cfg)
    return 0 if summary.get("status") == "completed" else 1


def cmd_eval(a) -> int:
    if not a.run.is_dir():  # before the imports of torch and the model zoo
        from cxrdist.errors import UserError

        raise UserError(f"--run {a.run}: no such run folder")
    from cxrdist.evaluate import evaluate_run

    result = evaluate_run(
        a.run,
        split=a.split,
        checkpoint=a.checkpoint,
        shards=a.shards,
        map_labels=a.map_labels,
        rule=a.operating_point,
        replicates=a.bootstrap,
        seed=a.seed,
        allow_pipe=a.allow_pipe,
        cam=a.cam,
    )
    print(json.dumps({k: result[k] for k in ("protocol", "split", "n", "mean")}, indent=1))
    return below_floor(a.run, result, a.min_auc) if a.min_auc is not None else 0


def below_floor(run: Path, result: dict, floor: float) -> int:
    """``--min-auc``: 1 (with one line saying which) when the run's best val mean AUROC, as training measured
    it, or the evaluated split's mean AUROC is below ``floor``: a run that did not learn fails its job."""
    from cxrdist.runfolder import RunFolder

    summary = RunFolder(run).read_summary()
    means = {
        "best val": summary.best_val_auc_mean if summary else None,
        result["split"]: (result["mean"]["all"] or [None])[0],
    }
    low = [f"{k} mean AUROC {v:.3f}" if v is not None else f"{k} mean AUROC undefined" for k, v in means.items()
           if v is None or v < floor]  # fmt: skip
    if low:
        print(
            f"cxrdist eval: {run}: {' and '.join(low)} below --min-auc {floor}: the run did not learn", file=sys.stderr
        )
        return 1
    print(f"{run}: " + ", ".join(f"{k} mean AUROC {v:.3f}" for k, v in means.items()) + f" >= --min-auc {floor}")
    return 0


def cmd_export(a) -> int:
    from cxrdist.export import export

    meta = export(a.checkpoint, a.format, a.out)
    print(json.dumps({k: meta[k] for k in ("file", "format", "inputs", "image", "labels", "temperature")}, indent=1))
    return 0


def cmd_predict(a) -> int:
    from cxrdist.evaluate import predict_files

    results = predict_files(a.checkpoint, a.files, as_json=a.json, cam_dir=a.cam, cam_labels=a.cam_labels)
    return 1 if results and all("error" in r for r in results) else 0  # nothing predicted is a failure


def cmd_report(a) -> int:
    from cxrdist.errors import UserError

    missing = [str(r) for r in a.runs if not Path(r).exists()]
    if missing:
        raise UserError(f"no such run folder: {', '.join(missing)}")
    if a.matrix:
        from cxrdist.matrix import build_matrix

        build_matrix(a.runs, a.out, split=a.split)
        print(f"wrote {a.out}/matrix.csv, matrix.md, matrix.png")
        return 0
    from cxrdist.report import build_report

    build_report(a.runs, out=a.out, published=a.published)
    return 0


def cmd_bench(a) -> int:
    from cxrdist import bench

    result = bench.run(a.what, out=a.out, quick=a.quick)
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cxrdist import __version__

    p = argparse.ArgumentParser(
        prog="cxrdist",
        allow_abbrev=False,
        description="Multi-label chest X-ray classification on GPU clusters: datasets (CheXpert, MIMIC-CXR, "
        "NIH ChestX-ray14) to WebDataset shards, training under single / DataParallel / DDP / DeepSpeed / FSDP "
        "with per-rank throughput and memory, evaluation, prediction, backend comparison reports and benchmarks.",
        epilog="Set-up and the SLURM launcher: see README.md (python launchers/submit.py --help).",
    )
    p.add_argument("--version", action="version", version=f"cxrdist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, **kw):  # each subcommand refuses abbreviations too (`train --batch 8` is not --batch-size)
        return sub.add_parser(name, allow_abbrev=False, **kw)

    from cxrdist import sources
    from cxrdist.labels import LABEL_SETS
    from cxrdist.synth import LAYOUTS

    s = add("synth", help="write a synthetic dataset in a real layout (CheXpert, MIMIC-CXR, NIH, PadChest, RSNA)")
    s.add_argument("--layout", choices=tuple(LAYOUTS), required=True)
    s.add_argument("--out", type=Path, required=True, metavar="DIR")
    s.add_argument("--n", type=int, default=1000, metavar="N", help="images")
    s.add_argument("--size", type=int, default=256, metavar="PX", help="image side in pixels (before aspect jitter)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    s = add("shard", help="preprocess a dataset into WebDataset shards with a manifest")
    s.add_argument("--source", choices=sources.names(), required=True)
    s.add_argument(
        "--root",
        type=Path,
        required=True,
        metavar="DIR",
        help="; ".join(f"{n}: {sources.get(n).root}" for n in sources.names()),
    )
    s.add_argument(  # a str: Path("s3://b/p") would be "s3:/b/p"
        "--out", required=True, metavar="LOCATION", help="a folder, s3://bucket/prefix or gs://bucket/prefix"
    )
    s.add_argument(
        "--staging",
        default=None,
        metavar="DIR",
        help="for a URL --out: the local folder shards are packed in before upload "
        "(default: $CXRDIST_STAGING or the temp folder; a rerun resumes there)",
    )
    s.add_argument(
        "--labels",
        default=None,
        metavar="SET|FILE",
        help=f"the label set the shards carry: {' | '.join(LABEL_SETS)} | a file of names, one per line "
        "(default: the source's own; a label the source lacks is masked out everywhere)",
    )
    s.add_argument(
        "--expert-labels",
        type=Path,
        default=None,
        metavar="FILE",
        help="nih: Google's google2019_nih-chest-xray-labels.csv: its images only, its 4 adjudicated labels, "
        "its Set Id as the split",
    )
    s.add_argument(
        "--label-method",
        choices=("physician", "all"),
        default=None,
        help="padchest: keep the rows physicians labelled, or also those its RNN labelled",
    )
    s.add_argument("--size", type=int, default=256, metavar="PX")
    s.add_argument("--encoding", choices=("jpg", "png16"), default="jpg")
    s.add_argument("--views", choices=("frontal", "all"), default="frontal")
    s.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY)
    s.add_argument("--split", choices=("patient", "official"), default="patient")
    s.add_argument("--workers", type=int, default=2, metavar="N")
    s.add_argument("--samples-per-shard", type=int, default=1000, metavar="N")
    s.add_argument(
        "--min-shards",
        type=int,
        default=None,
        metavar="N",
        help="at least this many shards per split, so ranks x loader workers <= shards "
        "(default 128: 64 GPUs x 2 workers)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dry-run", action="store_true", help="write the manifest from the tables alone")
    s.add_argument("--strict", action="store_true", help="fail when any input is skipped")
    s.set_defaults(func=cmd_shard)

    s = add("verify", help="re-hash and re-count every shard against the manifest")
    s.add_argument("dir", metavar="LOCATION", help="a shard folder, file://, s3://, gs://, http(s):// or pipe:CMD")
    s.set_defaults(func=cmd_verify)

    s = add("train", help="train a model on shards under one of the distributed backends")
    add_train_args(s)
    s.set_defaults(func=cmd_train)

    s = add("eval", help="evaluate a run's checkpoint on a split")
    s.add_argument("--run", type=Path, required=True, metavar="DIR")
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--checkpoint", default="best", help="best | last | a path")
    s.add_argument("--shards", default=None, metavar="LOCATION", help="another shard location (default: the run's own)")
    s.add_argument(
        "--map-labels",
        action="store_true",
        help="score a model on shards with another label set over the findings both hold "
        "(e.g. CheXpert's Pleural Effusion on NIH's Effusion)",
    )
    s.add_argument(
        "--operating-point",
        choices=("youden", "f1"),
        default="youden",
        help="how each label's threshold is chosen on val (default: Youden's J)",
    )
    s.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="patient-bootstrap replicates (default 1000)"
    )
    s.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    s.add_argument(
        "--cam",
        action="store_true",
        help="score Grad-CAM against the split's radiologist boxes (pointing game, mass ratio, IoU, each beside "
        "random maps), with overlays of hits and misses",
    )
    s.add_argument(
        "--allow-pipe",
        action="store_true",
        help="run the pipe: command RUN/config.yaml names as its shards (refused otherwise: whoever wrote the "
        "run folder chose that command)",
    )
    s.add_argument(
        "--min-auc",
        type=float,
        default=None,
        metavar="AUC",
        help="exit 1 when the run's best val mean AUROC or this split's is below AUC (a gate: make demo uses it)",
    )
    s.set_defaults(func=cmd_eval)

    s = add("predict", help="print the checkpoint's label probabilities for DICOM, JPEG or PNG files")
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--cam", type=Path, default=None, metavar="DIR", help="write Grad-CAM overlays (PNG) here")
    s.add_argument(
        "--cam-labels",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        metavar="A,B",
        help="heat maps for these labels (default: those above their operating threshold)",
    )
    s.add_argument("files", nargs="+", type=Path)
    s.set_defaults(func=cmd_predict)

    s = add("report", help="tables, csv and plots comparing runs (the poster's Tables 3 and 4)")
    s.add_argument("runs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, default=Path("reports/latest"))
    s.add_argument(
        "--matrix",
        action="store_true",
        help="the cross-dataset AUROC matrix of the runs' evaluations (their own test split and every "
        "`eval --shards X --map-labels`): matrix.csv, matrix.md, matrix.png",
    )
    s.add_argument("--split", default="test", choices=("val", "test"), help="--matrix: the evaluated split")
    s.add_argument(
        "--published",
        type=Path,
        default=None,
        metavar="CSV",
        help="published figures (model,dataset,accuracy,auc,source) shown beside the runs' test numbers, "
        "labelled as not rerun (docs/published/poster_table5.csv: the poster's Table 5)",
    )
    s.set_defaults(func=cmd_report)

    s = add("export", help="the checkpoint's eval-mode model as ONNX or TorchScript, preprocessing recorded")
    s.add_argument("--checkpoint", type=Path, required=True, help="a run folder, its checkpoints folder or a file")
    s.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    s.add_argument("--out", type=Path, required=True, metavar="FILE")
    s.set_defaults(func=cmd_export)

    s = add("bench", help="measure loader / packing / training-step ratios in one run")
    s.add_argument("what", choices=("loader", "pack", "step", "trainer", "eval"))
    s.add_argument("--out", type=Path)
    s.add_argument("--quick", action="store_true", help="fewer iterations (for tests)")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cxrdist import dist
    from cxrdist.redact import redact

    sys.argv[:] = [redact(a) for a in sys.argv]  # parsed: what the process reports of its command line (W&B
    # records it) holds no credentials from here on

    return dist.leave(run_command(args))  # a rank with peers ends here (see dist.leave)


def run_command(args) -> int:
    from cxrdist.redact import redact

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # clear one-line errors for the user's mistakes; tracebacks for ours
        from cxrdist.errors import UserError

        if isinstance(e, UserError):
            print(f"cxrdist {args.command}: error: {redact(str(e))}", file=sys.stderr)
            return 2
        import traceback

        print(redact("".join(traceback.format_exception(e))), file=sys.stderr, end="")  # no credentials in it
        return 1


if __name__ == "__main__":
    sys.exit(main())
