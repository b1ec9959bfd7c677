"""``consortium audit RUN_DIR``: run the red team against a finished run and keep what it found.

Each attack family reads the run folder (configuration, final model, privacy
plan) and the sites' data, and returns a JSON-able section; ``audit.json``
in the run folder gathers them, written atomically, for ``consortium report``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consortium.config import BaselineConfig, IncidentConfig
from consortium.data.datasets import concat_tables
from consortium.errors import ModelError
from consortium.privacy.dpsgd import secure_generator
from consortium.protocol.task import data_shape
from consortium.redteam.canary import (
    CanaryAuditSettings,
    epsilon_lower_bound,
    run_canary_audit,
    task_training,
    trainable_parameters,
)
from consortium.redteam.inversion import run_inversion
from consortium.redteam.membership import (
    AuditError,
    Target,
    lira_attack,
    load_target,
    loss_attack,
    verdicts,
)
from consortium.redteam.poisoning import Attack, poisoning_experiment, quiet_features
from consortium.runs import dumps, write_atomic

AUDIT_FILE = "audit.json"


@dataclass(frozen=True)
class AuditOptions:
    shadows: int = 16  # LiRA's shadow models (replayed runs)
    seed: int = 0  # the red team's own randomness (which records the shadows train on, ...)
    canaries: int = 1000  # the one-run audit's m (a tenth guessed in, a tenth out)
    batch_sizes: tuple[int, ...] = (1, 4, 8)  # the inversion's batches


def _curve(fpr: np.ndarray, tpr: np.ndarray, points: int = 400) -> dict[str, list[float]]:
    """The ROC curve thinned to about ``points`` points spread evenly on a log FPR axis (for plots)."""
    grid = np.unique(np.concatenate([[0.0], np.geomspace(1e-4, 1.0, points)]))
    idx = np.unique(np.minimum(np.searchsorted(fpr, grid, side="right") - 1, len(fpr) - 1))
    return {"fpr": [round(float(x), 6) for x in fpr[idx]], "tpr": [round(float(x), 6) for x in tpr[idx]]}


def _lira_statistic_name(target: Target) -> str:
    """What LiRA's per-record statistic is for this run's task (``membership.lira_statistic``)."""
    if target.run_task.target == "classification":
        return "true-class logit"
    sample = next(iter(target.splits.values())).train
    with torch.no_grad():
        out = target.model(torch.from_numpy(sample.X[:1]))
    return "signed residual" if out.dim() == 1 or out[0].numel() == 1 else "minus the task's loss"


def membership_section(target: Target, options: AuditOptions) -> dict[str, Any]:
    """Loss-threshold and LiRA attacks, per site and pooled, each against the run's DP ceiling."""
    # What the shadows replay: the run's task, its model of the run's layout (each shadow's is checked).
    section: dict[str, Any] = {
        "shadows": options.shadows, "task": target.run_task.name,
        "layout_hash": target.spec.layout_hash if target.spec is not None else None,
        "statistic": _lira_statistic_name(target),
    }
    runs: dict[str, Callable[[], Any]] = {
        "loss": lambda: loss_attack(target),
        "lira": lambda: lira_attack(target, shadows=options.shadows, seed=options.seed),
    }
    if target.privacy.get("enabled") and target.privacy.get("level") != "record":
        del runs["lira"]
        section["lira_skipped"] = "LiRA replays record-level DP-SGD only; this run used site-level DP"
    for name, attack in runs.items():
        started = time.perf_counter()
        found = verdicts(target, attack())
        pooled = found[-1].result
        section[name] = {
            "sites": [v.to_json() for v in found],
            "roc": _curve(pooled.fpr, pooled.tpr),
            "seconds": round(time.perf_counter() - started, 2),
        }
    return section


def _record_noise(target: Target) -> tuple[float, float] | None:
    """(noise multiplier, clip) of the run's DP-SGD; None without record-level DP."""
    p = target.privacy
    if p.get("enabled") and p.get("level") == "record":
        return float(p["noise_multiplier"]), float(p["clip"])
    return None


def inversion_section(target: Target, options: AuditOptions) -> dict[str, Any]:
    """Gradient inversion of one round's update at each batch size, as four observers would see it.

    ``one site``: a coordinator without secure aggregation, reading one site's
    update. ``secure sum of 5, B guesses``: the same attack on the mean of 5
    sites' updates, aiming at one site's batch. ``secure sum of 5, 5B
    guesses``: aiming at every record behind the sum instead (secure
    aggregation hides who holds a record, not the records of a small sum).
    ``one site, run's DP``: one site's update under the run's DP-SGD noise.

    The model is the run's task's, built from the run's task spec (its layout, the consortium's
    standardisation), trained and matched with the task's loss; a regression's labels are not recovered
    (there are none), its targets are optimised with the inputs.
    """
    assert target.spec is not None
    table, noise = concat_tables([s.train for s in target.splits.values()]), _record_noise(target)
    task, shape = target.run_task, data_shape(target.spec)
    rows = []
    for batch in options.batch_sizes:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("one site", {"sites": 1}),
            ("secure sum of 5, B guesses", {"sites": 5}),
            ("secure sum of 5, 5B guesses", {"sites": 5, "reconstruct": 5 * batch}),
        ]
        if noise is not None:
            cases.append(("one site, run's DP", {"sites": 1, "noise_multiplier": noise[0], "clip": noise[1]}))
        for observer, kwargs in cases:
            try:
                r = run_inversion(table, task, shape=shape, batch_size=batch, seed=options.seed, **kwargs)
            except ModelError as exc:  # e.g. label recovery on a study's model with no final linear bias
                return {"task": task.name, "skipped": f"the attack cannot read this task's model: {exc}"}
            rows.append({
                "observer": observer, "batch_size": batch, "metric": r.metric, "quality": r.mean_quality,
                "baseline": r.baseline, "random_baseline": r.random_baseline, "gain": r.gain,
                "labels_exact": r.labels_exact, "seconds": round(r.seconds, 2),
            })
    out: dict[str, Any] = {
        "task": task.name,
        "metric": rows[0]["metric"],
        "note": "one local SGD step from the initial model: the attacker's best case",
        "rows": rows,
    }
    if task.target == "regression":
        out["labels_skipped"] = "a regression has no labels to recover: its targets were optimised with the inputs"
    return out


def canary_section(target: Target, options: AuditOptions) -> dict[str, Any]:
    """Steinke et al.'s one-run audit of the run's DP-SGD (its noise, clip, sampling rate, step count and
    optimiser) on what the run trained: its sites' pooled training rows (a built-in dataset, synthetic sites,
    CSV files: any data) and its task's model and per-example loss, with the deliberately broken mechanism
    (noise divided by 10) beside it as the audit's own control.

    The canaries are gradient canaries (one coordinate each), so they need no label and the audit applies to
    a regression as to a classification. A model with fewer trainable parameters than ``options.canaries``
    gets one canary per parameter (a weaker audit, still valid: the statistics hold for any m)."""
    noise = _record_noise(target)
    if noise is None:
        return {"skipped": "the run has no record-level DP-SGD to audit"}
    assert target.spec is not None and target.config.training is not None
    table = concat_tables([s.train for s in target.splits.values()])
    training = task_training(target.run_task, target.spec, table, source=f"{target.run_task.name} on {target.config.data.dataset}")
    coordinates = trainable_parameters(training.model(0))
    m = min(options.canaries, coordinates)
    if m < 10:
        return {"skipped": f"the task's model has {coordinates} trainable parameters: too few coordinates for canaries"}
    p = target.privacy
    base = CanaryAuditSettings(
        dataset=target.config.data.dataset, train=target.config.training,
        canaries=m, guess_in=m // 10, guess_out=m // 10,
        sampling_rate=float(p["sampling_rate"]), noise_multiplier=noise[0], clip=noise[1],
        steps=int(p["steps_per_round"]) * target.config.rounds, delta=float(p["delta"]),
    )
    out: dict[str, Any] = {"task": target.run_task.name, "data": target.config.data.dataset, "rows": table.n_rows}
    for name, divisor in (("as_run", 1.0), ("noise_divided_by_10", 10.0)):
        settings = dataclasses.replace(base, noise_divisor=divisor)
        r = run_canary_audit(settings, generator=secure_generator(options.seed), training=training)
        out[name] = {
            "canaries": r.canaries, "guesses": r.guesses, "correct": r.correct, "lower_bound": r.lower_bound,
            "accounted_epsilon": r.accounted_epsilon, "delta": r.delta, "caught": r.caught,
        }
    # The most this many guesses could ever show: all correct.
    out["reach"] = epsilon_lower_bound(base.canaries, base.guess_in + base.guess_out,
                                       base.guess_in + base.guess_out, base.delta)
    return out


def poisoning_section(target: Target, options: AuditOptions) -> dict[str, Any]:
    """The run's configuration replayed with its last site malicious from round 2: scaling its update by
    100, flipping its sign, or planting a backdoor; each clean, attacked, with the norm monitor, and under
    each defence the configuration can take (a defence whose tolerance condition fails shows as refused).

    The comparison runs turn the norm monitor off, so that accuracy, not a halt, shows what an attack did;
    one run per attack keeps it on to show that it halts.

    A regression run is skipped, with the reason: the experiment scores accuracy and a backdoor's target class.
    """
    if target.run_task.target != "classification":
        return {"skipped": "the poisoning experiment scores accuracy and a backdoor's target class: a regression has neither"}
    config = target.config.model_copy(update={
        "incidents": IncidentConfig(update_norm_factor=None),
        "baselines": BaselineConfig(local_only=False, pooled=False),
    })
    attacker = (list(target.splits)[-1],)
    attacks = {
        "scale x100": Attack("scale", attacker, factor=100.0, start_round=2),
        "sign flip x10": Attack("sign_flip", attacker, factor=10.0, start_round=2),
        # The trigger on the attacker's quietest features: not ones the clean model already reads as the target.
        "backdoor": Attack("backdoor", attacker, factor=5.0, start_round=2,
                           trigger_features=quiet_features(target.splits[attacker[0]].train, 0)),
    }
    out: dict[str, Any] = {"attacker": attacker[0], "attacks": {}}
    with tempfile.TemporaryDirectory(prefix="consortium-poisoning-") as scratch:
        for i, (name, attack) in enumerate(attacks.items()):
            runs = poisoning_experiment(config, attack, out=Path(scratch) / str(i))
            out["attacks"][name] = [
                {
                    "label": r.label, "defence": r.defence, "secure_aggregation": r.secure_aggregation,
                    "status": r.status, "accuracy": r.accuracy, "worst_accuracy": r.worst_accuracy,
                    "backdoor_success": r.backdoor_success, "detail": r.detail,
                }
                for r in runs
            ]
    return out


#: Attack families by the name ``--attacks`` takes.
SECTIONS: dict[str, Callable[[Target, AuditOptions], dict[str, Any]]] = {
    "mia": membership_section,
    "inversion": inversion_section,
    "canary": canary_section,
    "poisoning": poisoning_section,
}


def parse_attacks(spec: str) -> list[str]:
    """``"mia,canary"`` -> ["mia", "canary"]; an unknown name is an error naming the known ones."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise AuditError(
            f"unknown attack {', '.join(repr(n) for n in unknown) or '(none given)'}: choose from {', '.join(SECTIONS)}"
        )
    return list(dict.fromkeys(names))


def run_audit(run_dir: Path, attacks: list[str], options: AuditOptions = AuditOptions()) -> dict[str, Any]:
    """Run ``attacks`` against the run in ``run_dir``; writes and returns ``audit.json``'s content."""
    target = load_target(run_dir)
    audit: dict[str, Any] = {
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": options.seed,
        "model_sha256": target.model_sha256,  # what was attacked: the verified transcript's final model
        "task": {"name": target.run_task.name, "target": target.run_task.target},
        "privacy": {
            "enabled": bool(target.privacy.get("enabled")),
            "level": target.privacy.get("level"),
            "epsilon_per_site": target.privacy.get("epsilon_per_site"),
            "delta": target.privacy.get("delta"),
        },
        "attacks": {},
    }
    previous = run_dir / AUDIT_FILE
    if previous.exists():  # attacks run one at a time accumulate; a rerun replaces its own section
        try:
            audit["attacks"] = json.loads(previous.read_text()).get("attacks", {})
        except ValueError:
            pass  # a damaged file is replaced whole
    for name in attacks:
        audit["attacks"][name] = SECTIONS[name](target, options)
    write_atomic(previous, dumps(audit).encode())
    return audit
