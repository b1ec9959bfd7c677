"""Federated evaluation from summed statistics equals evaluation on the pooled data."""

import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from consortium.config import SimulationConfig
from consortium.data.datasets import concat_tables

from consortium.learning.training import (
    AUC_BINS,
    CAL_BINS,
    EvalStats,
    Groups,
    auc_from_histograms,
    evaluate,
    fairness_gaps,
)
from consortium.learning.classification import eval_vector, read_eval_sum
from consortium.redteam.membership import load_target
from consortium.run.simulation import Simulation


def test_histogram_auc_matches_exact_auc_when_no_bin_holds_both_classes():
    rng = np.random.default_rng(0)
    bins = rng.permutation(AUC_BINS)[:300]  # distinct bins: no tie between a positive and a negative
    labels = rng.integers(0, 2, 300)
    hist = np.zeros((2, AUC_BINS), dtype=np.int64)
    np.add.at(hist, (labels, bins), 1)
    scores = (bins + 0.5) / AUC_BINS
    assert auc_from_histograms(hist[0], hist[1]) == roc_auc_score(labels, scores)


def test_summed_site_statistics_equal_the_pooled_evaluation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 2))
    X, y = torch.randn(90, 5), torch.randint(0, 2, (90,))
    pooled = evaluate(model, X, y, 2)
    parts = [evaluate(model, X[i : i + 30], y[i : i + 30], 2) for i in (0, 30, 60)]
    summed = read_eval_sum(sum(eval_vector(p) for p in parts), 2)
    assert (summed.n, summed.correct) == (pooled.n, pooled.correct)
    assert np.array_equal(summed.score_hist, pooled.score_hist)
    assert abs(summed.metrics()["loss"] - pooled.metrics()["loss"]) < 1e-5  # float32 sums in a different order
    probs = torch.softmax(model(X), 1)[:, 1].detach().numpy()
    assert abs(summed.metrics()["auc"] - roc_auc_score(y.numpy(), probs)) < 0.01  # binning error only


def test_calibration_fairness_and_shift_sum_to_the_pooled_figures():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    X, y = torch.randn(120, 4), torch.randint(0, 2, (120,))
    shifted = X + 0.5 * torch.randn(120, 4)
    groups = Groups(feature=2, threshold=0.0)
    pooled = evaluate(model, X, y, 2, groups=groups, shifted=shifted)
    parts = [evaluate(model, X[i : i + 40], y[i : i + 40], 2, groups=groups, shifted=shifted[i : i + 40]) for i in (0, 40, 80)]
    summed = read_eval_sum(sum(eval_vector(p) for p in parts), 2, groups=True, shift=True)
    np.testing.assert_allclose(summed.calibration, pooled.calibration, atol=1e-9)
    np.testing.assert_array_equal(summed.groups, pooled.groups)
    np.testing.assert_array_equal(summed.shift, pooled.shift)
    both, alone = summed.metrics(), pooled.metrics()
    for key in ("ece", "demographic_parity_gap", "equalized_odds_gap", "shift_accuracy"):
        assert abs(both[key] - alone[key]) < 1e-9, key
    # The spread across the three parts: mean and standard deviation of their accuracies, from sums alone.
    accs = [p.correct / p.n for p in parts]
    assert abs(both["site_accuracy_mean"] - np.mean(accs)) < 1e-12
    assert abs(both["site_accuracy_std"] - np.std(accs)) < 1e-12
    assert "site_accuracy_std" not in alone  # one evaluation alone has no spread


def test_known_answers_for_ece_and_the_fairness_gaps():
    # Two records per confidence: a model 90% sure and right once of twice, and 60% sure and right twice.
    calibration = np.zeros((3, CAL_BINS))
    for conf, right in ((0.9, 1), (0.9, 0), (0.6, 1), (0.6, 1)):
        b = min(int(conf * CAL_BINS), CAL_BINS - 1)
        calibration[:, b] += [1, conf, right]
    # ECE = sum over bins of (records / all) |accuracy - confidence| = 2/4 |0.5 - 0.9| + 2/4 |1 - 0.6| = 0.4
    stats = EvalStats(4, 3, 1.0, None, calibration)
    assert abs(stats.metrics()["ece"] - 0.4) < 1e-12
    assert [round(b["accuracy"], 3) for b in stats.reliability()] == [1.0, 0.5]
    # Group A: 10 records, 6 predicted positive; 5 positives of which 4 caught; 5 negatives, 2 false alarms.
    # Group B: 10 records, 3 predicted positive; 4 positives of which 2 caught; 6 negatives, 1 false alarm.
    groups = np.array([[10, 6, 5, 4, 5, 2], [10, 3, 4, 2, 6, 1]], dtype=float)
    gaps = fairness_gaps(groups)
    assert abs(gaps["demographic_parity_gap"] - 0.3) < 1e-12
    assert abs(gaps["equalized_odds_gap"] - max(abs(0.8 - 0.5), abs(0.4 - 1 / 6))) < 1e-12
    assert fairness_gaps(np.array([[0, 0, 0, 0, 0, 0], [10, 3, 4, 2, 6, 1]], dtype=float)) == {}  # an empty group: no gap


def test_a_secure_run_reports_calibration_fairness_spread_and_shift_equal_to_the_pooled_evaluation(tmp_path):
    """Through secure aggregation the coordinator reads sums only; they must still give the pooled figures."""
    config = SimulationConfig.model_validate({
        "rounds": 3, "data": {"dataset": "breast-cancer", "sites": 3},
        "privacy": {"test_seed": 1}, "baselines": {"local_only": False, "pooled": False},
        "evaluation": {"sensitive_feature": "mean radius", "shift_noise": 3.0},
    })
    run = Simulation(config, out=tmp_path / "run").run()
    last = run.history[-1]
    assert last.secure and last.metrics["site_accuracy_std"] >= 0
    target = load_target(tmp_path / "run")  # the final model, and each site's test split
    tests = [s.test for s in target.splits.values()]
    pooled = concat_tables(tests)
    train = concat_tables([s.train for s in target.splits.values()])
    feature = pooled.feature_names.index("mean radius")
    groups = Groups(feature, float(np.float32(train.X[:, feature].astype(np.float64).mean())))
    direct = evaluate(target.model, torch.from_numpy(pooled.X), torch.from_numpy(pooled.y), 2, groups=groups).metrics()
    for key in ("accuracy", "ece", "demographic_parity_gap", "equalized_odds_gap"):
        assert abs(last.metrics[key] - direct[key]) < 1e-4, (key, last.metrics[key], direct[key])
    per_site = [evaluate(target.model, torch.from_numpy(t.X), torch.from_numpy(t.y), 2).metrics()["accuracy"] for t in tests]
    assert abs(last.metrics["site_accuracy_mean"] - np.mean(per_site)) < 1e-4
    assert abs(last.metrics["site_accuracy_std"] - np.std(per_site)) < 1e-4
    assert last.metrics["shift_accuracy"] < last.metrics["accuracy"] - 0.05  # noise of 3 standard deviations hurts
    assert sum(b["count"] for b in last.evaluation["reliability"]) == pooled.n_rows
    # Each site keeps its own accuracy per round beside its ledger; the coordinator never saw it.
    for site, acc in zip(target.splits, per_site):
        lines = (tmp_path / "run" / "sites" / site / "evaluation.jsonl").read_text().splitlines()
        assert len(lines) == 3 and abs(json.loads(lines[-1])["accuracy"] - acc) < 1e-9


def test_group_counts_by_hand():
    """A model that predicts class 1 exactly when feature 0 is positive; groups split on feature 1 at 0."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        model.bias.zero_()
    X = torch.tensor([[1.0, -1], [-1, -1], [1, -1], [1, 0.5], [-1, 0.5], [-1, 0.5]])
    y = torch.tensor([1, 1, 0, 1, 0, 1])
    stats = evaluate(model, X, y, 2, groups=Groups(feature=1, threshold=0.0))
    # at or below 0: rows 0-2 predicted [1, 0, 1], labels [1, 1, 0]; above: rows 3-5 predicted [1, 0, 0], labels [1, 0, 1]
    np.testing.assert_array_equal(stats.groups, [[3, 2, 2, 1, 1, 1], [3, 1, 2, 1, 1, 0]])
