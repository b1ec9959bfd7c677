"""A site's drift check on its own data: known answers, properties, and the features it names."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consortium.errors import DataError
from consortium.learning.drift import SHARE_FLOOR, check_drift, label_shift, psi


def test_psi_known_answer_on_a_binary_feature():
    expected = np.array([0] * 50 + [1] * 50)
    actual = np.array([0] * 80 + [1] * 20)
    # shares 0.5/0.5 against 0.8/0.2: 0.3 ln(1.6) + 0.3 ln(2.5)
    assert psi(expected, actual) == pytest.approx(0.3 * math.log(1.6) + 0.3 * math.log(2.5), rel=1e-12)


def test_psi_reads_small_shifts_as_stable_and_large_ones_as_significant():
    rng = np.random.default_rng(0)
    train = rng.standard_normal(20_000)
    assert psi(train, rng.standard_normal(20_000)) < 0.01  # the same population
    assert psi(train, rng.standard_normal(20_000) + 0.1) < 0.1  # a tenth of a standard deviation
    assert psi(train, rng.standard_normal(20_000) + 1.0) > 0.25  # a whole one
    assert psi(train, rng.standard_normal(20_000) * 2) > 0.25  # the spread doubles, the mean stays


def test_an_empty_bin_gives_a_large_finite_index():
    value = psi(np.arange(100.0), np.full(50, 1000.0))  # every incoming value beyond the last training decile
    # nine training bins of share 0.1 left empty (floored), the last holding everything: 8.28
    expected = 9 * (SHARE_FLOOR - 0.1) * math.log(SHARE_FLOOR / 0.1) + 0.9 * math.log(10)
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-9)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200))
def test_psi_is_never_negative_and_zero_for_the_same_sample(a, b):
    a_arr, b_arr = np.array(a), np.array(b)
    assert psi(a_arr, b_arr) >= 0
    assert psi(a_arr, a_arr) == 0


def test_label_shift_is_the_total_variation_distance():
    assert label_shift(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1]), 2) == pytest.approx(0.25)
    assert label_shift(np.array([0, 1, 2]), np.array([2, 1, 0]), 3) == 0
    assert label_shift(np.array([0, 0]), np.array([1, 1]), 2) == 1


def test_check_drift_names_the_drifting_features_most_drifted_first():
    rng = np.random.default_rng(1)
    train = rng.standard_normal((5000, 4))
    incoming = rng.standard_normal((2000, 4))
    incoming[:, 1] += 2.0
    incoming[:, 3] += 0.8
    y_train, y_in = rng.integers(0, 2, 5000), rng.integers(0, 2, 2000)
    report = check_drift(train, y_train, incoming, y_in, feature_names=("age", "bp", "sex", "bmi"), n_classes=2)
    assert report.drifting_features == ["bp", "bmi"] and report.breached
    calm = check_drift(train, y_train, rng.standard_normal((2000, 4)), y_in, feature_names=("age", "bp", "sex", "bmi"), n_classes=2)
    assert calm.drifting_features == [] and not calm.breached
    flipped = check_drift(train, y_train, train[:2000], np.ones(2000, dtype=np.int64), feature_names=("age", "bp", "sex", "bmi"), n_classes=2)
    assert flipped.drifting_features == [] and flipped.breached  # the labels alone moved
    with pytest.raises(DataError, match="same schema"):
        check_drift(train, y_train, incoming[:, :3], y_in, feature_names=("age", "bp", "sex", "bmi"), n_classes=2)
    with pytest.raises(DataError, match="empty"):
        psi(np.array([]), np.array([1.0]))


def test_missing_values_and_a_regression_target_have_a_drift_of_their_own():
    from consortium.learning.drift import label_shift, psi

    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 2000)
    holey = train.copy()
    holey[:600] = np.nan  # 30% missing where training had none: the values present are the same
    assert psi(train, train) < 1e-9 and psi(train, holey) > 0.25
    y = rng.normal(150, 50, 2000)
    assert label_shift(y, rng.normal(150, 50, 2000), 0) < 0.05 < 0.3 < label_shift(y, rng.normal(250, 50, 2000), 0)
