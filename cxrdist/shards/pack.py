"""``cxrdist shard``: the sample table -> ``{train,val,test}-NNNNNN.tar`` WebDataset shards + ``manifest.json``.

The plan is a pure function of the table and the options: per split, rows sorted by key, shuffled with the
seed, cut into ``max(ceil(n / samples_per_shard), min(n, min_shards))`` near-equal shards. Worker processes
each write whole shards (``wds.TarWriter`` into ``NAME.partial``, fsync, ``os.replace``), then a per-shard
record (``.records/NAME.json``: fingerprint, samples, bytes, sha256, skipped). A rerun keeps every final
shard whose record matches the current plan's fingerprint and whose bytes re-hash to the record, deletes
``.partial`` leftovers and re-packs the rest. ``.plan.json`` records which keys go to which shard.

A sample is ``{key}.jpg`` (or ``.png`` for png16) + ``{key}.json`` (labels, mask, patient_id, study_id, view,
sex, age, source) and nothing else: pixels are re-encoded from the decoded array, so no DICOM header or
other PHI can reach a shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrdist import imaging, log
from cxrdist.atomic import atomic_write_json, fsync_dir
from cxrdist.contain import OUTSIDE, SHARD_NAME, Outside, within
from cxrdist.errors import UserError
from cxrdist.labels import describe, set_name
from cxrdist.shards import location
from cxrdist.shards.manifest import DRY_RUN_MANIFEST, MANIFEST, SPLITS, VERSION, shard_name, write_manifest
from cxrdist.shards.verify import file_sha256

PLAN = ".plan.json"
RECORDS = ".records"
DEFAULT_MIN_SHARDS = 128  # ranks x loader workers <= shards, up to 64 GPUs x 2 workers
TAR_MTIME = 0  # fixed member mtimes: the same plan and images give the same bytes
PROGRESS_EVERY = 16


# --- the plan ----------------------------------------------------------------------------------------
def n_shards(samples: int, samples_per_shard: int, min_shards: int) -> int:
    if samples <= 0:
        return 0
    return max(math.ceil(samples / samples_per_shard), min(samples, min_shards))


def plan_shards(
    df, *, seed: int = 0, samples_per_shard: int = 1000, min_shards: int | None = None
) -> list[tuple[str, str, np.ndarray]]:
    """[(split, shard name, row indices into df)] in a deterministic, seeded order."""
    min_shards = DEFAULT_MIN_SHARDS if min_shards is None else min_shards
    keys = df["key"].to_numpy(dtype=object)
    split_col = df["split"].to_numpy(dtype=object)
    plan = []
    for si, split in enumerate(SPLITS):
        idx = np.flatnonzero(split_col == split)
        idx = idx[np.argsort(keys[idx], kind="stable")]
        idx = idx[np.random.default_rng([int(seed), si]).permutation(len(idx))]
        for i, chunk in enumerate(
            np.array_split(idx, n_shards(len(idx), samples_per_shard, min_shards)) if len(idx) else []
        ):
            plan.append((split, shard_name(split, i), chunk))
    return plan


@dataclass
class ShardTask:
    """Everything a worker needs for one shard (picklable; no DataFrame)."""

    name: str
    out: str
    root: str
    size: int
    encoding: str
    fingerprint: str
    keys: list
    paths: list
    patient_id: list
    study_id: list
    view: list
    sex: list
    age: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    boxes: list | None = None  # per sample: ((label, x, y, w, h), ...) in the file's pixels; None: no boxes


TEXT_COLUMNS = ("key", "path", "patient_id", "study_id", "view", "sex")


def make_tasks(table, plan, *, out: Path, size: int, encoding: str) -> list[ShardTask]:
    """One task per planned shard, with a fingerprint of everything that goes into its bytes."""
    df, root = table.df, table.root
    text = {c: df[c].to_numpy(dtype=object) for c in TEXT_COLUMNS}
    age_all = df["age"].to_numpy(np.float64)
    labels_all, mask_all = table.labels(), table.masks()
    boxes_all = df["boxes"].to_numpy(dtype=object) if "boxes" in df else None
    params = json.dumps(
        {
            "version": VERSION,
            "source": table.source,
            "root": str(root),
            "size": int(size),
            "encoding": encoding,
            "labels": list(table.label_names),
        },
        sort_keys=True,
    ).encode()
    tasks = []
    for _, name, rows in plan:
        cols = {c: text[c][rows].tolist() for c in TEXT_COLUMNS}
        age, labels, mask = age_all[rows], labels_all[rows], mask_all[rows]
        h = hashlib.sha256(params)
        for c in TEXT_COLUMNS:
            h.update(("\x00".join(cols[c]) + "\x01").encode())
        for a in (age, labels, mask):
            h.update(np.ascontiguousarray(a).tobytes())
        boxes = None if boxes_all is None else [tuple(map(tuple, b)) for b in boxes_all[rows]]
        if boxes is not None:
            h.update(json.dumps(boxes).encode())
        tasks.append(
            ShardTask(
                name=name,
                out=str(out),
                root=str(root),
                size=int(size),
                encoding=encoding,
                fingerprint=h.hexdigest(),
                keys=cols["key"],
                paths=cols["path"],
                patient_id=cols["patient_id"],
                study_id=cols["study_id"],
                view=cols["view"],
                sex=cols["sex"],
                age=age,
                labels=labels,
                mask=mask,
                boxes=boxes,
            )
        )
    return tasks


def sample_json(task: ShardTask, i: int, shape: tuple[int, int]) -> bytes:
    """A sample's json; its boxes (when the source has any) mapped from the h x w file into the stored frame."""
    age = float(task.age[i])
    extra = {}
    if task.boxes is not None and task.boxes[i]:
        extra["boxes"] = imaging.fit_boxes(task.boxes[i], *shape, task.size)
    return json.dumps(
        {
            "labels": [float(x) for x in task.labels[i]],
            "mask": [int(x) for x in task.mask[i]],
            "patient_id": task.patient_id[i],
            "study_id": task.study_id[i],
            "view": task.view[i],
            "sex": task.sex[i],
            "age": None if math.isnan(age) else age,
            "source": task.paths[i],
            **extra,
        }
    ).encode()


# --- a worker: one whole shard -----------------------------------------------------------------------
_progress = None  # callable(n) in-process, or a multiprocessing queue in a worker


def _init_worker(queue) -> None:
    global _progress
    _progress = queue


def _report(n: int) -> None:
    if n <= 0 or _progress is None:
        return
    if callable(_progress):
        _progress(n)
    else:
        _progress.put(n)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _ping() -> int:
    return os.getpid()


def pack_shard(task: ShardTask) -> dict:
    """Write one shard atomically; return (and record) its stats. Images that cannot be used are skipped."""
    from webdataset import TarWriter

    out, root = Path(task.out), Path(task.root)
    final, partial = out / task.name, out / (task.name + ".partial")
    skipped, samples, unexpected, pending = [], 0, None, 0
    with open(partial, "wb") as f:
        hw = _HashingWriter(f)
        writer = TarWriter(hw, encoder=False, mtime=TAR_MTIME)
        for i, (key, rel) in enumerate(zip(task.keys, task.paths)):
            try:
                img = imaging.read_image(within(root, rel))  # a symlink out of the dataset: Outside
                ext, data = imaging.encode(imaging.fit_square(img, task.size), task.encoding)
                meta = sample_json(task, i, img.shape)
            except Outside:
                skipped.append({"key": key, "source": rel, "reason": OUTSIDE})
            except imaging.UnusableImage as e:
                skipped.append({"key": key, "source": rel, "reason": str(e) or "unusable image"})
            except OSError as e:
                skipped.append({"key": key, "source": rel, "reason": f"cannot read: {e.strerror or e}"})
            except Exception as e:  # noqa: BLE001 - one odd file must not end a multi-hour pack
                unexpected = unexpected or e
                skipped.append({"key": key, "source": rel, "reason": f"unexpected {type(e).__name__}: {e}"})
            else:
                writer.write({"__key__": key, ext: data, "json": meta})
                samples += 1
            pending += 1
            if pending >= PROGRESS_EVERY:
                _report(pending)
                pending = 0
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    _report(pending)
    if unexpected is not None and samples == 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"{task.name}: every image failed, first with {type(unexpected).__name__}: "
            f"{unexpected} (a bug, not bad data?)"
        ) from unexpected
    os.replace(partial, final)
    fsync_dir(out)
    record = {
        "name": task.name,
        "fingerprint": task.fingerprint,
        "samples": samples,
        "bytes": hw.bytes,
        "sha256": hw.sha.hexdigest(),
        "skipped": skipped,
    }
    atomic_write_json(out / RECORDS / (task.name + ".json"), record, indent=None)
    return record


# --- running the workers -----------------------------------------------------------------------------
def _warm_imports() -> None:
    """Import what packing needs (webdataset pulls in torch: seconds) before any clock starts."""
    import webdataset  # noqa: F401


class WorkerPool:
    """``workers`` processes that pack whole shards, started *before* any thread of ours (the progress bar).

    Linux: fork. The workers only decode/encode images (PIL, pydicom, numpy; never CUDA or torch ops), so
    a parent holding CUDA or torch thread pools is fine, and nothing of ``__main__`` is re-imported (spawn
    and forkserver re-run the caller's script, which breaks ``python - <<EOF`` and unguarded scripts).
    Elsewhere: spawn. Every worker is up (imports done) before ``__enter__`` returns, so timings exclude
    start-up.
    """

    def __init__(self, workers: int):
        import sys

        _warm_imports()  # imported once here, inherited by forked workers
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.ctx = mp.get_context(method)
        self.queue = self.ctx.Queue()
        self.workers = workers
        self.ex = ProcessPoolExecutor(
            max_workers=workers, mp_context=self.ctx, initializer=_init_worker, initargs=(self.queue,)
        )
        try:
            for f in [self.ex.submit(_ping) for _ in range(workers)]:
                f.result()
        except BaseException:
            self.ex.shutdown(wait=False, cancel_futures=True)
            raise

    def run(self, tasks: list[ShardTask], advance) -> list[dict]:
        records = []
        pending = {self.ex.submit(pack_shard, t) for t in tasks}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                self.drain(advance)
                for f in done:
                    records.append(f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        self.drain(advance)
        return records

    def drain(self, advance) -> None:
        import queue as q

        while True:
            try:
                n = self.queue.get_nowait()
            except q.Empty:
                return
            advance(n)

    def close(self, wait_: bool = True) -> None:
        self.ex.shutdown(wait=wait_, cancel_futures=not wait_)
        self.drain(lambda n: None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(wait_=exc_type is None)


def run_tasks(tasks: list[ShardTask], advance, pool: WorkerPool | None = None) -> list[dict]:
    """Pack ``tasks`` in ``pool``, or in this process when there is none; ``advance(n)``: image progress."""
    global _progress
    if pool is not None:
        return pool.run(tasks, advance)
    _progress = advance
    try:
        return [pack_shard(t) for t in tasks]
    finally:
        _progress = None


# --- resume ------------------------------------------------------------------------------------------
def _load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tidy(out: Path, planned: dict[str, str]) -> tuple[dict[str, dict], list[str]]:
    """Delete leftovers; return (records of final shards that match the plan, names of stale shards removed)."""
    (out / RECORDS).mkdir(exist_ok=True)
    for p in out.glob("*.partial"):
        p.unlink()
    kept, stale = {}, []
    for p in sorted(out.iterdir()):
        if SHARD_NAME.match(p.name) and p.name not in planned:
            p.unlink()
            stale.append(p.name)
    for p in (out / RECORDS).glob("*.json"):
        if p.name[:-5] not in planned:
            p.unlink()
    for name, fp in planned.items():
        tar, rec_path = out / name, out / RECORDS / (name + ".json")
        rec = _load_record(rec_path) if rec_path.is_file() else None
        if (
            tar.is_file()
            and rec
            and rec.get("fingerprint") == fp
            and rec.get("bytes") == tar.stat().st_size
            and file_sha256(tar)[0] == rec.get("sha256")
        ):
            kept[name] = rec
        else:
            rec_path.unlink(missing_ok=True)
    return kept, stale


# --- the manifest ------------------------------------------------------------------------------------
def _split_summary(table, rows: np.ndarray) -> dict:
    labels = table.labels().astype(np.float64)[rows]
    mask = table.masks().astype(np.float64)[rows]
    pos, den = (labels * mask).sum(axis=0), mask.sum(axis=0)
    names = table.label_names
    return {
        "samples": int(len(rows)),
        "patients": len(set(table.df["patient_id"].to_numpy(dtype=object)[rows])),
        "prevalence": {o: (round(float(p / d), 6) if d > 0 else None) for o, p, d in zip(names, pos, den)},
    }


def protocol_name(source: str, split: str, seed: int) -> str:
    """What `cxrdist eval` prints next to every number: ``chexpert/official`` (valid.csv as test) or
    ``chexpert/patient-80-10-10 seed 0``."""
    return f"{source}/official" if split == "official" else f"{source}/patient-80-10-10 seed {seed}"


def build_manifest(
    table,
    plan,
    records: dict[str, dict] | None,
    *,
    size: int,
    encoding: str,
    seed: int,
    samples_per_shard: int,
    min_shards: int | None,
) -> dict:
    df = table.df
    keys = df["key"].to_numpy(dtype=object)
    dry = records is None
    failed = set() if dry else {s["key"] for r in records.values() for s in r["skipped"]}
    splits = {}
    for split in SPLITS:
        entries = [(name, rows) for s, name, rows in plan if s == split]
        rows = np.concatenate([r for _, r in entries]) if entries else np.zeros(0, dtype=np.int64)
        if failed:
            rows = rows[~np.isin(keys[rows], list(failed))]
        summary = _split_summary(table, rows)
        if dry:
            summary["shards"] = [{"name": n, "samples": int(len(r)), "bytes": None, "sha256": None} for n, r in entries]
        else:
            summary["shards"] = [{k: records[n][k] for k in ("name", "samples", "bytes", "sha256")} for n, _ in entries]
        splits[split] = summary
    packed = sum(s["samples"] for s in splits.values())
    skipped = list(table.skipped)
    if not dry:
        for _, name, _ in plan:
            skipped += [{"source": s["source"], "reason": s["reason"]} for s in records[name]["skipped"]]
    m = {
        "version": VERSION,
        "source": table.source,
        "root": str(Path(table.root).resolve()),
        "labels": list(table.label_names),
        "label_set": set_name(table.label_names),
        "labels_missing": list(table.labels_missing),
        "unparseable": dict(table.unparseable),  # source column -> cells read as missing (e.g. Age "abc")
        "policy": table.policy,
        "split": table.split,
        "protocol": table.protocol or protocol_name(table.source, table.split, seed),
        "views": table.views,
        "size": int(size),
        "encoding": encoding,
        "counts": [[step, int(n)] for step, n in table.counts] + [["planned" if dry else "packed", packed]],
        "splits": splits,
        "skipped": skipped,
        "dry_run": dry,
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "min_shards": DEFAULT_MIN_SHARDS if min_shards is None else int(min_shards),
        "split_info": table.split_info,
        "notes": list(table.notes),
    }
    return m


def _print_summary(console, m: dict, out: Path) -> None:
    from rich.table import Table

    console.print(" → ".join(f"{step} {n:,}" for step, n in m["counts"]))
    t = Table(title=f"{out}{' (dry run)' if m['dry_run'] else ''}")
    for col in ("split", "samples", "patients", "shards", "MB"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for split in SPLITS:
        s = m["splits"][split]
        mb = sum(x["bytes"] or 0 for x in s["shards"]) / 1e6
        t.add_row(
            split,
            f"{s['samples']:,}",
            f"{s['patients']:,}",
            f"{len(s['shards']):,}",
            "-" if m["dry_run"] else f"{mb:,.1f}",
        )
    console.print(t)
    console.print(f"labels: {describe(m['labels'])}")
    if m["labels_missing"]:
        console.print(f"[yellow]{m['source']} provides no {', '.join(m['labels_missing'])}[/]: masked out everywhere")
    for column, n in m["unparseable"].items():
        console.print(f"[yellow]{n:,} {column} cell(s) unparseable[/]: read as missing (manifest: unparseable)")
    gap = m["split_info"].get("max_prevalence_gap")
    if gap is not None:
        console.print(f"split {m['split']}: largest label prevalence difference between splits {gap:.4f}")
    if m["skipped"]:
        console.print(
            f"[yellow]{len(m['skipped']):,} input rows skipped[/] (first: {m['skipped'][0]['source']}: "
            f"{m['skipped'][0]['reason']}); all are listed under skipped in the manifest"
        )


def pack(
    source,
    root,
    out,
    size=256,
    encoding="jpg",
    views="frontal",
    policy="u-zeros",
    split="patient",
    workers=2,
    samples_per_shard=1000,
    dry_run=False,
    strict=False,
    seed=0,
    min_shards=None,
    quiet=False,
    labels=None,
    staging=None,
    source_options=None,
) -> dict | None:
    """Pack a dataset into WebDataset shards; returns the manifest (also written to ``out/manifest.json``).
    ``labels``: a label set's name or a file of names (``labels.resolve``); default the source's own.
    ``out`` may be an ``s3://`` or ``gs://`` location: the shards are packed in ``staging`` (a local folder,
    resumable as ever), then each is uploaded unless it is there already, the manifest last.
    ``source_options``: the source reader's own (NIH ``expert_labels``, PadChest ``label_method``, ...)."""
    options = dict(locals())
    loc = location.parse(out)
    if loc.local is None:
        return _pack_to(loc, options)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cxrdist.imaging import ENCODINGS
    from cxrdist.sources import build_table
    from cxrdist.sources.table import no_rows_message

    if encoding not in ENCODINGS:
        raise UserError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    for what, v in (("size", size), ("workers", workers), ("samples_per_shard", samples_per_shard)):
        if int(v) < 1:
            raise UserError(f"{what} must be at least 1 (got {v})")
    if min_shards is not None and int(min_shards) < 1:
        raise UserError(f"min_shards must be at least 1 (got {min_shards})")
    console = log.console(quiet=quiet)
    t0 = time.perf_counter()
    table = build_table(
        source, root, views=views, policy=policy, split=split, seed=seed, labels=labels, **(source_options or {})
    )
    if table.df.empty:  # e.g. --views frontal on a folder of laterals
        raise UserError(no_rows_message(root, table.counts, table.skipped))
    plan = plan_shards(table.df, seed=seed, samples_per_shard=samples_per_shard, min_shards=min_shards)
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the shard folder: {e.strerror or e}") from None
    mkw = dict(size=size, encoding=encoding, seed=seed, samples_per_shard=samples_per_shard, min_shards=min_shards)

    if dry_run:
        m = build_manifest(table, plan, None, **mkw)
        real = (out / MANIFEST).is_file() and not _is_dry(out / MANIFEST)
        path = write_manifest(out, m, DRY_RUN_MANIFEST if real else MANIFEST)
        _print_summary(console, m, out)
        console.print(f"dry run: wrote {path} (no image read)")
        _maybe_strict(strict, m, path)
        return m

    tasks = make_tasks(table, plan, out=out, size=size, encoding=encoding)
    planned = {t.name: t.fingerprint for t in tasks}
    kept, stale = _tidy(out, planned)
    todo = [t for t in tasks if t.name not in kept]
    if todo or stale:
        (out / MANIFEST).unlink(missing_ok=True)  # it no longer describes the folder
    (out / DRY_RUN_MANIFEST).unlink(missing_ok=True)
    atomic_write_json(
        out / PLAN,
        {
            "version": VERSION,
            "source": source,
            "root": str(table.root),
            "size": size,
            "encoding": encoding,
            "labels": list(table.label_names),
            "seed": seed,
            "shards": [{"name": t.name, "fingerprint": t.fingerprint, "keys": t.keys} for t in tasks],
        },
        indent=None,
    )
    if stale:
        console.print(
            f"removed {len(stale)} shard(s) from an earlier plan: {', '.join(stale[:3])}"
            f"{' ...' if len(stale) > 3 else ''}"
        )
    if kept:
        console.print(f"resuming: {len(kept)} of {len(tasks)} shards already packed and intact")
    t_table = time.perf_counter() - t0
    n_images = sum(len(t.keys) for t in todo)
    workers = max(1, min(int(workers), len(todo)))
    if todo:
        _warm_imports()
    with WorkerPool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        start = time.perf_counter()
        with Progress(
            TextColumn("packing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or not n_images,
        ) as progress:
            bar = progress.add_task("pack", total=n_images)
            new = run_tasks(todo, lambda n: progress.advance(bar, n), pool)
        t_pack = time.perf_counter() - start
    records = {**kept, **{r["name"]: r for r in new}}
    m = build_manifest(table, plan, records, **mkw)
    m["timing"] = {
        "table_s": round(t_table, 3),
        "pack_s": round(t_pack, 3),
        "images": n_images,
        "images_per_s": round(n_images / t_pack, 2) if t_pack > 0 and n_images else None,
        "workers": workers,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    path = write_manifest(out, m)
    _print_summary(console, m, out)
    _maybe_strict(strict, m, path)
    return m


UPLOADED = ".uploaded.json"


def staging_folder(loc: location.Location) -> Path:
    """Where shards for ``loc`` are packed before upload (``CXRDIST_STAGING`` or the temp folder)."""
    base = Path(os.environ.get("CXRDIST_STAGING") or tempfile.gettempdir()) / "cxrdist-staging"
    return base / hashlib.sha256(loc.text.encode()).hexdigest()[:16]


def _pack_to(loc: location.Location, options: dict) -> dict | None:
    """``pack`` into a staging folder, then upload what the location lacks: every shard whose size there
    differs, the manifest last (removed first while shards change, so it never describes other bytes)."""
    if not loc.writable:
        raise UserError(f"--out {loc}: shards can be written to a folder, s3:// or gs://, not {loc.scheme}")
    stage = Path(options["staging"] or staging_folder(loc))
    console = log.console(quiet=options["quiet"])
    console.print(f"packing in {stage}, then uploading to {loc}")
    m = pack(**{**options, "out": stage, "staging": None})
    if m is None or options["dry_run"]:
        return m
    there = loc.sizes() or {}
    record = stage / UPLOADED  # {url: {shard: sha256}}: what this staging folder has put where
    sent = json.loads(record.read_text()).get(loc.text, {}) if record.is_file() else {}
    shards = {s["name"]: s for split in SPLITS for s in m["splits"][split]["shards"]}
    todo = [n for n, s in shards.items() if sent.get(n) != s["sha256"] or there.get(n) != s["bytes"]]
    if todo:
        loc.remove(MANIFEST)  # it would describe bytes that are about to change
    for n in todo:
        loc.put(stage / n, n)
        sent[n] = shards[n]["sha256"]
        atomic_write_json(record, {loc.text: sent})
    for n in sorted(set(there) - set(shards)):
        if SHARD_NAME.match(n):  # a shard of an earlier plan: no manifest lists it any more
            loc.remove(n)
    loc.put(stage / MANIFEST, MANIFEST)
    names = list(shards)
    console.print(f"uploaded {len(todo)} of {len(names)} shards to {loc} ({len(names) - len(todo)} already there)")
    return m


def _is_dry(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("dry_run"))
    except (OSError, ValueError, AttributeError):
        return False


def _maybe_strict(strict: bool, m: dict, path: Path) -> None:
    if strict and m["skipped"]:
        first = "; ".join(f"{s['source']}: {s['reason']}" for s in m["skipped"][:3])
        raise UserError(
            f"--strict: {len(m['skipped'])} input row(s) skipped ({first}"
            f"{'; ...' if len(m['skipped']) > 3 else ''}); all are listed in {path}"
        )


def pack_rate(
    source, root, out, size=256, workers=1, *, encoding="jpg", samples_per_shard=1000, min_shards=None
) -> float:
    """Images per second of a fresh pack run into ``out/pack-w{workers}`` (wiped first), timed from the
    moment the workers are up to the last shard (table building and process start-up excluded; both are
    in the manifest's ``timing``). ``min_shards`` defaults to 4 per worker so that tiny benchmark sets are
    not dominated by per-shard overhead."""
    import shutil

    folder = Path(out) / f"pack-w{workers}"
    if folder.exists():
        shutil.rmtree(folder)
    m = pack(
        source,
        root,
        folder,
        size=size,
        encoding=encoding,
        workers=workers,
        samples_per_shard=samples_per_shard,
        min_shards=min_shards or 4 * max(1, workers),
        quiet=True,
    )
    rate = m["timing"]["images_per_s"]
    if not rate:
        raise UserError(f"{root}: nothing was packed, so there is no rate to report")
    return float(rate)


__all__ = ["pack", "pack_rate", "plan_shards", "n_shards", "pack_shard", "build_manifest"]


def synth_shards(
    work: Path,
    *,
    n: int,
    raw_size: int,
    size: int,
    layout: str = "chexpert",
    source: str | None = None,
    name: str = "synth",
    **pack_options,
) -> tuple[Path, Path]:
    """A synthetic dataset in a real layout (``cxrdist synth``) packed with the default recipe: what the
    benchmarks, gpu-check and the tests train on. ``source`` defaults to the one whose format ``layout``
    writes. Returns (dataset root, shard folder ``work/<name>-shards``)."""
    from cxrdist.sources import for_layout
    from cxrdist.synth import synthesize

    source = source or for_layout(layout).name
    root = synthesize(layout=layout, out=Path(work) / f"{name}-src", n=n, size=raw_size, seed=0)
    out = Path(work) / f"{name}-shards"
    pack(source=source, root=root, out=out, size=size, **{"quiet": True, "min_shards": 1, **pack_options})
    return Path(root), out
