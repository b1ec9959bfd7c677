"""Membership inference against a run's final model: does it give away who was in the training data?

Two attacks, each scored per site on that site's own records: its training
split (members) against its test split (non-members, never trained on).

- **Loss threshold** (Yeom et al., CSF 2018): a record the model fits
  unusually well was probably trained on. The score is minus the record's
  loss under the final model. No shadow models; weak at low FPR.
- **LiRA**, the likelihood-ratio attack (Carlini et al., S&P 2022, online
  variant): ``shadows`` models are trained by *replaying the run's training
  procedure* (the same model, rounds, local training, DP-SGD noise,
  weighting and server step) on random halves of every site's records, each
  record in exactly half of them. For each record the shadows' confidences
  ``phi`` with and without it are fitted by Gaussians (one variance for all
  records, the paper's advice for fewer than 64 shadows), and the score is
  the log-likelihood ratio of the final model's ``phi`` under the two.

The replay is the run's *task*: its model (built from the task spec the
final model file records, so its layout hash is the run's), its training
targets, its own training step (``Task.train``) or, under record-level DP,
DP-SGD on its per-example loss. The statistics:

- the loss attack's score is minus the task's per-example loss (its own,
  class weights and all) on the training targets;
- LiRA's ``phi`` for classification is the paper's logit-scaled confidence
  in the true class, ``log(p_y / (1 - p_y))`` from the logits; for
  regression it is the signed residual ``y - prediction`` when the model
  gives one output per record: under the shadows' randomness it is close to
  Gaussian, as LiRA's fits assume, where the squared error is skewed
  (chi-square), and a member's mean residual is pulled towards 0 from
  either side, which the per-record means capture. It is taken in the
  target's units (each model's prediction mapped back with the target mean
  and deviation it trained under: a shadow's are its own rows'). A
  regression model with several outputs per record (its own loss reads
  them) gets minus its per-example loss instead.

What the red team needs is what a site has, together: the run folder (its
configuration, final model and privacy plan) and the sites' data. A
simulated run's data is rebuilt from its configuration; the attacks never
touch the protocol. Site-level DP (DP-FedAvg) runs are attacked by the loss
threshold only: replaying their noise on one machine is not implemented.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from torch import nn

from consortium.audit.verify import verify_run
from consortium.config import SimulationConfig, load_config
from consortium.data.datasets import Table, concat_tables
from consortium.data.partition import Splits
from consortium.errors import ConsortiumError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.task import Task, load_task
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import train_dp_sgd
from consortium.protocol import messages as m
from consortium.protocol.contributions import read_setup_sum, setup_vector
from consortium.protocol.task import build_model, data_shape
from consortium.redteam.metrics import AttackResult, dp_tpr_bound, evaluate_attack
from consortium.run.lifecycle import run_task_spec
from consortium.run.plan import make_strategy
from consortium.run.simulation import site_splits
from consortium.wire import Tensor

ATTACKS = ("loss", "lira")


class AuditError(ConsortiumError):
    """The red team cannot run on this run folder (no final model, a data source it cannot rebuild, ...)."""


@dataclass(frozen=True)
class Target:
    """What the membership attacks attack: a finished run's model, and each site's members and non-members."""

    run_dir: Path
    config: SimulationConfig  # resolved: the dataset's model and training defaults filled in
    model: nn.Module
    splits: dict[str, Splits]  # train = members, test = non-members
    privacy: dict[str, Any]  # the run summary's privacy section
    model_sha256: str | None = None  # the final model's hash, as the verified transcript records it
    task: Task | None = None  # the run's task (this machine's copy of its code); None: the built-in one
    spec: m.TaskSpec | None = None  # the task spec the final model file records

    @property
    def n_classes(self) -> int:
        return len(next(iter(self.splits.values())).train.classes)

    @property
    def run_task(self) -> Task:
        """The task the run trained, with the architecture its spec names (a built-in task's)."""
        task = self.task or load_task("classification" if self.n_classes else "regression", self.config.model)
        return task.with_model(self.spec.model) if self.spec is not None else task

    def epsilon(self, site: str) -> float | None:
        """The epsilon the run spent on ``site``'s records; None without DP."""
        if not self.privacy.get("enabled"):
            return None
        return float(self.privacy["epsilon_per_site"][site])


def read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON file (summary.json, audit.json); missing or damaged is one AuditError line."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AuditError(f"{path} is missing: give the folder of a finished run (consortium simulate writes one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path} is not valid JSON ({exc}): the run folder is damaged") from None


def load_target(run_dir: Path) -> Target:
    """The final model of the run in ``run_dir`` and its sites' data, rebuilt from its configuration.

    The model is the run's task's (``config.task``, loaded from this machine's copy of its code), built from
    the task spec the model file records (the consortium's standardisation, its layout); the data are the
    sites' as the run read them (a built-in dataset's partition, synthetic sites, CSV files under their
    schemas: ``site_splits``)."""
    summary = read_run_json(run_dir / "summary.json")
    if summary.get("status") != "completed":
        raise AuditError(f"{run_dir} holds a {summary.get('status', 'unfinished')} run with no final model: audit a completed run")
    try:  # the model attacked is the one the transcript records, signed and co-signed
        verified = verify_run(run_dir)
    except ConsortiumError as exc:
        raise AuditError(f"{run_dir} does not verify ({exc}): audit only a run whose transcript checks out") from None
    config = load_config(run_dir / "config.yaml").resolved()
    assert config.model is not None
    try:  # the run's own task, as its config names it, built as the final model file's task spec says
        spec = run_task_spec(run_dir)
        task = load_task(config.task or spec.task, config.model)
    except ConsortiumError as exc:
        raise AuditError(f"{run_dir}: the run's task cannot be rebuilt ({exc})") from None
    splits = {name: s.in_memory() for name, s in site_splits(config).items()}  # the replays read every record
    model = build_model(task, spec, 0)
    try:
        tensors = safetensors_load((run_dir / "model.safetensors").read_bytes())
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
    except FileNotFoundError:
        raise AuditError(f"{run_dir / 'model.safetensors'} is missing: the run folder is incomplete") from None
    except (SafetensorError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise AuditError(f"{run_dir / 'model.safetensors'} does not hold this run's model ({first})") from None
    if ModelAdapter(model).layout_hash != spec.layout_hash:
        raise AuditError(
            f"{run_dir}: the task {task.name} builds a model whose layout is not the run's: audit with the task code "
            "the run trained"
        )
    return Target(run_dir, config, model, splits, summary["privacy"], verified.final_model_sha256, task, spec)


# -- scores -------------------------------------------------------------------------


def _targets(task: Task, table: Table, shape_spec: m.TaskSpec | None) -> torch.Tensor:
    """``table``'s labels as the task trains on them (a regression's standardised target)."""
    y = torch.from_numpy(table.y)
    if task.target == "classification":
        return y.long()
    assert shape_spec is not None, "a regression's targets need the run's task spec"
    return task.training_targets(y, data_shape(shape_spec))


@torch.no_grad()
def true_class_logit(model: nn.Module, table: Table) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per record, computed stably from the logits (LiRA's statistic)."""
    model.eval()
    logits = model(torch.from_numpy(table.X)).double()
    y = torch.from_numpy(table.y).long()
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
    return (own - others).numpy()


@torch.no_grad()
def record_losses(model: nn.Module, table: Table, task: Task | None = None, spec: m.TaskSpec | None = None) -> np.ndarray:
    """Each record's loss under ``model``: the task's per-example loss on its training targets (``task`` None:
    cross-entropy, the built-in classifier's)."""
    model.eval()
    task = task or load_task("classification")
    out = model(torch.from_numpy(table.X))
    return task.loss(out, _targets(task, table, spec)).double().reshape(-1).numpy()


@torch.no_grad()
def lira_statistic(model: nn.Module, table: Table, task: Task | None = None, spec: m.TaskSpec | None = None) -> np.ndarray:
    """LiRA's ``phi`` per record (see the module docstring): the logit-scaled true-class confidence for
    classification; for regression the signed residual in the target's units (``spec``: the task spec the
    model trained under, its target mean and deviation), or minus the task's loss when the model gives more
    than one output per record."""
    if task is None or task.target == "classification":
        return true_class_logit(model, table)
    assert spec is not None
    model.eval()
    out = model(torch.from_numpy(table.X))
    if out.dim() == 1 or out[0].numel() == 1:
        predicted = out.double().reshape(-1) * spec.target_scale + spec.target_mean
        return (torch.from_numpy(table.y).double().reshape(-1) - predicted).numpy()
    return -task.loss(out, _targets(task, table, spec)).double().reshape(-1).numpy()


# -- replaying the run's training -----------------------------------------------------


def shadow_spec(target: Target, tables: dict[str, Table]) -> m.TaskSpec:
    """The task spec a run on ``tables`` would have had: the run's, with the setup round's statistics (feature
    mean and deviation over the values present, a regression target's mean and deviation) of these rows."""
    assert target.spec is not None
    regression = target.run_task.target == "regression"
    sample = next(iter(tables.values()))
    total = sum(setup_vector(t.X, t.y if regression else None) for t in tables.values())
    summed = read_setup_sum(total, sample.n_features, regression)
    return target.spec.model_copy(update={
        "mean": Tensor.from_numpy(summed.mean.astype(np.float32)),
        "scale": Tensor.from_numpy(summed.scale.astype(np.float32)),
        "target_mean": summed.target_mean, "target_scale": summed.target_scale,
    })


def replay_training(target: Target, tables: dict[str, Table], seed: int) -> nn.Module:
    """Train a fresh model on ``tables`` (site -> training rows) the way the run trained its own.

    The run's task: its model (the run's layout, checked), the standardisation (and a regression target's)
    from the pooled rows as the setup round computes it, its training targets, and each round's local
    training as a site does it: the task's own ``train`` without record-level DP, DP-SGD on the task's
    per-example loss with the run's noise, clip, sampling rate and steps under it; then the run's rounds,
    cohort sampling, example weighting and server step. Secure aggregation's quantisation (below 1e-6 of
    the clip per coordinate) is left out.

    Raises:
        AuditError: the task's model built here does not have the run's layout (other task code).
    """
    config = target.config
    assert config.model is not None and config.training is not None and target.spec is not None
    task = target.run_task
    spec = shadow_spec(target, tables)
    model = build_model(task, spec, seed)
    adapter = ModelAdapter(model)
    if adapter.layout_hash != target.spec.layout_hash:
        raise AuditError(f"the replay's model ({task.name}) does not have the run's layout: audit with the run's task code")
    params = adapter.get_vector()
    strategy = make_strategy(config)
    names = list(tables)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A]))
    noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
    record_dp = bool(target.privacy.get("enabled")) and target.privacy.get("level") == "record"
    data = {n: TrainingData.of(torch.from_numpy(t.X), _targets(task, t, spec)) for n, t in tables.items()}
    for rnd in range(1, config.rounds + 1):
        updates, weights = [], []
        for name in strategy.select(rnd, names, rng):
            rows = data[name]
            if len(rows) == 0:
                continue
            adapter.set_vector(params)
            center = [p.detach().clone() for p in model.parameters()] if strategy.proximal_mu > 0 else None
            if record_dp:
                p = target.privacy
                train_dp_sgd(
                    model, rows, config.training, sampling_rate=p["sampling_rate"],
                    noise_multiplier=p["noise_multiplier"], clip=p["clip"], steps=p["steps_per_round"],
                    generator=noise, proximal_mu=strategy.proximal_mu, proximal_center=center, loss=task.loss,
                )
            else:
                task.train(
                    model, rows, config.training, seed=int(rng.integers(2**62)),
                    proximal_mu=strategy.proximal_mu, proximal_center=center,
                )
            updates.append(adapter.get_vector() - params)
            weights.append(float(len(rows)) if strategy.weighting == "examples" else 1.0)
        if updates:
            mean_update = np.average(np.stack(updates), axis=0, weights=weights).astype(np.float32)
            params = strategy.apply(rnd, params, mean_update)
    adapter.set_vector(params)
    return model


# -- the attacks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """One attack's scores for one site: higher means "member"."""

    members: np.ndarray
    nonmembers: np.ndarray


def loss_attack(target: Target) -> dict[str, Scores]:
    """Yeom et al.'s attack: minus each record's loss under the final model."""
    task = target.run_task
    return {
        site: Scores(-record_losses(target.model, s.train, task, target.spec),
                     -record_losses(target.model, s.test, task, target.spec))
        for site, s in target.splits.items()
    }


def _gaussian_logpdf(x: np.ndarray, mu: np.ndarray, var: float | np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) ** 2 / var + np.log(2 * np.pi * var))


def lira_attack(target: Target, *, shadows: int = 16, seed: int = 0) -> dict[str, Scores]:
    """Carlini et al.'s online LiRA with ``shadows`` replayed runs (an even number, at least 2)."""
    if shadows < 2 or shadows % 2:
        raise AuditError(f"LiRA needs an even number of shadow models, at least 2, got {shadows}")
    if target.privacy.get("enabled") and target.privacy.get("level") != "record":
        raise AuditError(
            "LiRA replays record-level DP-SGD only; this run used site-level DP: run the loss attack (--attacks loss)"
        )
    task = target.run_task
    pools = {site: concat_tables([s.train, s.test]) for site, s in target.splits.items()}  # members first
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11A]))
    # keep[site][j, i]: record i is in shadow j's training data; each record is in exactly half the shadows.
    keep = {
        site: np.argsort(rng.random((shadows, pool.n_rows)), axis=0) < shadows // 2 for site, pool in pools.items()
    }
    phis = {site: np.empty((shadows, pool.n_rows)) for site, pool in pools.items()}
    for j in range(shadows):
        chosen = {site: pool.take(np.flatnonzero(keep[site][j])) for site, pool in pools.items()}
        shadow = replay_training(target, chosen, seed=int(rng.integers(2**62)))
        trained_under = shadow_spec(target, chosen)  # a regression shadow's target statistics are its rows'
        for site, pool in pools.items():
            phis[site][j] = lira_statistic(shadow, pool, task, trained_under)
    # One variance for IN and one for OUT, pooled over every record of every site.
    def pooled_var(inside: bool) -> float:
        res = []
        for site in pools:
            k, p = keep[site] if inside else ~keep[site], phis[site]
            mu = (p * k).sum(0) / k.sum(0)
            res.append(((p - mu) ** 2)[k])
        return max(float(np.concatenate(res).mean()), 1e-12)

    var_in, var_out = pooled_var(True), pooled_var(False)
    out: dict[str, Scores] = {}
    for site, s in target.splits.items():
        k, p = keep[site], phis[site]
        mu_in, mu_out = (p * k).sum(0) / k.sum(0), (p * ~k).sum(0) / (~k).sum(0)
        phi = lira_statistic(target.model, pools[site], task, target.spec)
        score = _gaussian_logpdf(phi, mu_in, var_in) - _gaussian_logpdf(phi, mu_out, var_out)
        n = s.train.n_rows
        out[site] = Scores(score[:n], score[n:])
    return out


# -- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteVerdict:
    """One attack on one site's records (or on all sites' records pooled: site ``"all"``)."""

    site: str
    result: AttackResult
    epsilon: float | None  # the DP epsilon that protects these records; None without DP
    delta: float | None
    bounds: tuple[float | None, ...]  # the DP ceiling on TPR at each reported FPR

    @property
    def within_bound(self) -> bool | None:
        """False when some point proves the DP guarantee wrong (``RatePoint.contradicts``); None without DP."""
        if self.epsilon is None:
            return None
        return not any(p.contradicts(self.epsilon, self.delta or 0.0) for p in self.result.points)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "site": self.site,
            "members": r.members,
            "nonmembers": r.nonmembers,
            "auc": r.auc,
            "tpr_at_fpr": [
                {
                    "fpr": p.fpr, "tpr": p.tpr, "interval": [p.low, p.high], "fpr_reached": p.fpr_reached,
                    "fpr_high": p.fpr_high, "dp_bound": b,
                }
                for p, b in zip(r.points, self.bounds)
            ],
            "epsilon": self.epsilon,
            "within_dp_bound": self.within_bound,
        }


def verdicts(
    target: Target, scores: dict[str, Scores], *, fprs: tuple[float, ...] = (0.001, 0.01)
) -> list[SiteVerdict]:
    """Each site's attack result against its DP ceiling, then all sites' records pooled ("all")."""
    delta = float(target.privacy["delta"]) if target.privacy.get("enabled") else None

    def verdict(site: str, members: np.ndarray, nonmembers: np.ndarray, eps: float | None) -> SiteVerdict:
        result = evaluate_attack(members, nonmembers, fprs=fprs)
        bounds = tuple(None if eps is None else dp_tpr_bound(f, eps, delta or 0.0) for f in fprs)
        return SiteVerdict(site, result, eps, delta, bounds)

    out = [verdict(site, s.members, s.nonmembers, target.epsilon(site)) for site, s in scores.items()]
    epsilons = [v.epsilon for v in out]
    pooled_eps = None if None in epsilons else max(e for e in epsilons if e is not None)
    out.append(verdict(
        "all",
        np.concatenate([s.members for s in scores.values()]),
        np.concatenate([s.nonmembers for s in scores.values()]),
        pooled_eps,
    ))
    return out
