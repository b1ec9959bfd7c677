"""Differential privacy: accounting against dp-accounting, DP-SGD by reduction and statistics, site budgets."""

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from consortium.config import SimulationConfig
from consortium.errors import ConfigError
from consortium.learning.specs import TrainSettings
from consortium.learning.training import TrainingData, train_local
from consortium.privacy.accountant import calibrate_noise, dp_sgd_epsilon, epsilon
from consortium.privacy.dpsgd import (
    clip_and_sum,
    per_example_gradients,
    secure_generator,
    train_dp_sgd,
)
from consortium.privacy.events import RecordLevelEvent
from consortium.privacy.ledger import BudgetExceeded, BudgetLedger
from consortium.run.simulation import run_simulation

# -- accounting -------------------------------------------------------------------


def test_known_answers_from_dp_accounting():
    # The reference figures, and dp-accounting called directly.
    ev = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 10000)
    direct_pld = pld.PLDAccountant().compose(ev).get_epsilon(1e-5)
    direct_rdp = rdp.RdpAccountant().compose(ev).get_epsilon(1e-5)
    ours_pld = dp_sgd_epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=10000, delta=1e-5, pld_interval=1e-4)
    ours_rdp = dp_sgd_epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=10000, delta=1e-5, accountant="rdp")
    assert ours_pld == pytest.approx(direct_pld, rel=1e-12) and ours_pld == pytest.approx(5.19, abs=0.01)
    assert ours_rdp == pytest.approx(direct_rdp, rel=1e-12) and ours_rdp == pytest.approx(5.63, abs=0.01)
    # The project's coarser PLD grid is pessimistic: never below the fine one, and close to it.
    coarse = dp_sgd_epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=10000, delta=1e-5)
    assert direct_pld <= coarse <= direct_pld + 0.01


def test_rounds_of_one_mechanism_compose_like_one_long_run():
    ev = RecordLevelEvent(noise_multiplier=1.2, clip=1.0, sampling_rate=0.05, steps=20)
    assert epsilon([ev] * 5, 1e-5) == pytest.approx(epsilon([ev.model_copy(update={"steps": 100})], 1e-5), rel=1e-12)
    other = RecordLevelEvent(noise_multiplier=2.0, clip=1.0, sampling_rate=0.05, steps=20)
    direct = pld.PLDAccountant(value_discretization_interval=1e-3)
    direct.compose(dp_accounting.ComposedDpEvent([ev.to_dp_event(), other.to_dp_event(), ev.to_dp_event()]))
    assert epsilon([ev, other, ev], 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.01, 1000), (3.0, 0.1, 200), (8.0, 0.05, 400), (0.5, 1.0, 5)])
def test_calibrated_noise_never_overshoots_and_is_tight(target, q, steps):
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sampling_rate=q, steps=steps)
    assert dp_sgd_epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5) <= target
    assert dp_sgd_epsilon(noise_multiplier=sigma * 0.98, sampling_rate=q, steps=steps, delta=1e-5) > target


def test_bad_accounting_inputs_are_refused():
    with pytest.raises(ConfigError, match="delta"):
        dp_sgd_epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=0.0)
    with pytest.raises(ConfigError, match="target epsilon"):
        calibrate_noise(target_epsilon=-1, delta=1e-5, sampling_rate=0.1, steps=10)


# -- DP-SGD -----------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_per_example_gradients_match_a_microbatch_oracle():
    m = _mlp()
    X, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    grads = per_example_gradients(m)({k: v.detach() for k, v in m.named_parameters()}, X, y)
    for i in range(7):
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(X[i : i + 1]), y[i : i + 1]).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_every_example_and_spares_small_ones():
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.zeros(2, 1)}
    s = clip_and_sum(g, 1.0)
    torch.testing.assert_close(s["a"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]))


def test_zero_noise_and_no_clipping_reproduce_plain_training():
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    settings = TrainSettings(epochs=5, batch_size=40, lr=0.1, momentum=0.9)
    plain, private = _mlp(), _mlp()
    train_local(plain, TrainingData.of(X, y), settings, seed=0)  # full batch: shuffling does not matter
    train_dp_sgd(private, TrainingData.of(X, y), settings, sampling_rate=1.0, noise_multiplier=0.0, clip=1e9, steps=5, generator=secure_generator(0))
    for a, b in zip(plain.parameters(), private.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_measured_noise_is_within_15_percent_of_theory():
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 50)
    X, y = torch.randn(30, 200), torch.randint(0, 50, (30,))
    settings = TrainSettings(epochs=1, lr=1.0, momentum=0.0)
    sigma, clip, q = 1.3, 0.5, 0.2
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def one_step(noise):
        model.load_state_dict(start)
        train_dp_sgd(model, TrainingData.of(X, y), settings, sampling_rate=q, noise_multiplier=noise, clip=clip, steps=1, generator=secure_generator(7))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    # Same sampling draws (same seed), with and without noise: the difference is the noise term alone.
    diff = one_step(sigma) - one_step(0.0)
    expected = settings.lr * sigma * clip / (q * X.shape[0])
    assert abs(float(diff.std()) / expected - 1) < 0.15
    assert abs(float(diff.mean())) < 0.1 * expected


def test_batchnorm_is_refused_under_dp_sgd_naming_the_module_and_the_fix():
    m = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"module '1' \(BatchNorm1d\) mixes the examples .* GroupNorm or LayerNorm"):
        train_dp_sgd(m, TrainingData.of(torch.randn(8, 6), torch.zeros(8, dtype=torch.long)), TrainSettings(),
                     sampling_rate=0.5, noise_multiplier=1.0, clip=1.0, steps=1, generator=secure_generator(0))


# -- a task's own model and loss ---------------------------------------------------

#: Class weights and label smoothing: a study's loss, one value per example.
def _weighted_smoothed(outputs, targets):
    weight = torch.tensor([0.2, 1.0, 3.0])
    return torch.nn.functional.cross_entropy(outputs, targets, weight=weight, label_smoothing=0.1, reduction="none")


class _Normed(torch.nn.Module):
    """A user's module the fast path does not cover: GroupNorm after a convolution, LayerNorm, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 8), torch.nn.LayerNorm(8),
                                        torch.nn.GELU(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


def _oracle(model, loss, X, y, clip):
    """One example at a time through autograd: each gradient clipped to ``clip``, then summed."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(X.shape[0]):
        model.zero_grad()
        loss(model(X[i : i + 1]), y[i : i + 1]).sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        for k, g in grads.items():
            total[k] += g * min(1.0, clip / float(norm))
    return total


@pytest.mark.parametrize("make,shape", [(_Normed, (2, 5, 5)), (_mlp, (6,))], ids=["groupnorm-cnn", "mlp"])
def test_per_example_gradients_of_a_user_module_and_loss_equal_a_microbatch_oracle(make, shape):
    from consortium.privacy.dpsgd import clipped_sum_fast, fast_path_supported

    torch.manual_seed(3)
    m = make()
    X, y = torch.randn(9, *shape) * 2, torch.randint(0, 3, (9,))
    expected = _oracle(m, _weighted_smoothed, X, y, clip=0.3)
    params = {k: v.detach() for k, v in m.named_parameters()}
    summed = clip_and_sum(per_example_gradients(m, _weighted_smoothed)(params, X, y), 0.3)
    if fast_path_supported(m):  # and the fast path, for the modules it covers
        fast, _ = clipped_sum_fast(m, X, y, 0.3, _weighted_smoothed)
        for k in expected:
            torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)
    for k in expected:
        torch.testing.assert_close(summed[k], expected[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [_Normed, lambda: _mlp()], ids=["vmap path", "fast path"])
def test_dp_sgd_trains_on_the_tasks_loss(make):
    """A loss that gives class 0 no weight: on records all of class 0 nothing moves; cross-entropy moves."""
    X = torch.randn(16, 2, 5, 5) if make is _Normed else torch.randn(16, 6)
    y = torch.zeros(16, dtype=torch.long)
    ignore_class_0 = lambda out, t: torch.nn.functional.cross_entropy(  # noqa: E731
        out, t, weight=torch.tensor([0.0, 1.0, 1.0]), reduction="none")

    def step(loss):
        torch.manual_seed(0)
        m = make()
        before = [p.detach().clone() for p in m.parameters()]
        kw = {} if loss is None else {"loss": loss}
        train_dp_sgd(m, TrainingData.of(X, y), TrainSettings(lr=0.5, momentum=0.0), sampling_rate=1.0, noise_multiplier=0.0, clip=1.0,
                     steps=2, generator=secure_generator(0), **kw)
        return max(float((a - b.detach()).abs().max()) for a, b in zip(before, m.parameters()))

    assert step(ignore_class_0) == 0.0
    assert step(None) > 1e-3


def test_noise_comes_from_the_os_unless_a_test_seed_is_given():
    a, b = secure_generator(), secure_generator()
    assert not torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    c, d = secure_generator(5), secure_generator(5)
    assert torch.equal(torch.randn(8, generator=c), torch.randn(8, generator=d))


# -- the site's ledger ------------------------------------------------------------


def test_a_site_with_cap_one_takes_two_rounds_refuses_the_third_and_remembers(tmp_path):
    # One round = a Gaussian step (q = 1) whose three-fold composition just exceeds 1.0.
    sigma = calibrate_noise(target_epsilon=1.05, delta=1e-5, sampling_rate=1.0, steps=3)
    ev = RecordLevelEvent(noise_multiplier=sigma, clip=1.0, sampling_rate=1.0, steps=1)
    path = tmp_path / "site" / "budget.sqlite"
    ledger = BudgetLedger(path, site="hospital-a", epsilon_cap=1.0, delta=1e-5)
    first = ledger.spend(ev, rnd=1)
    second = ledger.spend(ev, rnd=2)
    assert 0.3 < first.epsilon_after - first.epsilon_before < 0.7
    assert second.epsilon_after <= 1.0
    with pytest.raises(BudgetExceeded, match="above this site's cap of 1"):
        ledger.spend(ev, rnd=3)
    assert ledger.spent() <= 1.0 and len(ledger.events()) == 2
    # A restart (and a coordinator asking for a looser cap) changes nothing.
    again = BudgetLedger(path, site="hospital-a", epsilon_cap=5.0, delta=1e-5)
    assert again.epsilon_cap == 1.0 and len(again.events()) == 2
    with pytest.raises(BudgetExceeded):
        again.spend(ev, rnd=3)
    assert again.spent() == pytest.approx(second.epsilon_after)


def test_a_ledger_is_bound_to_its_site(tmp_path):
    BudgetLedger(tmp_path / "b.sqlite", site="a", epsilon_cap=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="belongs to site 'a'"):
        BudgetLedger(tmp_path / "b.sqlite", site="b", epsilon_cap=1.0, delta=1e-5)


def test_sites_refuse_rounds_beyond_their_own_caps_in_a_run(tmp_path):
    cfg = SimulationConfig.model_validate({
        "rounds": 6,
        "data": {"dataset": "breast-cancer", "sites": 3},
        "privacy": {"epsilon": 4.0, "site_epsilon_caps": {"site-2": 2.0}, "test_seed": 11},
        "baselines": {"local_only": False, "pooled": False},
    })
    s = run_simulation(cfg, out=tmp_path / "run").summary
    pv = s["privacy"]
    assert pv["test_mode"] and any("TEST MODE" in w for w in s["warnings"])
    assert pv["epsilon_per_site"]["site-2"] <= 2.0
    assert pv["refusals"].get("site-2") and "site-1" not in pv["refusals"]
    refused = pv["refusals"]["site-2"]
    assert refused == list(range(refused[0], 7))  # once out of budget, out for good
    assert all(e <= 4.0 for e in pv["epsilon_per_site"].values())
    assert s["federated"]["rounds_completed"] == 6  # the others carry on
    # Every round a site paid for is one frozen event naming its cohort (recorded, not accounted).
    paid = BudgetLedger(tmp_path / "run" / "sites" / "site-1" / "budget.sqlite", site="site-1", epsilon_cap=4.0, delta=1e-5)
    assert [e.cohort for e in paid.events()] == [3] * 6
    assert paid.spent() == pytest.approx(epsilon([e.model_copy(update={"cohort": None}) for e in paid.events()], 1e-5))


def test_test_seed_makes_a_private_run_reproducible(tmp_path):
    def run(name):
        cfg = SimulationConfig.model_validate({
            "rounds": 2, "data": {"dataset": "breast-cancer", "sites": 3},
            "privacy": {"test_seed": 3}, "baselines": {"local_only": False, "pooled": False},
        })
        return run_simulation(cfg, out=tmp_path / name)

    assert np.array_equal(run("a").params, run("b").params)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4, bias=False)), (10,)),
        (
            lambda: torch.nn.Sequential(
                torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 2, stride=2, bias=False),
                torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 4),
            ),
            (2, 6, 6),
        ),
    ],
)
def test_the_fast_path_equals_per_example_gradients(make, shape):
    from consortium.privacy.dpsgd import clipped_sum_fast, fast_path_supported

    torch.manual_seed(1)
    m = make()
    X, y = torch.randn(12, *shape) * 3, torch.randint(0, 4, (12,))
    assert fast_path_supported(m)
    ref = clip_and_sum(per_example_gradients(m)({k: v.detach() for k, v in m.named_parameters()}, X, y), 0.5)
    fast, _ = clipped_sum_fast(m, X, y, 0.5)
    assert set(fast) == set(ref)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(32, 2))
    assert not fast_path_supported(grouped)  # falls back to vmap per-example gradients


# -- the one-pass path's layers: every branch against the one-example-at-a-time oracle ----------


class _Wide(torch.nn.Module):
    """Convolutions through each per-example branch (shifted windows, grouped), norms over 2-, 3- and 4-D inputs,
    Linear layers on 3-D inputs and without a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(2, 8, 3, padding=1)  # few input channels: the grouped convolution
        self.gn = torch.nn.GroupNorm(4, 8)
        self.dilated = torch.nn.Conv2d(8, 8, (3, 2), padding=(2, 0), dilation=(2, 1))  # shifted windows
        self.strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)  # strided: grouped
        self.tokens = torch.nn.Linear(8, 6)  # on [batch, positions, 8]
        self.ln = torch.nn.LayerNorm(6, bias=False)
        self.gn2 = torch.nn.GroupNorm(2, 6)  # on [batch, 6]
        self.head = torch.nn.Linear(6, 3, bias=False)

    def forward(self, x):
        x = torch.relu(self.dilated(torch.relu(self.gn(self.stem(x)))))
        x = torch.tanh(self.strided(x)).flatten(2).transpose(1, 2)  # [batch, positions, channels]
        x = self.ln(torch.tanh(self.tokens(x))).mean(dim=1)
        return self.head(torch.relu(self.gn2(x)))


def _cnn32():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("cnn32", Path(__file__).parents[1] / "examples" / "images" / "cnn32.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.group_norm_cnn(in_channels=3, n_classes=3, width=8)


@pytest.mark.parametrize("make,shape", [(_Wide, (2, 7, 6)), (_cnn32, (3, 12, 12))], ids=["every-branch", "cnn32"])
def test_the_fast_path_covers_norms_and_every_convolution_branch_exactly(make, shape):
    from consortium.privacy.dpsgd import clipped_sum_fast, fast_path_supported

    torch.manual_seed(5)
    m = make()
    assert fast_path_supported(m)
    X, y = torch.randn(10, *shape) * 2, torch.randint(0, 3, (10,))
    for clip in (0.05, 1e6):  # every example clipped; none clipped (the plain gradient sum)
        expected = _oracle(m, _weighted_smoothed, X, y, clip=clip)
        fast, total = clipped_sum_fast(m, X, y, clip, _weighted_smoothed)
        assert list(fast) == list(expected)  # named and ordered as model.named_parameters()
        for k in expected:
            torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            assert total == pytest.approx(float(_weighted_smoothed(m(X), y).sum()), rel=1e-5)


class _Shared(torch.nn.Module):
    """A Linear run twice, and a convolution whose output a ReLU overwrites in place: hooks alone would be wrong."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.act = torch.nn.ReLU(inplace=inplace)
        self.mid = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 3)
        self.twice = not inplace

    def forward(self, x):
        x = self.act(self.conv(x)).flatten(1)
        x = torch.tanh(self.mid(x))
        return self.head(torch.tanh(self.mid(x)) if self.twice else x)


@pytest.mark.parametrize("inplace", [False, True], ids=["layer-run-twice", "output-changed-in-place"])
def test_the_fast_path_falls_back_to_exact_per_example_gradients_when_hooks_cannot_see_everything(inplace):
    from consortium.privacy.dpsgd import clipped_sum_fast, fast_path_supported

    torch.manual_seed(2)
    m = _Shared(inplace)
    assert fast_path_supported(m)
    X, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    expected = _oracle(m, _weighted_smoothed, X, y, clip=0.2)
    fast, _ = clipped_sum_fast(m, X, y, 0.2, _weighted_smoothed)
    for k in expected:
        torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)


def test_frozen_parameters_are_neither_clipped_over_nor_returned_on_either_path():
    from consortium.privacy.dpsgd import clipped_sum_fast

    torch.manual_seed(4)
    m = _Normed()
    for p in (*m.conv.parameters(), m.head[2].weight):  # a frozen layer, and one frozen weight of a trained LayerNorm
        p.requires_grad_(False)
    X, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    trainable = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    expected = clip_and_sum(per_example_gradients(m, _weighted_smoothed)(trainable, X, y), 0.3)
    fast, _ = clipped_sum_fast(m, X, y, 0.3, _weighted_smoothed)
    assert list(fast) == list(trainable)
    for k in expected:
        torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)


def test_dp_sgd_trains_on_the_tasks_loss_on_the_vmap_path():
    """A grouped convolution is outside the one-pass path: training goes through vmap and still honours the loss."""
    from consortium.privacy.dpsgd import fast_path_supported

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 3 * 3, 3))

    assert not fast_path_supported(make())
    X, y = torch.randn(16, 2, 5, 5), torch.zeros(16, dtype=torch.long)
    ignore_class_0 = lambda out, t: torch.nn.functional.cross_entropy(  # noqa: E731
        out, t, weight=torch.tensor([0.0, 1.0, 1.0]), reduction="none")

    def moved(**kw):
        m = make()
        before = [p.detach().clone() for p in m.parameters()]
        train_dp_sgd(m, TrainingData.of(X, y), TrainSettings(lr=0.5, momentum=0.0), sampling_rate=1.0, noise_multiplier=0.0, clip=1.0,
                     steps=2, generator=secure_generator(0), **kw)
        return max(float((a - b.detach()).abs().max()) for a, b in zip(before, m.parameters()))

    assert moved(loss=ignore_class_0) == 0.0
    assert moved() > 1e-3


class _Scaled(torch.nn.Linear):
    """A Linear subclass whose forward is not z = a W^T + b: the one-pass formula would be wrong for it."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight * 2.0, self.bias)


class _Tricky(torch.nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.first = _Scaled(4, 5) if case == "subclass" else torch.nn.Linear(4, 5)
        self.second = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 3)
        if case == "tied":
            self.head.weight = torch.nn.Parameter(torch.randn(3, 5))
            self.second.weight = torch.nn.Parameter(torch.randn(5, 5))
            self.first.weight = torch.nn.Parameter(torch.randn(5, 4))
            self.extra = torch.nn.Linear(5, 5)
            self.extra.weight = self.second.weight  # one parameter in two layers

    def forward(self, x):
        x = torch.tanh(self.first(x))
        x = torch.tanh(self.second(input=x) if self.case == "keyword" else self.second(x))
        if self.case == "tied":
            x = torch.tanh(self.extra(x))
        return self.head(x)


@pytest.mark.parametrize("case", ["subclass", "tied", "keyword"])
def test_layers_the_hooks_would_misread_take_the_exact_path(case):
    from consortium.privacy.dpsgd import clipped_sum_fast

    torch.manual_seed(6)
    m = _Tricky(case)
    X, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    expected = _oracle(m, _weighted_smoothed, X, y, clip=0.4)
    fast, _ = clipped_sum_fast(m, X, y, 0.4, _weighted_smoothed)
    assert list(fast) == list(expected)
    for k in expected:
        torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("route", [True, False], ids=["gram-norms", "formed-gradients"])
@pytest.mark.parametrize("make,shape", [(_Wide, (2, 7, 6)), (_cnn32, (3, 12, 12))], ids=["every-branch", "cnn32"])
def test_both_convolution_norm_routes_equal_the_oracle(make, shape, route, monkeypatch):
    """Whichever way a convolution's per-example norms are found (Gram matrices, or the gradients formed), padding,
    stride, dilation and non-square kernels included, the clipped sum is the oracle's."""
    from consortium.privacy import dpsgd

    monkeypatch.setattr(dpsgd, "_conv_by_gram", lambda m, a, g: route)
    torch.manual_seed(8)
    m = make()
    X, y = torch.randn(10, *shape) * 2, torch.randint(0, 3, (10,))
    expected = _oracle(m, _weighted_smoothed, X, y, clip=0.05)
    fast, _ = dpsgd.clipped_sum_fast(m, X, y, 0.05, _weighted_smoothed)
    for k in expected:
        torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)


def test_linear_layers_on_sequences_take_gram_norms_exactly():
    """Wide Linear layers on [batch, positions, features] (a transformer's shape): norms from position Gram matrices."""
    from consortium.privacy.dpsgd import _layer_pieces, clipped_sum_fast

    torch.manual_seed(9)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                            torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(48, 3))
    X, y = torch.randn(9, 3, 16), torch.randint(0, 3, (9,))
    assert _layer_pieces(m[0], X, torch.randn(9, 3, 16))["weight"][0] == "sequence"
    for clip in (0.05, 1e6):
        expected = _oracle(m, _weighted_smoothed, X, y, clip=clip)
        fast, _ = clipped_sum_fast(m, X, y, clip, _weighted_smoothed)
        for k in expected:
            torch.testing.assert_close(fast[k], expected[k], rtol=1e-4, atol=1e-5)
