"""Classification as a task: cross-entropy, and an evaluation a site releases only as sums.

The vector a site releases (its parts in order, ``EVAL_PARTS``)::

    [n, correct, loss sum, negatives per score bin, positives per score bin,
     calibration (records, confidence sum, correct per confidence bin),
     per group of the sensitive attribute (GROUP_FIELDS), the site's
     [1, accuracy, accuracy^2] (so the spread across sites is a sum),
     and [n, correct] under the declared shift, then the records per class];
    zeros where not measured

Accuracy, mean loss, ROC AUC (binary), expected calibration error, the
spread across sites, fairness gaps and accuracy under shift all follow from
the sum (``EvalStats.metrics``), exactly as from the pooled predictions
(AUC to within its bins).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from consortium.learning.task import DataShape, EvalOptions, Evaluation, Task
from consortium.learning.training import AUC_BINS, CAL_BINS, GROUP_FIELDS, EvalStats, evaluate

#: The evaluation vector's parts, in order, and their lengths.
EVAL_PARTS = {
    "counts": 3, "score_hist": 2 * AUC_BINS, "calibration": 3 * CAL_BINS, "groups": 2 * len(GROUP_FIELDS),
    "sites": 3, "shift": 2,
}
EVAL_LENGTH = sum(EVAL_PARTS.values())  # then one count per class


def eval_length(n_classes: int) -> int:
    """The length of a classification's evaluation vector over ``n_classes`` classes."""
    return EVAL_LENGTH + n_classes


def eval_vector(stats: EvalStats) -> np.ndarray:
    """One site's evaluation as the vector that is summed (see the module docstring)."""
    site = [1.0, stats.correct / stats.n, (stats.correct / stats.n) ** 2] if stats.n else [0.0, 0.0, 0.0]
    parts = {
        "counts": [stats.n, stats.correct, stats.loss_sum],
        "score_hist": stats.score_hist,
        "calibration": stats.calibration,
        "groups": stats.groups,
        "sites": site,
        "shift": stats.shift,
    }
    return np.concatenate([
        *(np.zeros(size) if parts[name] is None else np.asarray(parts[name], dtype=np.float64).ravel()
          for name, size in EVAL_PARTS.items()),
        np.zeros(0) if stats.labels is None else np.asarray(stats.labels, dtype=np.float64),
    ])


def read_eval_sum(total: np.ndarray, n_classes: int, *, groups: bool = False, shift: bool = False) -> EvalStats:
    """The summed evaluation; ``groups`` / ``shift``: whether the round asked for them."""
    offsets = np.cumsum([0, *EVAL_PARTS.values()])
    part = {name: total[offsets[i] : offsets[i + 1]] for i, name in enumerate(EVAL_PARTS)}
    counts = np.rint(part["counts"]).astype(np.int64)
    return EvalStats(
        int(counts[0]),
        int(counts[1]),
        float(part["counts"][2]),
        np.rint(part["score_hist"]).astype(np.int64).reshape(2, AUC_BINS) if n_classes == 2 else None,
        part["calibration"].reshape(3, CAL_BINS),
        np.rint(part["groups"]).reshape(2, len(GROUP_FIELDS)) if groups else None,
        part["sites"].copy(),
        np.rint(part["shift"]) if shift else None,
        np.rint(total[offsets[-1] : offsets[-1] + n_classes]) if total.shape[0] >= offsets[-1] + n_classes else None,
    )


class ClassificationTask(Task):
    """Binary or multiclass classification: subclass it and define ``model``; its outputs are the logits.

    The loss is cross-entropy (override ``loss`` for class weights or label smoothing, keeping
    ``reduction="none"``); the metrics are accuracy, loss, AUC (binary), calibration, the spread across
    sites, and the fairness gaps and accuracy under shift when the run declares them. The ``loss`` metric is
    the log-loss whatever the training loss, so that runs compare with each other and with the constant
    predictor on one scale.
    """

    target = "classification"
    headline = "accuracy"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def evaluate(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, shape: DataShape, options: EvalOptions) -> np.ndarray:
        stats = evaluate(model, X, y, shape.n_classes, groups=options.groups, shifted=options.shifted)
        return eval_vector(stats)

    def statistics_length(self, shape: DataShape) -> int:
        return eval_length(shape.n_classes)

    def no_better_than_constant(self, metrics: dict[str, float]) -> str | None:
        majority, constant = metrics.get("majority_accuracy"), metrics.get("constant_loss")
        accuracy, loss = metrics.get("accuracy"), metrics.get("loss")
        if majority is None or constant is None or accuracy is None or loss is None:
            return None
        if accuracy > majority + 1e-9 and loss < constant:
            return None
        return (
            f"the model is no better than predicting the majority class: accuracy {accuracy:.3f} against the "
            f"majority class's {majority:.3f}, log-loss {loss:.3f} against a constant prediction's {constant:.3f}; "
            "train longer, raise the learning rate or lower the noise (a larger epsilon, more records per site)"
        )

    def summarise(self, total: np.ndarray, shape: DataShape, *, groups: bool = False, shift: bool = False) -> Evaluation:
        stats = read_eval_sum(total, shape.n_classes, groups=groups, shift=shift)
        details: dict[str, object] = {"reliability": stats.reliability()}
        if stats.groups is not None:
            details["groups"] = stats.groups.tolist()
        return Evaluation(stats.metrics(), details)
