"""``metrics.json`` for people: ``report.md`` and the terminal table. Every number carries the protocol and
split it was measured on, and an interval where the record has one."""

from __future__ import annotations

from rich.table import Table

from cxrdist import log, metrics


def ci(value: list | None) -> str:
    return metrics.fmt_interval(value)


def num(value: float | None, percent: bool = True, digits: int = 1) -> str:
    if value is None:
        return "undef"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits + 2}f}"


def headline(m: dict) -> str:
    """One line: both means with intervals, the protocol and the split."""
    return (
        f"mean AUROC {ci(m['mean']['all'])} over {len(m['labels']) - len(m['undefined'])} labels, "
        f"competition-5 {ci(m['mean']['competition5'])}: {m['split']} split, protocol {m['protocol']}, "
        f"{m['n']:,} images of {m['patients']:,} patients"
    )


LABEL_COLUMNS = ("label", "n", "pos", "AUROC (95% CI)", "AUPRC (95% CI)", "thr", "sens", "spec", "PPV", "F1", "acc@0.5")


def label_rows(m: dict) -> list[list[str]]:
    rows = []
    for name, r in m["labels"].items():
        rows.append(
            [
                name,
                str(r["n"]),
                str(r["positives"]),
                ci(r["auroc"]),
                ci(r["auprc"]),
                "undef" if r["threshold"] is None else f"{r['threshold']:.3f}",
                *(num(r[k]) for k in ("sensitivity", "specificity", "ppv", "f1", "accuracy@0.5")),
            ]
        )
    return rows


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(m: dict, title: str, plots: list[str]) -> str:
    cal = m["calibration"]
    op = m["operating_point"]
    lines = [
        f"# {title}",
        "",
        headline(m) + ".",
        "",
        f"Intervals: {int(100 * m['bootstrap']['confidence'])}% percentile bootstrap over "
        f"{m['bootstrap']['replicates']} resamplings of patients (seed {m['bootstrap']['seed']}). "
        f"Operating points: {op['rule']} on {op['fitted_on']}"
        + (" (fitted and applied on the same split)." if m["split"] == op["fitted_on"] else "."),
        "",
        "## Per label",
        "",
        *_md_table(LABEL_COLUMNS, label_rows(m)),
        "",
    ]
    if m["undefined"]:
        lines += [f"Undefined (one class in this split, left out of the means): {', '.join(m['undefined'])}.", ""]
    lines += [
        f"Competition-5 mean over: {', '.join(m['competition5_labels']) or 'none of the five in this label set'}.",
        "",
        "## Calibration",
        "",
        *_md_table(
            ("", "ECE", "Brier"),
            [
                ["as trained", num(cal["ece"], False, 2), num(cal["brier"], False, 2)],
                [
                    f"temperature {cal['temperature']:.3f}",
                    num(cal["ece_scaled"], False, 2),
                    num(cal["brier_scaled"], False, 2),
                ],
            ],
        ),
        "",
        "## Subgroups (mean AUROC; TPR gap at the operating point vs the attribute's median group)",
        "",
    ]
    rows = [
        [attr, g, str(r["n"]), ci(r["auroc_mean"]), num(r["tpr_gap"], True, 1)]
        for attr, groups in m["subgroups"].items()
        for g, r in groups.items()
    ]
    lines += _md_table(("attribute", "group", "n", "mean AUROC (95% CI)", "TPR gap (pp)"), rows) + [""]
    if "localization" in m:
        lines += localization_lines(m["localization"])
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def localization_lines(loc: dict) -> list[str]:
    """report.md's Grad-CAM section: each measure for the model's maps and for random maps."""
    rows = [
        [label, str(r["n"]), *(f"{ci(r['cam'][k])} vs {ci(r['random'][k])}" for k in ("pointing", "mass_ratio", "iou"))]
        for label, r in loc["labels"].items()
    ]
    return [
        "## Grad-CAM against the radiologists' boxes (model vs random maps)",
        "",
        f"Pointing game: the map's maximum inside a box. Mass ratio: the map's share inside the boxes over their "
        f"share of the image (1 = flat). IoU: the map at {loc['threshold']} of its peak. Random maps: "
        f"{loc['random_maps']} per sample, noise on a coarse grid upsampled like a CAM. Boxes of labels the model "
        f"does not score: {loc['unscored_boxes']}. Overlays of hits and misses in cam/.",
        "",
        *_md_table(("label", "n", "pointing game", "mass ratio", "IoU"), rows),
        "",
    ]


def print_table(m: dict, title: str) -> None:
    table = Table(title=title, caption=headline(m))
    for col in LABEL_COLUMNS:
        table.add_column(col, justify="left" if col == "label" else "right")
    for row in label_rows(m):
        table.add_row(*row)
    log.console().print(table)
