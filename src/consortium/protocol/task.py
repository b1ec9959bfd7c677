"""A task's model built the same way on every side of the protocol, from the task spec a round carries."""

from __future__ import annotations

import json

import numpy as np
from torch import nn

from consortium.learning.task import DataShape, Task, build_task_model
from consortium.protocol.messages import TaskSpec
from consortium.wire import Tensor


def data_shape(spec: TaskSpec) -> DataShape:
    """The data layout and consortium statistics a task spec carries, as a task's ``model`` reads them."""
    classes = spec.classes or tuple(str(i) for i in range(spec.n_classes))
    return DataShape(
        n_features=spec.n_features, classes=classes, image_shape=spec.image_shape,
        mean=spec.mean.to_numpy(), scale=spec.scale.to_numpy(),
        target_mean=spec.target_mean, target_scale=spec.target_scale,
    )


def build_model(task: Task, spec: TaskSpec, seed: int = 0) -> nn.Module:
    """``task``'s model for the data ``spec`` describes (a built-in task: the architecture its closed model
    spec names); ``seed`` decides its initial weights."""
    return build_task_model(task.with_model(spec.model), data_shape(spec), seed)


def spec_to_json(spec: TaskSpec) -> str:
    """A task spec as plain JSON (its statistics as lists of float32 values, exact): kept beside a model file."""
    body = spec.model_dump(mode="json", exclude={"mean", "scale"})
    body["mean"], body["scale"] = (getattr(spec, k).to_numpy().astype(np.float32).tolist() for k in ("mean", "scale"))
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def spec_from_json(text: str) -> TaskSpec:
    """The task spec ``spec_to_json`` wrote, checked by the message schema.

    Raises:
        ValueError: the text is not such a spec.
    """
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("a task spec is a JSON object")
    for k in ("mean", "scale"):
        body[k] = Tensor.from_numpy(np.asarray(body.get(k), dtype=np.float32).reshape(-1))
    return TaskSpec.model_validate(body)
