"""Poisoning: malicious sites for the red team, and the experiment that measures the defences.

A malicious site runs the honest protocol (it is sealed, signed, checked and
aggregated like any other) but sends a poisoned model update:

- ``sign_flip``: the update it trained, negated (times ``factor``), to push the model uphill;
- ``scale``: the update times ``factor`` (100 drowns four honest sites' updates in a FedAvg mean);
- ``backdoor``: it trains on its data with a share of rows stamped with a trigger (chosen features
  set far outside their range) and relabelled to a target class, and boosts its update by
  ``factor`` (model replacement, Bagdasaryan et al., AISTATS 2020). Its success is the share of
  triggered test inputs (of other classes) that the final model assigns to the target class.

Where the change is made matters. By default it is made to the update the site trained, and the
site's runtime then treats it as its own (so the round's norm bound still applies): a poisoned
pipeline or data, with the consortium's software intact. With ``rewrites_runtime`` it is made to
what leaves the site, after the runtime's bounding, as a site that rewrote its software would; then
only the coordinator can bound it, which it does when it sees the update (secure aggregation off).

``poisoning_experiment`` runs one config clean, attacked with no defence, attacked with the norm
monitor on, and attacked under each defence, and returns one frozen ``PoisoningRun`` per run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from consortium.config import SimulationConfig
from consortium.data import Splits, Table
from consortium.errors import ConfigError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.robust import min_updates
from consortium.learning.training import evaluate
from consortium.run.orchestrator import RunResult
from consortium.protocol import messages as m
from consortium.protocol.site import Site
from consortium.protocol.task import build_model
from consortium.run.simulation import Simulation

AttackKind = Literal["sign_flip", "scale", "backdoor"]


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger: ``features`` set to ``values`` (raw units); triggered rows belong to ``target``."""

    features: tuple[int, ...]
    values: tuple[float, ...]
    target: int

    def apply(self, X: np.ndarray) -> np.ndarray:
        out = np.array(X, dtype=np.float32, copy=True)
        out[:, list(self.features)] = np.asarray(self.values, dtype=np.float32)
        return out

    @classmethod
    def outside(cls, X: np.ndarray, features: tuple[int, ...], shift: float, target: int) -> Trigger:
        """Each feature set ``shift`` standard deviations above its mean in ``X`` (the attacker's own data)."""
        cols = X[:, list(features)].astype(np.float64)
        values = cols.mean(axis=0) + shift * np.maximum(cols.std(axis=0), 1e-6)
        return cls(features, tuple(float(v) for v in values), target)


@dataclass(frozen=True)
class Attack:
    """Which sites poison their updates, how, and from which round on."""

    kind: AttackKind
    sites: tuple[str, ...]
    factor: float = 1.0  # scale: the multiplier; sign_flip: the update times -factor; backdoor: the boost
    start_round: int = 1
    rewrites_runtime: bool = False  # poison what leaves the site, after its runtime's norm bound
    # backdoor only:
    poison_fraction: float = 0.5  # share of the attacker's training rows stamped with the trigger
    target: int = 0  # the class triggered inputs should get
    trigger_features: tuple[int, ...] = (0, 1, 2)
    trigger_shift: float = 6.0  # trigger values, in the attacker's standard deviations above its means

    def __post_init__(self) -> None:
        if not self.sites:
            raise ConfigError("an attack needs at least one malicious site")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ConfigError(f"the attack factor must be a positive number, found {self.factor}")
        if not 0 < self.poison_fraction <= 1:
            raise ConfigError(f"poison_fraction must be in (0, 1], found {self.poison_fraction}")
        if self.start_round < 1 or not self.trigger_features:
            raise ConfigError("start_round must be at least 1, and a trigger needs at least one feature")

    def poison(self, update: np.ndarray) -> np.ndarray:
        """The update the attacker sends in place of ``update``."""
        sign = -1.0 if self.kind == "sign_flip" else 1.0
        return (update.astype(np.float64) * (sign * self.factor)).astype(update.dtype)


class MaliciousSite(Site):
    """A site whose fit updates are poisoned by ``attack`` from its start round on; otherwise honest."""

    def __init__(self, name: str, data: Splits, *, attack: Attack, **kwargs: Any) -> None:
        super().__init__(name, data, **kwargs)
        self.attack = attack

    def _local_update(
        self, rnd: int, msg: m.FitRequest, module: torch.nn.Module, adapter: ModelAdapter, global_params: np.ndarray
    ) -> tuple[np.ndarray, float]:
        delta, loss = super()._local_update(rnd, msg, module, adapter, global_params)
        if rnd >= self.attack.start_round and not self.attack.rewrites_runtime:
            delta = self.attack.poison(delta)
        return delta, loss

    def _contribute(self, rnd: int, phase: str, vector: np.ndarray, secure: bool) -> m.Tensor | None:
        if phase == "fit" and rnd >= self.attack.start_round and self.attack.rewrites_runtime:
            assert self._model is not None
            n = self._model[2].size  # the update's coordinates lead every fit layout
            vector = vector.copy()
            vector[:n] = self.attack.poison(vector[:n])
        return super()._contribute(rnd, phase, vector, secure)


def _stamp(table: Table, trigger: Trigger, fraction: float, rng: np.random.Generator) -> Table:
    """``table`` with a ``fraction`` of its rows carrying the trigger and relabelled to its target."""
    n = table.X.shape[0]
    rows = rng.choice(n, size=max(1, round(fraction * n)), replace=False)
    X, y = table.X.copy(), table.y.copy()
    X[rows] = trigger.apply(X[rows])
    y[rows] = trigger.target
    return dataclasses.replace(table, X=np.ascontiguousarray(X), y=y)


class AttackedSimulation(Simulation):
    """A simulation in which ``attack.sites`` are malicious; everything else is the real protocol."""

    def __init__(self, config: SimulationConfig, attack: Attack, **kwargs: Any) -> None:
        self.attack = attack
        self.trigger: Trigger | None = None
        self._seed = config.seed  # the sites are made while the run is built: before it holds its config
        super().__init__(config, **kwargs)
        unknown = sorted(set(attack.sites) - set(self.names))
        if unknown:
            raise ConfigError(f"the attack names '{unknown[0]}', which is not a site of this run: use one of {self.names}")

    def _make_site(self, name: str, splits: Splits, **kwargs: Any) -> Site:
        attack = self.attack
        if name not in attack.sites:
            return super()._make_site(name, splits, **kwargs)
        splits = splits.in_memory()  # the attacker rewrites its own records
        if attack.kind == "backdoor":
            if not 0 <= attack.target < len(splits.train.classes):
                raise ConfigError(f"the backdoor's target class {attack.target} is not one of the task's classes")
            if max(attack.trigger_features) >= splits.train.X.shape[1]:
                raise ConfigError(f"the trigger names feature {max(attack.trigger_features)}; the data has {splits.train.X.shape[1]}")
            if self.trigger is None:  # one trigger for every attacker, from the first one's own data
                self.trigger = attack_trigger(attack, splits)
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, 0xBAD, *name.encode()]))
            splits = dataclasses.replace(splits, train=_stamp(splits.train, self.trigger, attack.poison_fraction, rng))
        return MaliciousSite(name, splits, attack=attack, **kwargs)



def quiet_features(table: Table, target: int, k: int = 3) -> tuple[int, ...]:
    """The ``k`` features least correlated with "the label is ``target``" in ``table`` (an attacker's own
    data): a trigger there is not something the clean model already reads as the target class. A constant
    feature (a blank pixel) counts as uncorrelated."""
    X = table.X.astype(np.float64)
    is_target = (table.y == target).astype(np.float64)
    Xc, yc = X - X.mean(axis=0), is_target - is_target.mean()
    denom = np.sqrt((Xc * Xc).sum(axis=0) * (yc * yc).sum())
    corr = np.abs(np.divide(Xc.T @ yc, denom, out=np.zeros(X.shape[1]), where=denom > 0))
    return tuple(int(j) for j in np.argsort(corr, kind="stable")[:k])


def attack_trigger(attack: Attack, splits: Splits) -> Trigger:
    """The backdoor's trigger, from the (first) attacker's own, unpoisoned training split."""
    return Trigger.outside(splits.train.X, attack.trigger_features, attack.trigger_shift, attack.target)


def backdoor_success(sim: Simulation, params: np.ndarray, trigger: Trigger) -> float | None:
    """The share of triggered test inputs (every site's test split, true class not the target) that the
    model ``params`` of run ``sim`` assigns to the target class (attack success rate)."""
    task = sim.coordinator.task
    if task is None:
        return None
    tests = [sim._splits[n].test.to_table() for n in sim.names]
    X, y = np.concatenate([t.X for t in tests]), np.concatenate([t.y for t in tests])
    X = trigger.apply(X[y != trigger.target])
    if X.shape[0] == 0:
        return None
    model = build_model(sim.plan.task, task, 0)
    ModelAdapter(model).set_vector(params)
    target = torch.full((X.shape[0],), trigger.target, dtype=torch.int64)
    with torch.no_grad():
        stats = evaluate(model, torch.from_numpy(X), target, task.n_classes)
    return stats.correct / stats.n


@dataclass(frozen=True)
class PoisoningRun:
    """One run of a poisoning experiment: what was attacked and defended, and how the model came out."""

    label: str  # clean | attacked | attacked, norm monitor on | attacked + <defence>
    attacked: bool
    defence: str  # none | norm_bound | median | trimmed_mean | krum | multi_krum | norm_monitor
    secure_aggregation: bool
    status: Literal["completed", "halted", "refused"]
    accuracy: float | None  # the last evaluated model's federated accuracy (None when refused, or nothing was evaluated)
    backdoor_success: float | None  # backdoor attacks: the final model's attack success rate (clean run too)
    detail: str = ""  # a halt's incident, or the refusal's message
    #: The lowest accuracy from the attack's start round on (the clean run: over the same rounds). A model
    #: pushed around by outsized updates swings: its last round alone can hide how low it went.
    worst_accuracy: float | None = None
    accuracy_per_round: tuple[float | None, ...] = ()


def _config(raw: dict[str, Any], label: str) -> SimulationConfig:
    try:
        return SimulationConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "config"
        raise ConfigError(f"{label}: {where}: {err['msg'].removeprefix('Value error, ')}") from None


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, Mapping) else value
    return out


def default_defences(config: SimulationConfig, attack: Attack, norm_bound: float) -> dict[str, dict[str, Any]]:
    """Norm bounding (under secure aggregation when the config has it), and the aggregators that need the
    updates in the clear, each tolerating as many Byzantine sites as the attack has, in rounds of at least
    as many sites as its tolerance condition needs."""
    f = len(attack.sites)
    out: dict[str, dict[str, Any]] = {"norm_bound": {"robust": {"aggregator": "mean", "norm_bound": norm_bound}}}
    for name in ("median", "trimmed_mean", "krum", "multi_krum"):
        out[name] = {
            "robust": {"aggregator": name, "byzantine": f, "norm_bound": None},
            "secure_aggregation": {"enabled": False},
            "participation": {"min_sites": max(config.participation.min_sites, min_updates(name, f))},  # type: ignore[arg-type]
        }
    return out


def poisoning_experiment(
    config: SimulationConfig,
    attack: Attack,
    *,
    out: Path,
    defences: Mapping[str, Mapping[str, Any]] | None = None,
    norm_bound: float = 1.0,
    monitor_factor: float | None = 10.0,
) -> tuple[PoisoningRun, ...]:
    """Run ``config`` clean, attacked, attacked with the norm monitor at ``monitor_factor`` (unless None),
    and attacked under each of ``defences`` (name -> config overrides; default: ``default_defences``).

    Clean, attacked and defended runs keep ``config``'s incident settings: to compare accuracies, turn the
    norm monitor off there (``incidents.update_norm_factor: null``), or the attacked run may halt instead.
    A defence whose config is refused (its tolerance condition fails) is reported as refused, not run.
    """
    base = config.model_dump(mode="json", by_alias=True)
    plan: list[tuple[str, bool, str, Mapping[str, Any]]] = [("clean", False, "none", {}), ("attacked", True, "none", {})]
    if monitor_factor is not None:
        plan.append(("attacked, norm monitor on", True, "norm_monitor", {"incidents": {"update_norm_factor": monitor_factor}}))
    chosen = default_defences(config, attack, norm_bound) if defences is None else defences
    plan += [(f"attacked + {name}", True, name, overrides) for name, overrides in chosen.items()]
    runs = []
    for i, (label, attacked, defence, overrides) in enumerate(plan):
        raw = _merge(base, overrides)
        secure = bool(raw.get("secure_aggregation", {}).get("enabled", True))
        try:
            cfg = _config(raw, label)
            sim = AttackedSimulation(cfg, attack, out=out / f"run-{i}") if attacked else Simulation(cfg, out=out / f"run-{i}")
        except ConfigError as exc:
            runs.append(PoisoningRun(label, attacked, defence, secure, "refused", None, None, str(exc)))
            continue
        if attack.sites[0] not in sim._splits:
            raise ConfigError(f"the attack names '{attack.sites[0]}', which is not a site of this run: use one of {sim.names}")
        trigger = attack_trigger(attack, sim._splits[attack.sites[0]]) if attack.kind == "backdoor" else None
        result: RunResult = sim.run()
        summary = result.summary
        halt = summary.get("halt")
        # The last evaluated model's accuracy: a halted run keeps the model from before the halted round.
        per_round = tuple(
            float(a) if math.isfinite(a := r.metrics.get("accuracy", math.nan)) else None for r in result.history
        )
        evaluated = [a for a in per_round if a is not None]
        accuracy = evaluated[-1] if evaluated else None
        since = [a for r, a in zip(result.history, per_round) if a is not None and r.round >= attack.start_round]
        runs.append(PoisoningRun(
            label=label,
            attacked=attacked,
            defence=defence,
            secure_aggregation=secure,
            status=summary["status"],
            accuracy=accuracy,
            backdoor_success=backdoor_success(sim, result.params, trigger) if trigger is not None else None,
            detail="" if halt is None else f"{halt['cause']} in round {halt['round']}: {halt['detail']}",
            worst_accuracy=min(since) if since else None,
            accuracy_per_round=per_round,
        ))
    return tuple(runs)
