"""Gradient inversion: one site's update gives its records away; the secure aggregate and DP do not.

Every security test here pairs the attack succeeding where it should (one
site's update) with it failing where the defence should hold, so that a
broken attack cannot pass as a working defence. Margins are in dB of PSNR
over the feature-mean guess (about 11-12 dB on digits; a uniform random
draw scores about 8 dB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.data.datasets import load_builtin
from consortium.errors import ConfigError, ModelError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.models import build_model
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.training import TrainingData, train_local
from consortium.redteam.inversion import (
    InversionSettings,
    feature_error,
    invert_update,
    match,
    psnr,
    recover_labels,
    run_inversion,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MLP = ModelSpec(kind="mlp", hidden=(128,))


@pytest.fixture(scope="module")
def digits():
    return load_builtin("digits")


def _fresh_model(table, spec=MLP, seed=0):
    X = table.X.astype(np.float64)
    scale = X.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return build_model(
        spec, n_features=table.n_features, n_classes=table.n_classes, mean=X.mean(axis=0), scale=scale,
        image_shape=table.image_shape, seed=seed,
    )


def _one_step_update(model, X, y, lr=0.1):
    """One plain SGD step on the whole batch, as w_local - w; the model is put back at w."""
    adapter = ModelAdapter(model)
    start = adapter.get_vector()
    train_local(model, TrainingData.of(torch.from_numpy(X), torch.from_numpy(y)), TrainSettings(batch_size=len(y), lr=lr, momentum=0.0), seed=0)
    delta = adapter.get_vector() - start
    adapter.set_vector(start)
    return delta


# -- the metrics: known answers -------------------------------------------------------


def test_psnr_feature_error_and_matching_known_answers():
    truth = np.zeros((2, 4))
    assert psnr(truth + 1.0, truth, peak=16.0) == pytest.approx([20 * np.log10(16)] * 2)  # MSE 1: 24.08 dB
    assert psnr(truth + 2.0, truth, peak=16.0)[0] == pytest.approx(20 * np.log10(8))
    assert feature_error(np.array([[1.0, 4.0]]), np.array([[0.0, 0.0]]), np.array([1.0, 2.0])) == pytest.approx([1.5])
    rng = np.random.default_rng(0)
    records = rng.standard_normal((6, 5))
    order = rng.permutation(6)
    assert np.array_equal(match(records[order], records), np.argsort(order))  # recon order[j] = record j's slot
    # more reconstructions than records: each record gets its own best, distinct one
    extra = np.concatenate([records[3:4] + 0.01, rng.standard_normal((4, 5)) * 10, records[:1] + 0.01])
    assert list(match(extra, records[[0, 3]])) == [5, 0]
    with pytest.raises(ConfigError):
        match(records[:2], records)
    with pytest.raises(ConfigError):
        feature_error(records, records, np.zeros(5))


# -- labels ------------------------------------------------------------------------


def test_label_recovery_is_exact_at_batch_size_1(digits):
    model = _fresh_model(digits)
    rng = np.random.default_rng(1)
    for label in range(digits.n_classes):  # one record of every class
        i = int(rng.choice(np.flatnonzero(digits.y == label)))
        update = _one_step_update(model, digits.X[i : i + 1], digits.y[i : i + 1])
        assert list(recover_labels(model, update, 1)) == [label]


def test_batch_labels_the_negative_rows_are_certain_and_the_counts_are_recovered(digits):
    model = _fresh_model(digits)
    rng = np.random.default_rng(2)
    exact = 0
    for _ in range(10):
        rows = rng.choice(digits.n_rows, 8, replace=False)
        y = digits.y[rows]
        update = _one_step_update(model, digits.X[rows], y)
        negative = np.flatnonzero(update[-digits.n_classes :] > 0)  # -update < 0: gradient rows below zero
        assert set(negative) <= set(y)  # iDLG for batches: a negative bias-gradient entry means the class is there
        labels = recover_labels(model, update, 8, lr=0.1)
        assert len(labels) == 8 and set(negative) <= set(labels)
        exact += bool(np.array_equal(labels, np.sort(y)))
    assert exact >= 9  # the multiset, counts included (all 10 when measured)


def test_label_recovery_refuses_what_it_cannot_read(digits):
    model = _fresh_model(digits)
    with pytest.raises(ModelError):
        recover_labels(model, np.zeros(10, dtype=np.float32), 1)
    update = _one_step_update(model, digits.X[:2], digits.y[:2])
    with pytest.raises(ConfigError):
        recover_labels(model, update, 0)
    with pytest.raises(ConfigError):
        recover_labels(model, update, 2, lr=-1.0)


# -- inputs ------------------------------------------------------------------------


def test_invert_update_is_deterministic_and_leaves_the_model_alone(digits):
    model = _fresh_model(digits)
    before = ModelAdapter(model).get_vector()
    update = _one_step_update(model, digits.X[5:7], digits.y[5:7])
    settings = InversionSettings(steps=40, restarts=1)
    bounds = {"low": digits.X.min(axis=0), "high": digits.X.max(axis=0), "image_shape": digits.image_shape}
    a = invert_update(model, update, digits.y[5:7], settings=settings, seed=3, **bounds)
    b = invert_update(model, update, digits.y[5:7], settings=settings, seed=3, **bounds)
    assert np.array_equal(a.inputs, b.inputs) and a.gradient_distance == b.gradient_distance
    assert np.array_equal(ModelAdapter(model).get_vector(), before)
    assert a.inputs.shape == (2, 64)
    assert np.all(a.inputs >= bounds["low"]) and np.all(a.inputs <= bounds["high"])  # boxed to the data's range
    with pytest.raises(ModelError):
        invert_update(model, np.zeros_like(update), digits.y[5:7], settings=settings, **bounds)
    with pytest.raises(ConfigError):
        InversionSettings(steps=0)


def test_one_site_update_at_batch_size_1_gives_the_record_away(digits):
    r = run_inversion(digits, MLP, batch_size=1, seed=0)
    assert r.metric == "psnr" and r.labels_exact and r.label_accuracy == 1.0
    assert r.random_baseline < r.baseline < 14  # the mean guess is the stronger blind guess
    assert r.mean_quality > r.baseline + 20  # measured about 41 dB against 12
    assert r.gradient_distance < 0.01
    assert r.seconds < 15


@pytest.mark.parametrize("batch_size", [4, 8])
def test_one_site_update_of_a_small_batch_gives_every_record_away(digits, batch_size):
    r = run_inversion(digits, MLP, batch_size=batch_size, seed=1)
    assert r.labels_exact and r.label_accuracy == 1.0
    assert r.mean_quality > r.baseline + 15  # measured about 34 dB against 11.5
    assert min(r.quality) > r.baseline + 8  # not one good record and blends: every record
    assert r.seconds < 15


@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_the_secure_aggregate_of_5_sites_does_not_give_a_site_away(digits, batch_size):
    # The same attack, the same seed, on what a coordinator with and without secure aggregation sees.
    alone = run_inversion(digits, MLP, batch_size=batch_size, seed=0)
    mixed = run_inversion(digits, MLP, batch_size=batch_size, sites=5, seed=0)
    assert alone.mean_quality > alone.baseline + 10  # the attack works (about 25 to 41 dB)
    assert mixed.mean_quality < mixed.baseline + 3  # the aggregate: about the mean guess (measured 7.7 to 12.2)
    assert mixed.mean_quality < alone.mean_quality - 10
    assert mixed.gradient_distance > 0.05  # and the attacker can tell that it failed


def test_a_tiny_secure_aggregate_still_exposes_its_union(digits):
    """A limit, pinned so nobody over-claims: one local step of 5 sites at batch size 1 is a batch-5 gradient.

    Secure aggregation hides which site holds which record, not the records:
    an attacker asking for all 5 recovers them. Only DP (or many local steps
    over many records) protects this case.
    """
    r = run_inversion(digits, MLP, batch_size=1, sites=5, reconstruct=5, seed=0)
    assert r.labels_exact
    assert r.mean_quality > r.baseline + 15  # measured about 34 dB


def test_dp_noise_defeats_the_attack_and_no_noise_does_not(digits):
    plain = run_inversion(digits, MLP, batch_size=4, seed=0)
    clip_only = run_inversion(digits, MLP, batch_size=4, noise_multiplier=0.0, clip=100.0, seed=0)
    noisy = run_inversion(digits, MLP, batch_size=4, noise_multiplier=1.0, clip=1.0, seed=0)
    # DP-SGD without noise and with a clip that never binds is plain training: the attack still works
    assert clip_only.mean_quality == pytest.approx(plain.mean_quality, abs=0.5)
    assert clip_only.mean_quality > clip_only.baseline + 15
    assert noisy.mean_quality < noisy.baseline + 2  # measured 10.8 dB against 11.6
    assert noisy.gradient_distance > 0.5


def test_tabular_records_are_recovered_feature_by_feature():
    table = load_builtin("breast-cancer")
    spec = ModelSpec(kind="mlp", hidden=(64,))
    r = run_inversion(table, spec, batch_size=1, seed=0)
    assert r.metric == "feature_error" and r.labels_exact
    assert r.baseline > 0.4 and r.random_baseline > r.baseline  # lower is better here
    assert r.mean_quality < 0.05  # within 1/20 of a standard deviation per feature (measured below 0.001)
    assert r.gain > 0.4
    mixed = run_inversion(table, spec, batch_size=1, sites=5, seed=0)
    assert mixed.mean_quality > 0.3  # the aggregate's single guess is no longer the record


def test_run_inversion_checks_its_settings(digits):
    with pytest.raises(ConfigError):
        run_inversion(digits, MLP, batch_size=0)
    with pytest.raises(ConfigError):
        run_inversion(digits, MLP, batch_size=2, reconstruct=1)
    with pytest.raises(ConfigError):
        run_inversion(digits, MLP, batch_size=1, noise_multiplier=1.0)  # DP needs a clip
    with pytest.raises(ConfigError):
        run_inversion(digits, MLP, batch_size=1, clip=1.0)
    with pytest.raises(ConfigError):
        run_inversion(digits, MLP, batch_size=1000, sites=2)
