import numpy as np
import pytest

from consortium.errors import ConfigError
from consortium.learning.strategies import FedAdam, FedAvg, FedProx, FedYogi


def test_fedavg_with_equal_weights_is_the_mean_of_site_models():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50).astype(np.float32)
    site_models = [rng.standard_normal(50).astype(np.float32) for _ in range(4)]
    # What the coordinator hands the strategy: the weighted mean of the sites' updates.
    mean_update = np.mean([w - x for w in site_models], axis=0).astype(np.float32)
    new = FedAvg().apply(1, x, mean_update)
    np.testing.assert_allclose(new, np.mean(site_models, axis=0), rtol=0, atol=1e-6)


def test_fedavg_selects_a_fraction_and_at_least_min_sites():
    sites = [f"s{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    assert FedAvg().select(1, sites, rng) == sites
    chosen = FedAvg(fraction=0.3).select(1, sites, rng)
    assert len(chosen) == 3 and set(chosen) <= set(sites) and len(set(chosen)) == 3
    assert len(FedAvg(fraction=0.1, min_sites=4).select(1, sites, rng)) == 4


def test_fedprox_only_adds_the_proximal_term():
    assert FedAvg().proximal_mu == 0.0
    assert FedProx(mu=0.5).proximal_mu == 0.5
    x = np.ones(3, dtype=np.float32)
    d = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    assert np.array_equal(FedProx(mu=0.5).apply(1, x, d), FedAvg().apply(1, x, d))


def test_fedadam_matches_hand_computed_steps():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = FedAdam(server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = np.zeros(2, dtype=np.float32)
    d1 = np.array([1.0, -2.0], dtype=np.float32)
    x1 = s.apply(1, x, d1)
    m = (1 - b1) * d1
    v = b2 * tau**2 + (1 - b2) * d1**2
    np.testing.assert_allclose(x1, lr * m / (np.sqrt(v) + tau), rtol=1e-6)
    d2 = np.array([0.5, 0.5], dtype=np.float32)
    x2 = s.apply(2, x1, d2)
    m = b1 * m + (1 - b1) * d2
    v = b2 * v + (1 - b2) * d2**2
    np.testing.assert_allclose(x2, x1 + lr * m / (np.sqrt(v) + tau), rtol=1e-6)


def test_fedyogi_second_moment_is_additive():
    b2, tau = 0.99, 1e-3
    yogi = FedYogi(server_lr=0.1, beta1=0.0, beta2=b2, tau=tau)
    adam = FedAdam(server_lr=0.1, beta1=0.0, beta2=b2, tau=tau)
    x = np.zeros(1, dtype=np.float32)
    v_yogi = v_adam = tau**2
    for d in (2.0, 0.1, 0.1):
        yogi.apply(1, x, np.array([d], dtype=np.float32))
        adam.apply(1, x, np.array([d], dtype=np.float32))
        v_yogi = v_yogi - (1 - b2) * d * d * np.sign(v_yogi - d * d)
        v_adam = b2 * v_adam + (1 - b2) * d * d
        np.testing.assert_allclose(yogi.v, [v_yogi], rtol=1e-6)
        np.testing.assert_allclose(adam.v, [v_adam], rtol=1e-6)
    # Once v exceeds d^2, Yogi shrinks v by a fixed (1 - b2) d^2, Adam by a factor b2.
    assert abs(yogi.v[0] - adam.v[0]) > 1e-4


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(fraction=0),
        lambda: FedAvg(fraction=1.5),
        lambda: FedAvg(min_sites=0),
        lambda: FedAvg(server_lr=-1),
        lambda: FedProx(mu=-0.1),
        lambda: FedAdam(beta1=1.0),
        lambda: FedAdam(tau=0),
    ],
)
def test_bad_parameters_are_refused(make):
    with pytest.raises(ConfigError):
        make()
