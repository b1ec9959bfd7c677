"""The one-run DP audit: canaries in, canaries out, one training run, an empirical lower bound on epsilon.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023). Each of ``m`` canaries is put into the training data with
probability one half, independently; the run trains once; an auditor scores
every canary, guesses "in" for the ``k+`` highest scores and "out" for the
``k-`` lowest, and abstains on the rest. If the run is (epsilon, delta)-DP,
the count of correct guesses cannot be much better than ``r = k+ + k-``
tosses of a coin that lands right with probability e^eps / (1 + e^eps)
(randomised response at epsilon, the best any epsilon-DP guess can do). The
largest epsilon whose claim the observed count refutes at the chosen
confidence is the *empirical lower bound*. A correct implementation can
never be caught above its accounted epsilon (except with probability
1 - confidence); one that adds less noise than it declares is.

Two layers, pure maths apart from the experiment:

- :func:`p_value` and :func:`epsilon_lower_bound`: the paper's statistics.
- :func:`run_canary_audit`: DP-SGD with the paper's white-box "gradient
  canaries", on a built-in dataset and model, or on what a run trained
  (:func:`task_training`: the run's pooled training rows, its task's model
  built from the run's task spec and its per-example loss on the task's
  training targets). A canary is a record whose gradient is
  ``clip`` times a unit vector on one coordinate of the model (a Dirac
  canary). It is Poisson-sampled like every record, its gradient goes
  through the project's own clipping (:func:`~consortium.privacy.dpsgd.clip_and_sum`)
  and joins the data's clipped sum (:func:`~consortium.privacy.dpsgd.clipped_sum_fast`)
  before the Gaussian noise. A canary's score is the model's final-minus-initial
  change along its coordinate.

The coordinates are the quietest ones, those where the data's clipped
gradient at initialisation is smallest, so that little but canaries and noise
moves them. On ``digits`` three of the 64 pixels are blank in every image:
the first layer's weights from them never receive a data gradient, and with
an MLP of width 512 that leaves 1536 coordinates on which the audit faces
the noise alone, the setting in which the paper's white-box audit is tightest.
The choice depends on the data and the initial model, never on which
canaries are in, which is all the statistics need.

Gradient canaries need no label, so the method is the same for any task:
a classification's or a regression's (or a study's own loss) enters only
through the data's clipped gradients, which the canaries' coordinates are
chosen to avoid. What the audit tests is the mechanism (sampling, clipping,
noise, accounting), which the framework runs whatever the task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import binom
from torch import nn

from consortium.data.datasets import Table, load_builtin
from consortium.errors import ConfigError
from consortium.learning.models import build_model, standardisation
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.task import Task
from consortium.learning.training import make_optimizer
from consortium.privacy.accountant import dp_sgd_epsilon
from consortium.privacy.dpsgd import (
    PerExampleLoss,
    clip_and_sum,
    clipped_sum_fast,
    cross_entropy,
    fast_path_supported,
    per_example_gradients,
    require_per_example,
)
from consortium.protocol import messages as m
from consortium.protocol.task import build_model as build_task_model
from consortium.protocol.task import data_shape

log = logging.getLogger(__name__)


# -- the statistics ---------------------------------------------------------------------


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not (isinstance(m, int | np.integer) and isinstance(guesses, int | np.integer) and isinstance(correct, int | np.integer)):
        raise ConfigError(f"canaries, guesses and correct guesses are whole numbers, got {m!r}, {guesses!r}, {correct!r}")
    if not 0 <= correct <= guesses <= m or m < 1:
        raise ConfigError(
            f"need 0 <= correct <= guesses <= canaries and at least one canary, got {correct} correct of "
            f"{guesses} guesses on {m} canaries"
        )


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[at least ``correct`` of ``guesses`` guesses are right] for any (epsilon, delta)-DP run.

    With ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``, Theorem 5.2 of
    Steinke, Nasr and Jagielski bounds the chance of ``v`` or more correct
    guesses among ``r`` (the rest abstentions) about ``m`` canaries, each in
    with probability 1/2, by

        f(v) + 2 m delta * max_{1 <= i <= m} (f(v - i) - f(v)) / i.

    For i >= v, f(v - i) = 1, so the ratio (1 - f(v)) / i falls with i and
    the maximum is over 1 <= i <= v (as in the paper's appendix code). Each numerator
    ``P[v - i <= Binomial < v]`` is a running sum of probability masses,
    which keeps the small differences exact. With delta = 0 this is the pure
    bound, the binomial tail alone.
    """
    _check_counts(m, guesses, correct)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ConfigError(f"delta must be in [0, 1], got {delta}")
    q = float(expit(epsilon))  # e^eps / (1 + e^eps): randomised response's accuracy at epsilon
    tail = float(binom.sf(correct - 1, guesses, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    i = np.arange(1, correct + 1)
    below = np.cumsum(binom.pmf(correct - i, guesses, q))  # P[v - i <= Binomial(r, q) <= v - 1]
    return min(tail + 2 * m * delta * float(np.max(below / i)), 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` refute at ``confidence``.

    An (epsilon, delta) claim is refuted when :func:`p_value` falls below
    ``1 - confidence``: were the run (epsilon, delta)-DP, so many right guesses
    would happen less often than that. The bound returned is refuted itself
    (0 when even epsilon = 0 is not, as for guesses no better than chance).

    Why the supremum is valid even where the p-value is not monotone in
    epsilon (with delta > 0 it need not be): a run that is (eps0, delta)-DP
    is (eps, delta)-DP for every eps >= eps0, so the infimum of the p-values
    over eps >= eps0 is again a valid p-value for eps0, and it falls below
    ``1 - confidence`` exactly when some eps >= eps0 is refuted. The search
    keeps its lower end refuted, so where the p-value wiggles it can only
    answer lower (safe), never higher. It stops within 1e-9 (relative).
    """
    _check_counts(m, guesses, correct)
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")
    alpha = 1 - confidence

    def refuted(eps: float) -> bool:
        return p_value(m, guesses, correct, eps, delta) < alpha

    if guesses == 0 or not refuted(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while refuted(hi):  # finite: as epsilon grows, q -> 1 and the tail P[Binomial >= v] -> 1
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if refuted(mid) else (lo, mid)
    return lo


# -- the experiment -----------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryAuditSettings:
    """One audited DP-SGD run: the data, the model, the declared mechanism, the canaries and the guesses.

    ``noise_divisor`` > 1 deliberately breaks the mechanism: the noise added
    is ``noise_multiplier / noise_divisor`` times the clip, while the
    accountant is still asked about the declared ``noise_multiplier``. It
    exists to show that the audit catches a run quieter than it claims.
    ``guess_in`` and ``guess_out`` are fixed before the run: choosing them
    after looking at the scores would spend the confidence twice.
    """

    dataset: str = "digits"  # the built-in data and model (``model``), where no ``AuditedTraining`` is given
    model: ModelSpec = field(default_factory=lambda: ModelSpec(kind="mlp", hidden=(512,)))
    train: TrainSettings = field(default_factory=lambda: TrainSettings(optimizer="sgd", lr=0.5, momentum=0.0))
    canaries: int = 1000
    guess_in: int = 100
    guess_out: int = 100
    sampling_rate: float = 0.1
    noise_multiplier: float = 1.0
    clip: float = 1.0
    steps: int = 100
    delta: float = 1e-5
    confidence: float = 0.95
    noise_divisor: float = 1.0

    def __post_init__(self) -> None:
        if self.canaries < 1 or self.guess_in < 0 or self.guess_out < 0 or self.guess_in + self.guess_out > self.canaries:
            raise ConfigError(
                f"need at least one canary and 0 <= guess_in + guess_out <= canaries, got {self.canaries} canaries, "
                f"{self.guess_in} 'in' and {self.guess_out} 'out' guesses"
            )
        if not (0 < self.sampling_rate <= 1) or self.clip <= 0 or self.steps < 1:
            raise ConfigError(
                f"need 0 < sampling_rate <= 1, clip > 0 and steps >= 1, got {self.sampling_rate}, {self.clip}, {self.steps}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"the noise multiplier must be a number >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.noise_divisor) and self.noise_divisor >= 1):
            raise ConfigError(f"the noise divisor must be a number >= 1 (1: the declared noise), got {self.noise_divisor}")
        if not (0 < self.delta < 1 and 0 < self.confidence < 1):
            raise ConfigError(f"delta and confidence must lie strictly between 0 and 1, got {self.delta} and {self.confidence}")


@dataclass(frozen=True)
class CanaryAuditResult:
    """What one audited run showed. ``lower_bound > accounted_epsilon`` means the run is less private than claimed."""

    canaries: int  # m
    included: int  # how many of them the coin flips put in
    guesses: int  # r = guess_in + guess_out
    correct: int
    lower_bound: float  # the empirical epsilon, at settings.confidence
    accounted_epsilon: float  # the accountant's epsilon for the declared noise
    delta: float
    settings: CanaryAuditSettings

    @property
    def caught(self) -> bool:
        """True when the audit refutes the accounted epsilon: the implementation breaks its claim."""
        return self.lower_bound > self.accounted_epsilon


@dataclass(frozen=True)
class AuditedTraining:
    """What the audited DP-SGD trains on: the rows, their training targets, a fresh model per seed and the
    per-example loss. ``source`` names it in the report (the dataset, or the run's task and data)."""

    X: torch.Tensor
    y: torch.Tensor
    model: Callable[[int], nn.Module]
    loss: PerExampleLoss = cross_entropy
    source: str = ""


def builtin_training(settings: CanaryAuditSettings) -> AuditedTraining:
    """The built-in dataset ``settings.dataset`` and the built-in model ``settings.model``, standardised by the
    whole dataset, trained with cross-entropy."""
    table = load_builtin(settings.dataset)
    mean, scale = standardisation(table.X)

    def model(seed: int) -> nn.Module:
        return build_model(settings.model, n_features=table.n_features, n_classes=table.n_classes, mean=mean,
                           scale=scale, image_shape=table.image_shape, seed=seed)

    return AuditedTraining(torch.from_numpy(table.X), torch.from_numpy(table.y), model, cross_entropy, settings.dataset)


def task_training(task: Task, spec: m.TaskSpec, table: Table, source: str = "") -> AuditedTraining:
    """A run's training as DP-SGD saw it: ``table`` (the run's pooled training rows, CSV or any data), the
    task's model built from the run's task spec (its layout and consortium-wide standardisation), and the
    task's per-example loss on its training targets (a regression's standardised target)."""
    task = task.with_model(spec.model)
    y = torch.from_numpy(table.y)
    y = y.long() if task.target == "classification" else task.training_targets(y, data_shape(spec))
    return AuditedTraining(
        torch.from_numpy(table.X), y, lambda seed: build_task_model(task, spec, seed), task.loss, source or task.name,
    )


def _clipped_data_sum(
    model: nn.Module, named: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor, clip: float,
    per_example: Callable[[dict, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None, loss: PerExampleLoss,
) -> dict[str, torch.Tensor]:
    """The data's clipped gradient sum, by the project's fast path where the model allows it."""
    if per_example is None:
        return clipped_sum_fast(model, X, y, clip, loss)[0]
    return clip_and_sum(per_example({k: v.detach() for k, v in named.items()}, X, y), clip)


def trainable_parameters(model: nn.Module) -> int:
    """How many coordinates a model offers canaries: its trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _quietest_coordinates(gradient: dict[str, torch.Tensor], m: int, generator: torch.Generator) -> torch.Tensor:
    """Flat indices (over the trainable parameters in order) of the ``m`` smallest |gradient|, ties in random order."""
    flat = torch.cat([g.detach().reshape(-1).abs() for g in gradient.values()])
    if m > flat.numel():
        raise ConfigError(f"{m} canaries need as many coordinates, but the model has {flat.numel()}: use fewer or a wider model")
    shuffle = torch.randperm(flat.numel(), generator=generator)
    order = torch.argsort(flat[shuffle], stable=True)
    return shuffle[order[:m]]


def run_canary_audit(
    settings: CanaryAuditSettings, *, generator: torch.Generator, training: AuditedTraining | None = None,
) -> CanaryAuditResult:
    """Train once with DP-SGD and canaries, guess which canaries were in, and bound epsilon from below.

    ``training``: the data, model and loss to audit (:func:`task_training` for a run's); None, the built-in
    ``settings.dataset`` and ``settings.model``.

    Everything random (the model's initial weights, the coin flips, the
    Poisson sampling of records and canaries, the noise) comes from
    ``generator``: seed it with :func:`~consortium.privacy.dpsgd.secure_generator`.
    The gradient is the data's clipped sum plus the sampled canaries' clipped
    gradients plus N(0, (noise_multiplier / noise_divisor * clip)^2) per
    coordinate, divided by ``sampling_rate * n`` for the n data rows, a
    denominator that does not depend on which canaries are in.
    """
    s = settings
    if s.noise_divisor != 1:
        log.warning("canary audit: noise divided by %s, a deliberately non-private mechanism", s.noise_divisor)
    data = training or builtin_training(s)
    X, y, loss = data.X, data.y, data.loss
    n = X.shape[0]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    model = data.model(seed)
    require_per_example(model)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per_example = None if fast_path_supported(model) else per_example_gradients(model, loss)

    # Where the canaries live, and which are in: both fixed before training starts.
    coords = _quietest_coordinates(
        _clipped_data_sum(model, named, X, y, s.clip, per_example, loss), s.canaries, generator
    )
    included = torch.rand(s.canaries, generator=generator) < 0.5
    sizes = [p.numel() for p in named.values()]
    offsets = np.cumsum([0, *sizes])
    owner = torch.from_numpy(np.searchsorted(offsets, coords.numpy(), side="right") - 1)  # which parameter
    local = coords - torch.from_numpy(offsets)[owner]  # where in it
    flat_start = torch.cat([p.detach().reshape(-1) for p in named.values()])[coords].clone()

    opt = make_optimizer(list(named.values()), s.train)
    sigma = s.noise_multiplier / s.noise_divisor * s.clip
    model.train()
    for _ in range(s.steps):
        rows = (torch.rand(n, generator=generator) < s.sampling_rate).nonzero().squeeze(1)
        hit = (torch.rand(s.canaries, generator=generator) < s.sampling_rate) & included
        summed = (
            _clipped_data_sum(model, named, X[rows], y[rows], s.clip, per_example, loss) if len(rows)
            else {k: torch.zeros_like(v) for k, v in named.items()}
        )
        picked = hit.nonzero().squeeze(1)
        if len(picked):
            # Each sampled canary is one record: its gradient, -clip on its own coordinate (so that a
            # step moves the weight up), is clipped by the project's clipping like any record's.
            grads = {}
            for j, (k, p) in enumerate(named.items()):
                here = (owner[picked] == j).nonzero().squeeze(1)  # the sampled canaries living in parameter k
                if len(here):
                    g = torch.zeros(len(picked), p.numel())
                    g[here, local[picked[here]]] = -s.clip
                    grads[k] = g.view(len(picked), *p.shape)
            for k, g in clip_and_sum(grads, s.clip).items():
                summed[k] = summed[k] + g
        opt.zero_grad(set_to_none=True)
        for k, p in named.items():
            noise = torch.randn(p.shape, generator=generator) * sigma
            p.grad = (summed[k] + noise) / (s.sampling_rate * n)
        opt.step()

    flat_end = torch.cat([p.detach().reshape(-1) for p in named.values()])[coords]
    scores = (flat_end - flat_start).numpy()
    order = np.argsort(-scores, kind="stable")  # highest first
    truth = included.numpy()
    correct = int(truth[order[: s.guess_in]].sum()) + int((~truth[order[s.canaries - s.guess_out:]]).sum())
    guesses = s.guess_in + s.guess_out
    return CanaryAuditResult(
        canaries=s.canaries,
        included=int(truth.sum()),
        guesses=guesses,
        correct=correct,
        lower_bound=epsilon_lower_bound(s.canaries, guesses, correct, s.delta, s.confidence),
        accounted_epsilon=dp_sgd_epsilon(
            noise_multiplier=s.noise_multiplier, sampling_rate=s.sampling_rate, steps=s.steps, delta=s.delta
        ),
        delta=s.delta,
        settings=s,
    )
