"""The statistics of seeds (issue 22): mean ± sd over seeds, the pooled interval, and the paired bootstrap
over patients that tells a worse arm from seed noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrdist.errors import UserError
from cxrdist.seeds import Scored, describe, mean_sd, paired, pooled

N, L = 400, 3


def arm(noise: float, seeds=(0, 1, 2), shuffle: bool = False) -> list[Scored]:
    """One arm's test predictions per seed on the same 400 images of 200 patients: the truth plus noise."""
    truth = np.random.default_rng(99).random((N, L)) < 0.3
    out = []
    for s in seeds:
        rng = np.random.default_rng([s, int(noise * 100)])
        prob = 1 / (1 + np.exp(-(2.0 * truth - 1 + rng.normal(0, noise, (N, L)))))
        keys, order = [f"k{i:03d}" for i in range(N)], np.arange(N)
        if shuffle:  # another run writes its predictions in another order: aligned on keys
            order = np.random.default_rng(s).permutation(N)
        out.append(Scored(s, [keys[i] for i in order], [f"p{i // 2}" for i in order], prob[order],
                          truth[order].astype(float), np.ones((N, L))))  # fmt: skip
    return out


def test_mean_and_sd_over_seeds():
    assert mean_sd([80.0, 82.0, 84.0]) == (82.0, 2.0, 3)
    mean, sd, n = mean_sd([80.0, None, float("nan")])
    assert (mean, n) == (80.0, 1) and math.isnan(sd)
    got = describe({"a": [{"test_auc_pct": 80.0, "epoch_time_s": 10}, {"test_auc_pct": 84.0, "epoch_time_s": 12}]})
    assert got["a"]["test_auc_pct"][:2] == (82.0, pytest.approx(2.8284, abs=1e-3))


def test_pooled_interval_holds_the_seed_averaged_auroc():
    point, low, high = pooled(arm(1.0), replicates=300)
    assert low < point < high and 0.7 < point < 0.95


def test_the_paired_test_flags_a_worse_arm_and_not_seed_noise():
    good, worse = arm(1.0), arm(2.0)
    d = paired(good, worse, replicates=300)
    assert d["differ"] and d["difference"][2] < 0 and d["p"] < 0.01 and d["seeds"] == [0, 1, 2]
    same = paired(good, arm(1.0, seeds=(0, 1, 2), shuffle=True), replicates=300)  # the same arm, reordered
    assert not same["differ"] and same["difference"][0] == pytest.approx(0, abs=1e-12)
    with pytest.raises(UserError, match="share no seed"):
        paired(good, arm(1.0, seeds=(7,)), replicates=10)


def test_runs_on_other_samples_are_refused():
    a, b = arm(1.0, seeds=(0,)), arm(1.0, seeds=(0,))
    b[0].keys = [k + "x" for k in b[0].keys]
    with pytest.raises(UserError, match="other samples"):
        paired(a, b, replicates=10)
