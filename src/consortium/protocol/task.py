"""Building a task's model the same way on every side of the protocol."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from consortium.learning.models import build_model
from consortium.protocol.messages import TaskSpec

#: Builds the module a task describes; ``seed`` only matters for initial weights.
ModelBuilder = Callable[[TaskSpec, int], nn.Module]


def build_task_model(task: TaskSpec, seed: int = 0) -> nn.Module:
    """The default builder: one of the built-in architectures."""
    return build_model(
        task.model,
        n_features=task.n_features,
        n_classes=task.n_classes,
        mean=task.mean.to_numpy(),
        scale=task.scale.to_numpy(),
        image_shape=task.image_shape,
        seed=seed,
    )
