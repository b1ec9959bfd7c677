"""The built-in tasks: today's models (logistic, MLP, the small CNN) on the task interface.

``"classification"`` and ``"regression"`` build the architecture the config's
``model`` names (``model.kind``, ``model.hidden``) behind the consortium's
standardisation; nothing about them is private to the framework: they are
``ClassificationTask`` and ``RegressionTask`` like a study's own.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from consortium.learning.classification import ClassificationTask
from consortium.learning.models import build_model
from consortium.learning.regression import RegressionTask
from consortium.learning.specs import ModelSpec
from consortium.learning.task import DataShape, Task, register_task

T = TypeVar("T", bound=Task)


def _built_in(spec: ModelSpec, shape: DataShape, outputs: int) -> nn.Module:
    return build_model(  # seed None: the generator ``build_task_model`` seeded decides the weights
        spec, n_features=shape.n_features, n_classes=outputs, mean=shape.mean, scale=shape.scale,
        image_shape=shape.image_shape, seed=None,
    )


def _named_like(task: Task, other: T) -> T:
    other._registered_name = task.name  # type: ignore[attr-defined]
    return other


class BuiltinClassifier(ClassificationTask):
    """A built-in classifier (``model.kind``: logistic, mlp or cnn), trained with cross-entropy."""

    def __init__(self, spec: ModelSpec = ModelSpec()) -> None:
        self.spec = spec

    def model(self, shape: DataShape) -> nn.Module:
        return _built_in(self.spec, shape, shape.n_classes)

    def with_model(self, spec: ModelSpec) -> BuiltinClassifier:
        return self if spec == self.spec else _named_like(self, BuiltinClassifier(spec))


class BuiltinRegressor(RegressionTask):
    """A built-in regressor (``model.kind``: logistic means linear here, or mlp), trained on squared error."""

    def __init__(self, spec: ModelSpec = ModelSpec()) -> None:
        self.spec = spec

    def model(self, shape: DataShape) -> nn.Module:
        return _built_in(self.spec, shape, 1)

    def with_model(self, spec: ModelSpec) -> BuiltinRegressor:
        return self if spec == self.spec else _named_like(self, BuiltinRegressor(spec))


register_task("classification", BuiltinClassifier)
register_task("regression", BuiltinRegressor)
