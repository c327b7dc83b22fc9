"""Prediction modes of multi-exit networks (numpy, no torch): budget, anytime, confidence exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kdedge.runtime import exits as modes


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "import kdedge.runtime.exits as m\n"
            "assert m.softmax([[0.0, 0.0]]).tolist() == [[0.5, 0.5]]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _probs(rows):
    """[E][N] lists of 2-class max-probabilities toward class 0 → [E, N, 2]."""
    p = np.asarray(rows, dtype=np.float64)
    return np.stack([p, 1 - p], axis=-1)


def test_softmax_and_anytime_mean():
    p = modes.softmax(np.array([[[0.0, np.log(3)]], [[np.log(3), 0.0]]]))
    assert np.allclose(p[:, 0], [[0.25, 0.75], [0.75, 0.25]])
    a = modes.anytime_probabilities(p)
    assert np.allclose(a[0, 0], [0.25, 0.75]) and np.allclose(a[1, 0], [0.5, 0.5])


def test_accuracies_and_top_k():
    probs = np.array([[[0.6, 0.3, 0.1], [0.2, 0.3, 0.5]],
                      [[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]])
    y = np.array([0, 1])
    assert modes.accuracies(probs, y) == [0.5, 0.0]
    assert modes.topk_accuracies(probs, y, 2) == [1.0, 0.5]
    assert modes.topk_accuracies(probs, y, 3) == [1.0, 1.0]
    with pytest.raises(ValueError, match="top-k"):
        modes.topk_accuracies(probs, y, 4)


def test_budget_mode_picks_the_best_validation_exit_that_fits():
    assert modes.select_budget_exits([0.5, 0.7, 0.65], [1, 2, 3], [0.5, 1, 2.5, 3, 10]) == [None, 0, 1, 1, 1]
    assert modes.select_budget_exits([0.5, 0.7, 0.7], [1, 2, 3], [3]) == [1]  # tie: the cheaper exit
    # chosen on validation; the test accuracy of the chosen exit is reported even where a
    # different exit would have been better on test
    curve = modes.budget_curve([0.5, 0.7, 0.65], [0.4, 0.6, 0.9], [10, 20, 30])
    assert [(c["budget"], c["exit"], c["cost"], c["accuracy"]) for c in curve] == \
        [(10, 0, 10, 0.4), (20, 1, 20, 0.6), (30, 1, 20, 0.6)]
    json.dumps(curve)


def test_fit_thresholds_by_hand():
    # 3 exits, 10 samples; q = (0.3, 0.3, 0.4): the 3 most confident at exit 0 leave, then the
    # 3 most confident of the 7 left at exit 1, the last 4 at exit 2
    c0 = [0.99, 0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55]
    c1 = [0.50, 0.50, 0.50, 0.97, 0.51, 0.96, 0.52, 0.95, 0.53, 0.54]
    c2 = [0.9] * 10
    probs = _probs([c0, c1, c2])
    th = modes.fit_thresholds(probs, [0.3, 0.3, 0.4])
    assert th == pytest.approx([0.90, 0.95, 0.0])
    y = np.array([0, 0, 1, 0, 0, 1, 0, 0, 1, 1])  # class 0 is every exit's prediction
    res = modes.evaluate_thresholds(probs, y, th, [1.0, 2.0, 4.0])
    assert res["exit_fractions"] == pytest.approx([0.3, 0.3, 0.4])
    assert res["mean_cost"] == pytest.approx(0.3 * 1 + 0.3 * 2 + 0.4 * 4)
    assert res["accuracy"] == pytest.approx(0.6)
    json.dumps(res)
    # nobody wanted at exit 0: its threshold is NEVER; the last is always 0
    th = modes.fit_thresholds(probs, [0.0, 0.5, 0.5])
    assert th[0] == modes.NEVER and th[-1] == 0.0
    assert modes.evaluate_thresholds(probs, y, th, [1.0, 2.0, 4.0])["exit_fractions"][0] == 0.0


def test_thresholds_fitted_on_validation_apply_to_another_split():
    val = _probs([[0.9, 0.8, 0.7, 0.6], [0.9, 0.9, 0.9, 0.9]])
    th = modes.fit_thresholds(val, [0.5, 0.5])
    assert th == pytest.approx([0.8, 0.0])
    test = _probs([[0.85, 0.81, 0.79, 0.6, 0.7], [0.6] * 5])
    res = modes.evaluate_thresholds(test, np.array([0, 0, 1, 1, 0]), th, [1.0, 3.0])
    assert res["exit_fractions"] == pytest.approx([0.4, 0.6])
    assert res["mean_cost"] == pytest.approx(0.4 * 1 + 0.6 * 3)
    assert res["accuracy"] == pytest.approx(0.6)


def test_confidence_of_the_anytime_ensemble():
    # one sample; class-0 probability 0.6, 1.0, 0.0 at exits 0, 1, 2
    probs = _probs([[0.6], [1.0], [0.0]])
    th = [modes.NEVER, 0.9, 0.0]
    own = modes.evaluate_thresholds(probs, [0], th, [1, 2, 3], combine="last")
    assert own["exit_fractions"] == [0.0, 1.0, 0.0]  # exit 1 alone is sure (1.0 >= 0.9)
    ens = modes.evaluate_thresholds(probs, [0], th, [1, 2, 3], combine="mean_probs")
    assert ens["exit_fractions"] == [0.0, 0.0, 1.0]  # the ensemble is not: mean(0.6, 1.0) = 0.8
    assert ens["accuracy"] == 1.0  # mean(0.6, 1.0, 0.0) = 0.53 still favours class 0
    # fitting uses the same confidences
    two = _probs([[0.6, 0.7], [1.0, 0.2]])
    assert modes.fit_thresholds(two, [0.5, 0.5], combine="mean_probs")[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="unknown combine"):
        modes.fit_thresholds(two, [0.5, 0.5], combine="vote")


def _random_split(seed, E=4, N=400, K=5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, N)
    logits = rng.normal(size=(E, N, K))
    for k in range(E):  # later exits see more of the label
        logits[k, np.arange(N), y] += 0.8 * (k + 1)
    return modes.softmax(logits), y


def test_fit_for_target_cost():
    probs, y = _random_split(0)
    costs = [10.0, 20.0, 30.0, 40.0]
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        modes.fit_thresholds_for_cost(probs, y, costs, 5.0)
    previous = -1.0
    for target in (10.0, 15.0, 22.0, 30.0, 40.0):
        th, fit = modes.fit_thresholds_for_cost(probs, y, costs, target)
        assert fit["mean_cost"] <= target + 1e-9
        assert fit["accuracy"] >= previous  # a larger budget never fits worse on validation
        previous = fit["accuracy"]
        assert modes.evaluate_thresholds(probs, y, th, costs) == {k: v for k, v in fit.items() if k != "ratio"}
    # at the smallest target everyone leaves at the first exit
    th, fit = modes.fit_thresholds_for_cost(probs, y, costs, 10.0)
    assert fit["exit_fractions"][0] == 1.0


def test_threshold_curve_fits_on_validation_and_scores_on_test():
    (vp, vy), (tp, ty) = _random_split(1), _random_split(2)
    costs = [1.0, 2.0, 3.0, 4.0]
    curve = modes.threshold_curve(vp, vy, tp, ty, costs)
    assert len(curve) == 40
    for point in curve:
        ref = modes.evaluate_thresholds(tp, ty, point["thresholds"], costs)
        assert point["accuracy"] == ref["accuracy"] and point["mean_cost"] == ref["mean_cost"]
        assert point["thresholds"] == modes.fit_thresholds(vp, modes.geometric_fractions(4, point["ratio"]))
    costs_seen = [p["val_cost"] for p in curve]
    assert costs_seen == sorted(costs_seen)  # larger ratio → later exits → more cost
    json.dumps(curve)


def test_geometric_fractions():
    q = modes.geometric_fractions(3, 2.0)
    assert q == pytest.approx([2 / 14, 4 / 14, 8 / 14])
    assert modes.geometric_fractions(3, 1.0) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("call,match", [
    (lambda: modes.accuracies(np.zeros((2, 3)), [0, 1]), r"shape \[exits, samples, classes\]"),
    (lambda: modes.accuracies(np.zeros((1, 2, 3)), [0]), "labels must have shape"),
    (lambda: modes.select_budget_exits([0.1, 0.2], [2, 1], [3]), "cumulative"),
    (lambda: modes.fit_thresholds(np.ones((2, 3, 2)) / 2, [0.5, 0.4]), "summing to 1"),
    (lambda: modes.evaluate_thresholds(np.ones((2, 3, 2)) / 2, [0, 0, 0], [0.5], [1, 2]), "need 2 thresholds"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
