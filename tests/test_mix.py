"""Training on several sources at once (#22): the union label set, the mix file, the mixed epoch order with
its per-batch proportions, the loaders over a CheXpert + NIH mix (masks, keys, exact-once evaluation,
topology-independent global batches, resume) and a mixed run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrdist.data import World, eval_loader, train_loader
from cxrdist.data.partition import micro_positions, steps_per_epoch
from cxrdist.data.shuffle import epoch_order, mixed_order
from cxrdist.engine.trainer import geometry_problem, masked_bce
from cxrdist.errors import UserError
from cxrdist.labels import CHEXPERT, NIH, union
from cxrdist.shards.mix import Entry, entries_of, epoch_samples, open_mix, parse_mix_file

from runs import TINY, in_process, recorded_batches, summary
from servers import http_server

NIH_ONLY = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


# -- the label union, the mix file, the samples per epoch (pure) -----------------------------------------------
def test_the_union_of_chexpert_and_nih_holds_each_finding_once():
    names, (cx, nih) = union([CHEXPERT, NIH])
    assert names == CHEXPERT + NIH_ONLY  # CheXpert's 14 in order, then NIH's 7 that CheXpert lacks
    assert cx == tuple(range(14))
    assert names[nih[NIH.index("Effusion")]] == "Pleural Effusion"  # SAME_FINDING: one column
    assert names[nih[NIH.index("Atelectasis")]] == "Atelectasis" and len(set(nih)) == 14
    assert union([NIH, CHEXPERT])[0][:14] == NIH  # the first source's order leads


def test_a_mix_file_gives_weights_or_samples_and_names_the_row_it_cannot_use(tmp_path):
    got = parse_mix_file("shards,weight\n/a,2\ns3://b/c,0.5\n", "mix.csv")
    assert got == [Entry("/a", weight=2.0), Entry("s3://b/c", weight=0.5)]
    assert parse_mix_file("shards,samples\n/a,100\n", "m")[0] == Entry("/a", samples=100)
    with pytest.raises(UserError, match="mix.csv:3: .*positive weight"):
        parse_mix_file("shards,weight\n/a,1\n/b,-1\n", "mix.csv")
    with pytest.raises(UserError, match="one of 'weight' or 'samples'"):
        parse_mix_file("shards,weight,samples\n/a,1,2\n", "m")
    bad = tmp_path / "mix.csv"
    bad.write_text("shards,weight\n/a,1\npipe:curl -s http://x/{name},1\n")
    with pytest.raises(UserError, match="pipe: command"):  # a file never runs a command
        entries_of("", str(bad))
    with pytest.raises(UserError, match="listed twice"):
        entries_of("/a,/a")


def test_weights_take_the_largest_epoch_that_repeats_no_sample():
    e = [Entry("a", weight=2), Entry("b", weight=1)]
    assert epoch_samples([1000, 300], e) == [600, 300]  # b runs out first
    assert epoch_samples([100, 300], e) == [100, 50]
    assert epoch_samples([1000, 300], [Entry("a"), Entry("b")]) == [1000, 300]  # natural proportions
    assert epoch_samples([1000, 300], [Entry("a", samples=10), Entry("b", samples=300)]) == [10, 300]
    with pytest.raises(UserError, match="asks 301 training samples per epoch of 300"):
        epoch_samples([1000, 300], [Entry("a", samples=10), Entry("b", samples=301)])


# -- the mixed epoch order (pure) -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(40))
def test_every_global_batch_holds_each_source_in_proportion_within_two_samples(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    sizes = [list(rng.integers(1, 200, size=int(rng.integers(1, 6)))) for _ in range(k)]
    counts = [int(rng.integers(1, sum(s) + 1)) for s in sizes]
    gb = int(rng.integers(1, 256))
    order = mixed_order(sizes, counts, seed, 1, window=64)
    share = np.asarray(counts) / sum(counts)
    steps = steps_per_epoch(order.samples, gb)
    per_batch = (
        np.stack([np.bincount(b, minlength=k) for b in order.source[: steps * gb].reshape(steps, gb)])
        if steps
        else None
    )
    if steps:
        assert np.abs(per_batch - gb * share).max() < 2
    for s, n in enumerate(counts):
        mine = order.index[order.source == s]
        assert len(mine) == n  # the first n of the source's own order, in that order
        assert np.array_equal(mine, order.parts[s].order[:n])
    again = mixed_order(sizes, counts, seed, 1, window=64)
    assert np.array_equal(again.source, order.source) and np.array_equal(again.index, order.index)


def test_one_source_is_the_unmixed_order_and_each_source_shuffles_apart():
    one = mixed_order([[50, 60]], [110], 3, 2, 16)
    assert np.array_equal(one.index, epoch_order([50, 60], 3, 2, 16).order)
    two = mixed_order([[50, 60], [50, 60]], [110, 110], 3, 2, 16)
    assert not np.array_equal(two.parts[0].order, two.parts[1].order)  # equal sizes, their own shuffles


# -- the loaders over a CheXpert + NIH mix ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tiny_shards, nih_shards):
    return open_mix([Entry(str(tiny_shards["shards"])), Entry(str(nih_shards["shards"]))])


def epoch_batches(shards, world_size: int, workers: int, micro: int, gb: int, start: int = 0, epoch: int = 1,
                  seed: int = 5) -> dict[int, set]:  # fmt: skip
    """Every rank's training micro-batches of ``epoch``, as {optimizer step: the keys of its global batch}."""
    got: dict[int, set] = {}
    for rank in range(world_size):
        w = World.of(rank=rank, world_size=world_size, workers=workers, seed=seed, micro_batch=micro, global_batch=gb)
        loader = train_loader(shards, w.at_epoch(epoch), start_step=start)
        for i, batch in enumerate(loader):
            step = start + i // w.accumulate
            got.setdefault(step, set()).update(batch["key"])
    return got


def test_a_mixed_shard_set_unites_labels_masks_and_names_each_source(mixed):
    assert mixed.labels == CHEXPERT + NIH_ONLY and [p.name for p in mixed.parts] == ["chexpert", "nih"]
    assert mixed.epoch_samples() == sum(p.set.samples("train") for p in mixed.parts)
    cols = {n: i for i, n in enumerate(mixed.labels)}
    batches = list(train_loader(mixed, World.of(rank=0, world_size=1, workers=0, seed=0, micro_batch=16)))
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) and {k.split("/")[0] for k in keys} == {"chexpert", "nih"}
    for b in batches:
        from_cx = np.array([k.startswith("chexpert/") for k in b["key"]])
        nih_only = [cols[n] for n in NIH_ONLY]
        assert not b["mask"][from_cx][:, nih_only].any()  # CheXpert never defines NIH's own findings
        assert not b["mask"][~from_cx][:, [cols["No Finding"], cols["Support Devices"]]].any()
        assert b["mask"][~from_cx][:, cols["Pleural Effusion"]].all()  # NIH's Effusion, one column
        assert all(p.startswith(k.split("/")[0] + "/") for p, k in zip(b["patient_id"], b["key"]))
        # through the loss: an NIH-only label of a CheXpert sample gets no gradient, whatever its logit
        logits = torch.randn(b["labels"].shape, requires_grad=True)
        masked_bce(logits, b["labels"], b["mask"]).backward()
        assert not logits.grad[torch.from_numpy(from_cx)][:, nih_only].any()
        assert logits.grad[torch.from_numpy(~from_cx)][:, nih_only].abs().sum() > 0


def test_the_mix_trains_the_same_global_batches_on_any_topology_and_resumes_mid_epoch(mixed):
    one = epoch_batches(mixed, 1, 0, 24, 24)
    assert epoch_batches(mixed, 2, 2, 6, 24) == one  # 2 ranks x 2 workers x 2 accumulation steps
    assert epoch_batches(mixed, 1, 0, 24, 24, start=5) == {s: k for s, k in one.items() if s >= 5}
    share = {p.name: p.epoch_samples / mixed.epoch_samples() for p in mixed.parts}
    for keys in one.values():
        n_cx = sum(k.startswith("chexpert/") for k in keys)
        assert abs(n_cx - 24 * share["chexpert"]) < 2
    seen = [k for keys in one.values() for k in keys]
    assert len(seen) == len(set(seen)) == steps_per_epoch(mixed.epoch_samples(), 24) * 24


def test_a_weighted_mix_reads_its_share_of_a_source(tiny_shards, nih_shards):
    shards = open_mix([Entry(str(tiny_shards["shards"]), samples=64), Entry(str(nih_shards["shards"]), samples=32)])
    got = epoch_batches(shards, 1, 0, 12, 12)
    keys = [k for s in got.values() for k in s]
    assert len(keys) == 96 and sum(k.startswith("chexpert/") for k in keys) == 64
    assert all(sum(k.startswith("nih/") for k in s) == 4 for s in got.values())  # 12 x 1/3, every batch
    w = World.of(rank=0, world_size=1, workers=0, seed=5, micro_batch=12)
    order = mixed_order(
        [shards.parts[0].set.sizes("train"), shards.parts[1].set.sizes("train")], [64, 32], 5, 1, 16_384
    )
    assert order.source[micro_positions(w, 0)].tolist().count(1) == 4


def test_mixed_evaluation_reads_every_sample_once_and_scores_each_source(mixed):
    from cxrdist.engine.evaluation import merge, score

    parts = []
    for rank in range(2):
        w = World.of(rank=rank, world_size=2, workers=2, seed=0, micro_batch=7)
        part = {"key": [], "patient_id": [], "labels": [], "mask": []}
        for b in eval_loader(mixed, "val", w):
            part["key"] += b["key"]
            part["patient_id"] += b["patient_id"]
            part["labels"].append(b["labels"].numpy())
            part["mask"].append(b["mask"].numpy())
        parts.append(part)
    keys = sorted(k for p in parts for k in p["key"])
    assert len(keys) == len(set(keys)) == mixed.samples("val") == sum(p.set.samples("val") for p in mixed.parts)
    rng = np.random.default_rng(0)
    whole = merge(
        [
            p
            | {
                "labels": np.concatenate(p["labels"]),
                "mask": np.concatenate(p["mask"]),
                "prob": rng.random((len(p["key"]), len(mixed.labels))),
                "view": [""] * len(p["key"]),
                "sex": np.zeros(len(p["key"]), np.float32),
                "age": np.zeros(len(p["key"]), np.float32),
            }
            for p in parts
        ],
        expected=mixed.samples("val"),
    )
    scored = score(whole, mixed.labels, sources=("chexpert", "nih"))
    assert set(scored["by_source"]) == {"chexpert", "nih"}
    assert scored["by_source"]["chexpert"]["auc"]["Mass"] is None  # not defined there: no AUROC, not a 0.5
    assert scored["by_source"]["nih"]["auc"]["Support Devices"] is None


def test_a_resume_with_another_mix_is_refused():
    saved = {"global_batch": 8, "steps_per_epoch": 10, "mix": {"chexpert": 40, "nih": 40}}
    assert geometry_problem(saved, dict(saved)) is None
    assert "mix" in geometry_problem(saved, saved | {"mix": {"chexpert": 60, "nih": 20}})
    assert "one source" in geometry_problem(saved, {"global_batch": 8, "steps_per_epoch": 10})


def test_a_mix_of_two_image_sizes_is_refused_naming_both(tiny_shards, learnable_shards):
    with pytest.raises(UserError, match="size 64.*size|its images are size"):
        open_mix([Entry(str(tiny_shards["shards"])), Entry(str(learnable_shards["shards"]))])


# -- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_mixed_run_reports_per_source_and_pooled_val_auroc_and_eval_scores_each_source(
    tmp_path, tiny_shards, nih_shards
):
    run = tmp_path / "mix"
    mix_file = tmp_path / "mix.csv"
    mix_file.write_text(f"shards,weight\n{tiny_shards['shards']},1\n{nih_shards['shards']},1\n")
    in_process("train", "--mix", mix_file, "--out", run, *TINY, "--epochs", "2", "--no-test", check=True)
    s = summary(run)
    last = s["epochs"][-1]
    assert set(last["val_auc_by_source"]) == {"chexpert", "nih"} and last["val_auc_mean"] is not None
    assert len(last["val_auc"]) == 21
    proc = in_process("eval", "--run", run, "--split", "test", "--bootstrap", "50", check=True)
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert set(metrics["by_source"]) == {"chexpert", "nih"}, proc.stdout
    assert sum(v["n"] for v in metrics["by_source"].values()) == metrics["n"]
    in_process("report", "--matrix", run, "--out", tmp_path / "matrix", check=True)  # ALLData's row: both bold
    text = (tmp_path / "matrix" / "matrix.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| mix (chexpert+nih) |"))
    assert row.count("**") == 4  # both cells in-distribution


@pytest.mark.slow
def test_a_mix_streams_one_source_through_the_shard_cache_on_two_ddp_ranks(tmp_path, tiny_shards, nih_shards):
    """CheXpert from its folder, NIH from an HTTP server through --shard-cache, two DDP ranks: the global batches
    the ranks recorded are those the mixed order plans, and the cache holds the streamed shards."""
    import shutil

    folder = tmp_path / "www" / "nih"
    shutil.copytree(nih_shards["shards"], folder)
    run, cache, gb = tmp_path / "run", tmp_path / "cache", 16
    with http_server(tmp_path / "www") as (base, _, _):
        shards = f"{tiny_shards['shards']},{base}/nih"
        in_process("train", "--shards", shards, "--shard-cache", cache, "--out", run, "--backend", "ddp", "--nproc",
                   "2", "--epochs", "1", "--global-batch-size", gb, "--record-samples", "--no-test", *TINY,
                   check=True)  # fmt: skip
        mixed = open_mix([Entry(str(tiny_shards["shards"])), Entry(str(folder))])
        want = epoch_batches(mixed, 1, 0, gb, gb, epoch=0, seed=0)
    assert recorded_batches(run, 0, gb) == [want[s] for s in sorted(want)]
    assert set(summary(run)["epochs"][0]["val_auc_by_source"]) == {"chexpert", "nih"}
    streamed = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert {p.name for p in cache.rglob("train-*.tar")} == {s["name"] for s in streamed}
