"""Consortium: train one model across institutions that never reveal their raw data.

The public Python API (the ``consortium`` command is a thin layer over it)::

    import consortium

    result = consortium.simulate("examples/simulate.yaml", rounds=5)   # every protection on by default
    result.metrics["accuracy"], result.epsilon, result.run_dir, result.model
    consortium.verify(result.run_dir)                                  # or verify(run, agreement="agreement.yaml")

Names:

- ``simulate``, ``SimulationResult``: run a consortium on this machine.
- ``verify``, ``Verified``: check a run folder, anchored in what you hold.
- ``SimulationConfig``, ``load_config``, ``parse_config``: the run's configuration.
- A study's own task: ``ClassificationTask`` and ``RegressionTask`` (subclass one: the model, the
  per-example loss, optionally the training loop; evaluation stays sums), ``Task``, ``DataShape``,
  ``load_task`` (a task by name: a built-in, ``module:Class`` or ``file.py:Class``).
- The seams a study extends: ``LocalTrainer`` (what a site does with a fit request; record-level
  rounds always run the framework's DP-SGD), ``Strategy``, ``StrategyOptions`` and
  ``register_strategy`` (a server strategy, chosen by name in the config).
- ``ConsortiumError`` and its branches ``ConfigError`` (bad input: one line with the fix),
  ``VerificationError`` (a check failed), ``ProtocolError`` (a message was refused).

Every name is loaded on first use, so ``import consortium`` stays light (no torch until a run trains).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "simulate": "consortium.api",
    "SimulationResult": "consortium.api",
    "verify": "consortium.api",
    "Verified": "consortium.audit.verify",
    "SimulationConfig": "consortium.config",
    "load_config": "consortium.config",
    "parse_config": "consortium.config",
    "Task": "consortium.learning.task",
    "DataShape": "consortium.learning.task",
    "load_task": "consortium.learning.task",
    "ClassificationTask": "consortium.learning.classification",
    "RegressionTask": "consortium.learning.regression",
    "LocalTrainer": "consortium.protocol.trainer",
    "Strategy": "consortium.learning.strategies",
    "StrategyOptions": "consortium.learning.strategies",
    "register_strategy": "consortium.learning.strategies",
    "ConsortiumError": "consortium.errors",
    "ConfigError": "consortium.errors",
    "VerificationError": "consortium.errors",
    "ProtocolError": "consortium.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from consortium.api import SimulationResult, simulate, verify
    from consortium.config import SimulationConfig, load_config, parse_config
    from consortium.errors import ConfigError, ConsortiumError, ProtocolError, VerificationError
    from consortium.learning.classification import ClassificationTask
    from consortium.learning.regression import RegressionTask
    from consortium.learning.strategies import Strategy, StrategyOptions, register_strategy
    from consortium.learning.task import DataShape, Task, load_task
    from consortium.protocol.trainer import LocalTrainer
    from consortium.audit.verify import Verified


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'consortium' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
