"""The coordinator's setup phase: the sites agree on one schema, and their summed moments make the task.

Pure functions over the setup replies and the phase's sum: which sites are
members, how many rows they hold together, the features' mean and scale, and
the task (with its initial model) every round then trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.errors import RoundFailed, SchemaMismatchError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.specs import ModelSpec
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.coordinator_rounds import PhaseResult
from consortium.learning.task import Task, task_identity
from consortium.protocol.task import build_model


@dataclass(frozen=True)
class SetupSums:
    """What the setup phase established: the members, their rows, and the features' mean and scale."""

    members: list[str]
    total_rows: float
    mean: np.ndarray
    scale: np.ndarray
    schema: m.SetupReply  # the first member's reply: every member declared the same schema
    target_mean: float = 0.0  # a regression target's mean and deviation over every site's training rows
    target_scale: float = 1.0


def read_setup(replies: dict[str, m.SetupReply], result: PhaseResult) -> SetupSums:
    """The setup phase's outcome, from the replies of the sites that answered and the phase's sum.

    Raises:
        RoundFailed: no site answered, the sum failed, or it has the wrong length.
        SchemaMismatchError: two sites declared different schemas (names the first difference).
    """
    if not replies:
        raise RoundFailed("no site answered setup: check that the sites are running and reachable")
    first_site, first = next(iter(replies.items()))
    for site, r in replies.items():
        if r.schema_fingerprint != first.schema_fingerprint:
            diff = sorted(set(r.feature_names) ^ set(first.feature_names)) or ["classes"]
            raise SchemaMismatchError(
                f"site '{site}' disagrees with '{first_site}' on its data schema (first difference: "
                f"'{diff[0]}'): every site must declare the same schema"
            )
    if result.total is None:
        raise RoundFailed(f"setup failed: {result.reason}")
    d = len(first.feature_names)
    regression = not first.classes
    length = c.setup_length(d, regression)
    if result.total.shape != (length,):
        raise RoundFailed(f"setup sum has {result.total.shape[0]} values where {length} were expected")
    summed = c.read_setup_sum(result.total, d, regression)
    return SetupSums(sorted(result.included), summed.rows, summed.mean, summed.scale, first,
                     summed.target_mean, summed.target_scale)


def initial_task(sums: SetupSums, model: ModelSpec, task: Task, seed: int) -> tuple[m.TaskSpec, np.ndarray]:
    """The task spec every round carries, with the layout hash of ``task``'s model, and that model's parameters."""
    first = sums.schema
    provisional = m.TaskSpec(
        task=task.name,
        task_sha256=task_identity(task)["sha256"],
        model=model,
        n_features=len(first.feature_names),
        n_classes=len(first.classes),
        classes=first.classes,
        image_shape=first.image_shape,
        target_mean=sums.target_mean,
        target_scale=sums.target_scale,
        mean=m.Tensor.from_numpy(sums.mean.astype(np.float32)),
        scale=m.Tensor.from_numpy(sums.scale.astype(np.float32)),
        layout_hash="0" * 64,
    )
    adapter = ModelAdapter(build_model(task, provisional, seed))
    return provisional.model_copy(update={"layout_hash": adapter.layout_hash}), adapter.get_vector()
