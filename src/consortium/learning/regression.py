"""Regression's evaluation as sums: what a site measures, and the metrics of the summed vector.

A site evaluates on its own records and releases only a fixed-length vector
of sums; the sites' vectors add up (under secure aggregation, only their sum
is ever decoded) to the pooled population's, from which the metrics follow
exactly, as if every prediction had been pooled:

    MSE = sum (y - yhat)^2 / n        MAE = sum |y - yhat| / n
    R^2 = 1 - sum (y - yhat)^2 / (sum y^2 - (sum y)^2 / n)

and the mean predictor's MSE (the yardstick a useless model does no better
than) is the pooled variance of y, from the same sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from consortium.learning.task import DataShape, EvalOptions, Evaluation, Task

#: The vector a site releases, in order.
FIELDS = ("n", "sum_y", "sum_y2", "sum_squared_residual", "sum_absolute_residual")


def statistics(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One site's sums over its records (``FIELDS``), float64.

    Raises:
        ValueError: the two arrays do not hold one prediction per target.
    """
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} targets: one prediction per record")
    r = y - p
    return np.array([y.size, y.sum(), (y * y).sum(), (r * r).sum(), np.abs(r).sum()])


def metrics(total: np.ndarray) -> dict[str, float]:
    """MSE, RMSE, MAE and R^2 of the summed vector, and the MSE of predicting the mean (``mean_mse``);
    NaN where no record was evaluated (R^2 also where every target is the same)."""
    n, sy, syy, ssr, sar = (float(v) for v in total)
    if n < 1:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan, "r2": math.nan, "mean_mse": math.nan}
    sst = max(syy - sy * sy / n, 0.0)  # the total sum of squares about the pooled mean
    mse = ssr / n
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": sar / n,
        "r2": 1.0 - ssr / sst if sst > 0 else math.nan,
        "mean_mse": sst / n,
    }


class RegressionTask(Task):
    """Regression of one number per record: subclass it and define ``model`` (one output per example).

    The model predicts the target standardised by the consortium's mean and deviation
    (``shape.target_mean``, ``shape.target_scale``, from the setup stage's secure sums), so that one
    learning rate and one DP clip suit any target's units; predictions are mapped back before they are
    scored. The loss is the squared error on that scale (override ``loss`` for another, e.g. Huber,
    keeping one value per example); the metrics are MSE, RMSE, MAE and R^2 in the target's units from
    the summed ``FIELDS``, and ``mean_mse``, the MSE of predicting the consortium's mean (what a model
    must beat to be of any use).
    """

    target = "regression"
    headline = "mse"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.reshape(-1) - targets.reshape(-1).to(outputs.dtype)) ** 2

    def training_targets(self, y: torch.Tensor, shape: DataShape) -> torch.Tensor:
        return (y - shape.target_mean) / shape.target_scale

    @torch.no_grad()
    def evaluate(self, model: nn.Module, X: torch.Tensor, y: torch.Tensor, shape: DataShape, options: EvalOptions) -> np.ndarray:
        """The sums over the standardised target and prediction: every entry stays within the secure
        sum's fixed-point range whatever the target's units (``summarise`` scales the metrics back)."""
        model.eval()
        out = model(X).reshape(-1).numpy().astype(np.float64) if len(X) else np.zeros(0)
        return statistics(out, self.training_targets(y, shape).numpy().astype(np.float64))

    def statistics_length(self, shape: DataShape) -> int:
        return len(FIELDS)

    def summarise(self, total: np.ndarray, shape: DataShape, *, groups: bool = False, shift: bool = False) -> Evaluation:
        s = shape.target_scale
        unit = {"mse": s * s, "rmse": s, "mae": s, "r2": 1.0, "mean_mse": s * s}  # back to the target's units
        return Evaluation({k: v * unit[k] for k, v in metrics(total).items()}, {})

    def no_better_than_constant(self, metrics: dict[str, float]) -> str | None:
        mse, mean_mse = metrics.get("mse"), metrics.get("mean_mse")
        if mse is None or mean_mse is None or not math.isfinite(mse) or mse < mean_mse:
            return None
        return (
            f"the model is no better than predicting the mean: MSE {mse:.4g} against the mean's {mean_mse:.4g}; "
            "train longer, raise the learning rate or lower the noise (a larger epsilon, more records per site)"
        )
