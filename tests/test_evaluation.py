"""Federated evaluation from summed statistics equals evaluation on the pooled data."""

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from consortium.learning.training import AUC_BINS, auc_from_histograms, evaluate
from consortium.protocol.contributions import eval_vector, read_eval_sum


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
