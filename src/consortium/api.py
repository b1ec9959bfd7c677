"""The Python API a data scientist uses from a notebook: ``consortium.simulate`` and ``consortium.verify``.

The command line is a thin layer over the same objects: ``consortium simulate
CONFIG`` is ``simulate(CONFIG)``, ``consortium verify RUN --agreement FILE``
is ``verify(RUN, agreement=FILE)``.

    import consortium

    result = consortium.simulate("examples/simulate.yaml", rounds=5)
    print(result.metrics["accuracy"], result.epsilon)

    class Chest(consortium.ClassificationTask):        # a study's own model and loss
        def model(self, shape): ...
    consortium.simulate("study.yaml", task=Chest())
    consortium.verify(result.run_dir)          # raises VerificationError on any violation
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from consortium.config import SimulationConfig, load_config
from consortium.errors import ConfigError

if TYPE_CHECKING:  # torch stays unloaded until a run needs it
    import torch

    from consortium.protocol.coordinator import RoundRecord
    from consortium.learning.task import Task
    from consortium.protocol.trainer import LocalTrainer
    from consortium.audit.verify import Verified


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated run produced.

    Attributes:
        run_dir: the run folder (transcript, heads, model file, summary, each site's ledger).
        metrics: the federated model's final metrics as plain floats (accuracy, loss, AUC, ECE, ...;
            ``None`` where a metric was not finite), measured through the sites' secure sums.
        epsilon: each site's epsilon, at most: the events it signed, with any round it was asked
            to join whose answer was lost (empty when differential privacy was off).
        summary: the whole ``summary.json`` object.
        history: one record per round (who was asked, who answered, the round's metrics).
        params: the final model as one flat float vector, in the layout of ``model``.
        model: the final model as a ``torch.nn.Module`` (the task's model, holding ``params``).
    """

    run_dir: Path
    metrics: dict[str, float | None]
    epsilon: dict[str, float]
    summary: dict[str, Any]
    history: list[RoundRecord] = field(repr=False)
    params: np.ndarray = field(repr=False)
    model: torch.nn.Module = field(repr=False)

    def verify(self, **anchors: Path) -> Verified:
        """``verify(self.run_dir, **anchors)``: see ``consortium.verify``."""
        return verify(self.run_dir, **anchors)


def _config(config: SimulationConfig | str | Path | Mapping[str, Any] | None, overrides: dict[str, Any]) -> SimulationConfig:
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, SimulationConfig):
        base = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    elif isinstance(config, (str, Path)):
        base = load_config(config).model_dump(mode="json", by_alias=True, exclude_unset=True)
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"config is a {type(config).__name__}: pass a SimulationConfig, a YAML path or a mapping")
    try:
        return SimulationConfig.model_validate({**base, **overrides})
    except ValidationError as exc:  # the first problem, in one line, as a config file's would be
        err = exc.errors()[0]
        found = "" if isinstance(err.get("input"), (dict, list)) else f" (found {err['input']!r})"
        where = ".".join(str(part) for part in err["loc"]) or "config"
        raise ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}{found}: fix that value") from None


def simulate(
    config: SimulationConfig | str | Path | Mapping[str, Any] | Task | None = None,
    *,
    task: Task | str | None = None,
    out: str | Path | None = None,
    runs_root: str | Path = "runs",
    on_round: Callable[[RoundRecord], None] | None = None,
    trainer: LocalTrainer | None = None,
    **overrides: Any,
) -> SimulationResult:
    """Simulate a consortium on this machine, with every protection the config asks for (all by default).

    Args:
        config: a ``SimulationConfig``, the path of a YAML config (``examples/simulate.yaml``
            documents every key), a mapping of the same keys, or ``None`` for the defaults; or the
            task itself (``simulate(MyTask(), data=...)``: the defaults and the overrides).
        task: the study's task: a ``Task`` (a subclass of ``ClassificationTask`` or ``RegressionTask``:
            its model, loss, training step and evaluation), or its name as a config gives it
            (``"regression"``, ``"my_study.tasks:Chest"``, ``"path/to/tasks.py:Chest"``); default: the
            config's ``task``, else the built-in task for the data's labels.
        out: the run folder (default: a new one under ``runs_root``).
        runs_root: where new run folders go.
        on_round: called with each round's record as it ends (progress bars, early looks).
        trainer: every site's local training (a ``LocalTrainer``) for rounds without record-level
            DP; record-level rounds always run the framework's DP-SGD on the task's loss (default: the
            task's own ``train``).
        **overrides: top-level config keys that replace the config's (``rounds=5``,
            ``privacy={"epsilon": 3}``); a nested mapping replaces that whole section.

    Returns:
        A ``SimulationResult``; the run also verified itself (``summary["transcript"]["verified"]``).

    Raises:
        ConfigError: a bad config, data, task or agreement, in one line naming the problem and the fix
            (a model that mixes the examples of a batch, such as BatchNorm, under record-level DP).
        ConsortiumError: anything else the run refuses (the base of every Consortium error).
    """
    from consortium.learning.adapter import ModelAdapter
    from consortium.protocol.task import build_model
    from consortium.run.simulation import Simulation

    from consortium.learning.task import Task

    if isinstance(config, Task):
        if task is not None:
            raise ConfigError("simulate was given two tasks: pass the task either first or as task=, not both")
        config, task = None, config
    if isinstance(task, str):
        overrides = {**overrides, "task": task}
        task = None
    sim = Simulation(
        _config(config, overrides), out=None if out is None else Path(out), runs_root=Path(runs_root),
        task=task, trainer=trainer,
    )
    run = sim.run(on_round=on_round)
    assert sim.coordinator.task is not None
    model = build_model(sim.plan.task, sim.coordinator.task, 0)
    ModelAdapter(model).set_vector(run.params)
    privacy = run.summary.get("privacy") or {}
    return SimulationResult(
        run_dir=Path(run.summary["run_dir"]),
        metrics={
            k: None if v is None else float(v)
            for k, v in run.summary["federated"].items() if k not in ("rounds_completed", "rounds_skipped")
        },
        epsilon=dict(privacy.get("epsilon_bound_per_site") or privacy.get("epsilon_per_site") or {}),
        summary=run.summary, history=run.history, params=run.params, model=model,
    )


def verify(
    run_dir: str | Path, *, agreement: str | Path | None = None, kit: str | Path | None = None, state: str | Path | None = None,
) -> Verified:
    """Check a run folder, anchored in what you hold; ``consortium verify`` on the command line.

    Args:
        run_dir: the run folder.
        agreement: the signed agreement you hold: the run must name its hash, and every member's key
            in the transcript must be the one it names.
        kit: your member kit (its agreement, keys, CA; a site's kit also brings its own record).
        state: a site's state folder: its own record of the heads it co-signed.

    Returns:
        The ``Verified`` report: entries, heads, rounds, each site's epsilon, the final model's hash,
        ``anchored_by`` (what each anchor proved; empty means consistency only: whoever can write the
        folder could have re-signed it with fresh keys).

    Raises:
        VerificationError: the first violation, in one line naming the entry and what differs.
        ConfigError: a missing run folder, or an anchor that is incomplete or not approved.
    """
    from consortium.audit.anchor import agreement_anchor, kit_anchor, state_anchor
    from consortium.audit.verify import verify_run

    anchors = [
        *([agreement_anchor(Path(agreement))] if agreement is not None else []),
        *([kit_anchor(Path(kit))] if kit is not None else []),
        *([state_anchor(Path(state))] if state is not None else []),
    ]
    return verify_run(Path(run_dir), anchors=anchors)
