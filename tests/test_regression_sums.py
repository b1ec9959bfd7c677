"""Regression metrics from the sites' sums equal numpy's on the pooled predictions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from consortium.learning import regression

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(arrays(np.float64, st.tuples(st.integers(1, 30), st.just(2)), elements=finite), min_size=1, max_size=6))
def test_summed_site_statistics_give_the_pooled_metrics(sites):
    """Any split of the records among sites: the metrics of the summed vectors are the pooled data's."""
    total = sum(regression.statistics(s[:, 0], s[:, 1]) for s in sites)
    pooled = np.concatenate(sites)
    pred, y = pooled[:, 0], pooled[:, 1]
    got = regression.metrics(total)
    mse = np.mean((y - pred) ** 2)
    scale = 1 + float(np.abs(pooled).max()) ** 2
    assert abs(got["mse"] - mse) <= 1e-9 * scale
    assert abs(got["mae"] - np.mean(np.abs(y - pred))) <= 1e-9 * (1 + float(np.abs(pooled).max()))
    assert abs(got["mean_mse"] - np.var(y)) <= 1e-9 * scale * len(y)
    sst = np.sum((y - y.mean()) ** 2)
    if sst > 1e-6 * scale:
        assert abs(got["r2"] - (1 - np.sum((y - pred) ** 2) / sst)) <= 1e-6 * max(1.0, abs(got["r2"]))


def test_known_answer_and_the_degenerate_cases():
    y, pred = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.0, 5.0])
    got = regression.metrics(regression.statistics(pred, y))
    assert got["mse"] == (0.25 + 0 + 1 + 1) / 4 and got["mae"] == (0.5 + 0 + 1 + 1) / 4
    assert got["r2"] == 1 - 2.25 / 5.0 and got["mean_mse"] == 1.25
    assert np.isnan(regression.metrics(np.zeros(len(regression.FIELDS)))["mse"])  # nothing evaluated
    assert np.isnan(regression.metrics(regression.statistics(np.ones(3), np.full(3, 2.0)))["r2"])  # constant target
