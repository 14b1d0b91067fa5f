"""Evaluation a paper can stand on: the metrics against scikit-learn recomputed from predictions.csv, interval
coverage on scores of known AUC, operating points, calibration, the protocol, `cxrdist eval` / `predict`
end to end, and Grad-CAM's localisation and randomisation checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrdist import metrics
from cxrdist.evaluate.record import Predictions, fit_operating_points, score
from cxrdist.labels import CHEXPERT, COMPETITION5

from runs import cli, in_process


# --- pure metrics ---------------------------------------------------------------------------------------
def test_weighted_auroc_and_auprc_equal_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.round(rng.random(400) * 0.6 + 0.3 * y, 1)  # heavy ties
    w = metrics.patient_weights(np.arange(400) // 4, replicates=5, seed=1)
    auroc, auprc = metrics.auroc_rows(p, y, w), metrics.auprc_rows(p, y, w)
    for r in range(len(w)):
        assert auroc[r] == pytest.approx(roc_auc_score(y, p, sample_weight=w[r]), abs=1e-12)
        assert auprc[r] == pytest.approx(average_precision_score(y, p, sample_weight=w[r]), abs=1e-12)


def test_patient_bootstrap_draws_whole_patients():
    patients = np.repeat(np.arange(50), 3)
    w = metrics.patient_weights(patients, replicates=20, seed=0)
    assert (w[0] == 1).all()
    for row in w[1:]:
        per_patient = row.reshape(50, 3)
        assert (per_patient == per_patient[:, :1]).all()  # a patient's images weigh the same
        assert per_patient[:, 0].sum() == 50  # as many patients drawn as there are


def test_intervals_cover_a_known_auc_about_95_percent_of_the_time():
    """Scores N(d, 1) vs N(0, 1) have AUC Phi(d / sqrt 2); 200 draws, each with its 95% interval."""
    d, truth = 1.0, 0.5 * (1 + math.erf(1.0 / 2))  # Phi(d / sqrt(2)) = 0.7602
    rng, covered = np.random.default_rng(7), 0
    draws = 200
    for i in range(draws):
        y = (rng.random(150) < 0.4).astype(float)
        p = rng.normal(d * y, 1.0)
        lo, hi = metrics.interval(metrics.auroc_rows(p, y, metrics.patient_weights(np.arange(150), 500, seed=i)))[1:]
        covered += lo <= truth <= hi
    print(f"coverage of the 95% patient-bootstrap interval at AUC {truth:.4f}: {covered}/{draws}")
    assert 0.90 <= covered / draws <= 0.99, covered


def test_operating_points_rates_and_undefined_labels():
    y = np.array([0, 0, 0, 1, 1, 1.0])
    p = np.array([0.1, 0.2, 0.6, 0.55, 0.8, 0.9])
    t = metrics.operating_threshold(y, p, "youden")
    assert t == pytest.approx(0.55)  # J = 1 - 1/3 there, the best cut
    r = metrics.rates_at(y, p, t)
    assert (r["sensitivity"], r["specificity"], r["ppv"]) == (1.0, pytest.approx(2 / 3), 0.75)
    assert metrics.operating_threshold(y, p, "f1") == pytest.approx(0.55)
    assert metrics.operating_threshold(np.zeros(4), p[:4]) is None  # one class: no threshold
    assert metrics.interval(metrics.auroc_rows(p[:3], y[:3], np.ones((3, 3)))) is None


def test_roc_and_pr_points_equal_scikit_learns_curves_and_operating_points_with_ties():
    """metrics' own curves (eval no longer imports scikit-learn) against scikit-learn's, on scores with many
    ties; the operating thresholds against those scikit-learn's default (intermediate points dropped) gives."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(2, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(float)
        if len(np.unique(y)) < 2:
            y[0], y[-1] = 0.0, 1.0
        p = np.round(rng.random(n), int(rng.integers(1, 4)))  # 1-3 decimals: runs of tied scores
        for ours, theirs in ((metrics.roc_points(y, p), roc_curve(y, p, drop_intermediate=False)),
                             (metrics.pr_points(y, p), precision_recall_curve(y, p))):  # fmt: skip
            for a, b in zip(ours, theirs):
                np.testing.assert_array_equal(a, b)
        fpr, tpr, thr = roc_curve(y, p)
        assert metrics.operating_threshold(y, p, "youden") == thr[int(np.argmax(tpr[1:] - fpr[1:])) + 1], trial
        precision, recall, thr = precision_recall_curve(y, p)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        assert metrics.operating_threshold(y, p, "f1") == thr[int(np.argmax(f1))], trial


def test_temperature_scaling_recovers_an_overconfident_models_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < metrics.sigmoid(z)).astype(float)  # calibrated at logit z
    t = metrics.fit_temperature(3 * z, y)  # the same model, 3x overconfident
    assert t == pytest.approx(3.0, rel=0.05)
    assert metrics.ece(metrics.sigmoid(3 * z / t), y) < 0.5 * metrics.ece(metrics.sigmoid(3 * z), y)
    assert metrics.brier(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == 0.5


def _synthetic_predictions(n=300, seed=0) -> Predictions:
    rng = np.random.default_rng(seed)
    names = list(CHEXPERT)
    labels = (rng.random((n, len(names))) < 0.3).astype(float)
    labels[:, names.index("Fracture")] = 0.0  # no positives in this split: undefined
    prob = np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0.001, 0.999)
    mask = (rng.random((n, len(names))) < 0.9).astype(float)
    return Predictions(
        names,
        [f"k{i:04d}" for i in range(n)],
        [f"p{i // 2}" for i in range(n)],
        prob,
        labels,
        mask,
        rng.choice([0.0, 1.0, 0.5], n),
        rng.uniform(20, 90, n),
        list(rng.choice(["AP", "PA"], n)),
    )


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return [_rounded(v) for v in x] if isinstance(x, list) else x


def test_metrics_json_recomputed_independently_from_predictions_csv(tmp_path):
    val, test = _synthetic_predictions(seed=1), _synthetic_predictions(seed=2)
    points = fit_operating_points(val)
    test.to_csv(tmp_path / "predictions.csv")
    m = score(test, points, protocol="chexpert/official", split="test", replicates=200)
    again = Predictions.read_csv(tmp_path / "predictions.csv")
    import pandas as pd

    df = pd.read_csv(tmp_path / "predictions.csv")
    assert list(df.columns[:2]) == ["key", "patient_id"] and f"p:{CHEXPERT[0]}" == df.columns[2]
    aucs = {}
    for name in CHEXPERT:
        keep = df[f"m:{name}"] > 0
        y, p = df.loc[keep, f"y:{name}"], df.loc[keep, f"p:{name}"]
        rec = m["labels"][name]
        if y.nunique() < 2:
            assert rec["auroc"] is None and name in m["undefined"]
            continue
        aucs[name] = roc_auc_score(y, p)
        assert rec["auroc"][0] == pytest.approx(aucs[name], abs=1e-6)
        assert rec["auroc"][1] <= rec["auroc"][0] <= rec["auroc"][2]
        assert rec["auprc"][0] == pytest.approx(average_precision_score(y, p), abs=1e-6)
        call = p >= rec["threshold"]
        assert rec["sensitivity"] == pytest.approx((call & (y == 1)).sum() / (y == 1).sum())
        assert rec["accuracy@0.5"] == pytest.approx(((p >= 0.5) == (y >= 0.5)).mean())
    assert m["mean"]["all"][0] == pytest.approx(np.mean(list(aucs.values())), abs=1e-6)
    assert m["mean"]["competition5"][0] == pytest.approx(np.mean([aucs[n] for n in COMPETITION5]), abs=1e-6)
    assert m["calibration"]["temperature"] == points["temperature"]
    assert set(m["subgroups"]) == {"sex", "age", "view"} and set(m["subgroups"]["sex"]) == {"M", "F"}
    # the same record from the file alone (what a reviewer's script would do)
    m2 = score(again, points, protocol="chexpert/official", split="test", replicates=200)
    assert _rounded(m2) == _rounded(m)  # the file holds 9 significant digits


# --- protocol -------------------------------------------------------------------------------------------
def test_chexpert_official_protocol_is_recorded_in_the_manifest(tmp_path):
    from cxrdist.shards.pack import synth_shards

    _, out = synth_shards(tmp_path, n=120, raw_size=32, size=32, source="chexpert", name="off", split="official")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"] == "chexpert/official"
    assert "valid.csv" in manifest["split_info"]["note"] and "-> test" in manifest["split_info"]["note"]


# --- cxrdist eval / predict end to end (tiny_run: the session's one-epoch run, fixtures_runs.py) ----------
@pytest.mark.slow
def test_eval_writes_the_contract_files_and_predict_applies_the_operating_points(tiny_run, tiny_shards, tmp_path):
    summary = json.loads((tiny_run / "summary.json").read_text())
    lo, hi = summary["test"]["auc_mean_ci"][1:]  # the trainer's test numbers carry intervals too
    assert lo <= summary["test"]["auc_mean"] <= hi
    ev = in_process("eval", "--run", tiny_run, "--split", "test", "--bootstrap", "300")
    assert ev.returncode == 0, ev.stderr[-2000:]
    out = tiny_run / "eval" / "test"
    assert {
        "predictions.csv",
        "metrics.json",
        "report.md",
        "roc.png",
        "pr.png",
        "reliability.png",
        "subgroups.png",
    } <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert (
        m["protocol"] == "chexpert/patient-80-10-10 seed 0"
        and m["split"] == "test"
        and m["bootstrap"]["replicates"] == 300
    )
    assert m["n"] == summary["test"]["n"]
    assert m["mean"]["all"][0] == pytest.approx(summary["test"]["auc_mean"], abs=1e-6)  # same model, same split
    assert set(m["calibration"]) >= {"ece", "brier", "temperature", "ece_scaled", "brier_scaled"}
    assert "protocol chexpert/patient-80-10-10" in (out / "report.md").read_text()
    points = json.loads((tiny_run / "operating_points.json").read_text())
    assert points["fitted_on"] == "val" and set(points["thresholds"]) == set(CHEXPERT)

    image = next(tiny_shards["root"].glob("train/*/*/*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    pr = in_process(
        "predict",
        "--checkpoint",
        tiny_run,
        "--json",
        "--cam",
        tmp_path / "cam",
        "--cam-labels",
        "Cardiomegaly",
        image,
        broken,
    )
    assert pr.returncode == 0, pr.stderr[-2000:]
    good, bad = json.loads(pr.stdout)
    assert "error" in bad and bad["file"] == str(broken)  # one unreadable file, the other still predicted
    # the stored temperature and thresholds are what predict applied
    from PIL import Image

    from cxrdist.data.transforms import Augment
    from cxrdist.evaluate import load_checkpoint, model_from_checkpoint
    from cxrdist.evaluate.predict import _read

    weights, client = load_checkpoint(tiny_run, "best")
    model = model_from_checkpoint(weights, client)
    raw, _ = _read(image, client["data"])
    with torch.no_grad():
        z = model(Augment(client["data"]["image_size"], train=False, in_chans=1)(raw))[0]
    want = torch.sigmoid(z / points["temperature"]).tolist()
    assert list(good["probabilities"].values()) == pytest.approx(want, abs=1e-5)
    assert good["positive"] == [
        n for n, p in zip(CHEXPERT, want) if points["thresholds"][n] is not None and p >= points["thresholds"][n]
    ]
    (cam,) = good["cam"]
    assert Image.open(cam).size == Image.open(image).resize((32, 32)).size  # the packed geometry
    unknown = in_process("predict", "--checkpoint", tiny_run, "--cam", tmp_path / "c2", "--cam-labels", "Nope", image)
    assert unknown.returncode == 2 and "--cam-labels Nope" in unknown.stderr


@pytest.mark.slow
def test_eval_refusals_are_one_line(tiny_run, tmp_path):
    ev = cli("eval", "--run", tiny_run, "--bootstrap", "10", "--checkpoint", tmp_path / "none.pt")
    assert ev.returncode == 2 and len(ev.stderr.strip().splitlines()) == 1, ev.stderr
    assert "none.pt" in ev.stderr


# --- Grad-CAM -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gradcam_finds_the_drawn_heart_of_a_cardiomegaly_and_randomised_weights_change_the_map():
    """A DenseNet-121 learns synthetic cardiomegaly (the only finding that varies); its Grad-CAM heat is
    denser inside the drawn heart than outside, and a model with random weights gives a different map
    (the model-randomisation sanity check of Adebayo et al. 2018)."""
    import torch.nn.functional as F

    from cxrdist.evaluate.cam import gradcam
    from cxrdist.models import build_model
    from cxrdist.synth import draw_frontal

    torch.manual_seed(0)
    size, j = 128, CHEXPERT.index("Cardiomegaly")

    def batch(rng, n):
        xs, ys, hearts = [], [], []
        for _ in range(n):
            y, regions = float(rng.random() < 0.5), {}
            xs.append(draw_frontal(rng, size, size, {"Cardiomegaly": y}, regions=regions))
            ys.append(y)
            hearts.append(regions["heart"] > 0.5)
        return (torch.tensor(np.stack(xs))[:, None] - 0.5) / 0.25, torch.tensor(ys), np.stack(hearts)

    x, y, _ = batch(np.random.default_rng(0), 320)
    model = build_model("densenet121", num_classes=len(CHEXPERT))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for i in range(0, len(x), 32):
        loss = F.binary_cross_entropy_with_logits(model(x[i : i + 32])[:, j], y[i : i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, hearts = batch(np.random.default_rng(1), 24)
    positives = np.flatnonzero(yt.numpy() > 0)[:8]
    maps = [gradcam(model, xt[i : i + 1], j) for i in positives]
    ratio = [h[m].mean() / max(h[~m].mean(), 1e-9) for h, m in zip(maps, hearts[positives]) if h.max() > 0]
    assert len(ratio) >= 6 and np.median(ratio) > 1.5, ratio
    # the pointing game against the heart's box, as `eval --cam` scores it, beats random CAM-like maps clearly
    from cxrdist.evaluate.localize import measure, random_maps

    boxes = [box_of(m) for m in hearts[positives]]
    hits = np.mean([measure(h, b)[0] for h, b in zip(maps, boxes)])
    chance = np.mean([measure(r, b)[0] for b in boxes for r in random_maps(np.random.default_rng(0), 50, b.shape)])
    print(f"pointing game in the heart's box: {hits:.2f} (random maps {chance:.2f}, {len(boxes)} positives)")
    assert hits >= chance + 0.3, (hits, chance)
    random = build_model("densenet121", num_classes=len(CHEXPERT)).eval()
    changed = [np.corrcoef(h.ravel(), gradcam(random, xt[i : i + 1], j).ravel())[0, 1] for h, i in zip(maps, positives)]
    r = np.nanmedian(changed)
    print(f"grad-cam heat inside/outside the heart: median {np.median(ratio):.2f}; random weights: median r {r:.2f}")
    assert np.nanmedian(changed) < 0.5, changed


def box_of(mask: np.ndarray) -> np.ndarray:
    """The bounding box of a region, as a mask: what a radiologist's box around it covers."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return out


def test_gradcam_runs_on_a_fused_demographics_model():
    from cxrdist.evaluate.cam import gradcam
    from cxrdist.models import build_model

    model = build_model("densenet121", num_classes=3, fuse_demographics=True).eval()
    heat = gradcam(model, torch.randn(1, 1, 64, 64), 1, age=torch.tensor([60.0]), sex=torch.tensor([1.0]))
    assert heat.shape == (64, 64) and 0 <= heat.min() and heat.max() <= 1


def test_bench_eval_scores_a_split_and_reports_its_goal():
    from cxrdist import bench

    result = bench.run("eval", quick=True)
    assert result["eval"]["images"] == 800 and result["eval"]["score_s"] > 0
    assert result["goals"]["score_s"]["want"] == "<= 30.0"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_the_pytorch_outputs_with_the_preprocessing_recorded(fmt, tiny_run, tmp_path):
    from cxrdist.evaluate import load_checkpoint, model_from_checkpoint

    out = tmp_path / f"model.{fmt}"
    ex = in_process("export", "--checkpoint", tiny_run, "--format", fmt, "--out", out)
    assert ex.returncode == 0, ex.stderr[-2000:]
    weights, client = load_checkpoint(tiny_run, "best")
    model = model_from_checkpoint(weights, client)
    x = torch.randn(5, 1, 32, 32)  # another batch size than the export's example: the batch is dynamic
    with torch.no_grad():
        want = model(x).numpy()
    if fmt == "onnx":
        import onnx
        import onnxruntime

        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["cxrdist"])
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
    else:
        extra = {"cxrdist.json": ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["cxrdist.json"])
        got = loaded(x).detach().numpy()
    print(f"{fmt} export: max |logit difference| {np.abs(got - want).max():.2e} on a batch of 5")
    assert np.abs(got - want).max() < 1e-4
    assert meta["labels"] == list(CHEXPERT) and meta["preprocessing"]["mean"] == 0.5
    stored = tiny_run / "operating_points.json"  # written by `cxrdist eval` when it ran first
    assert meta["temperature"] == (json.loads(stored.read_text())["temperature"] if stored.is_file() else 1.0)
