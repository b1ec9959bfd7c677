"""Local training and evaluation on one site's own data.

Everything here runs inside a site. Evaluation returns sufficient statistics
(counts, sums, histogram bins) rather than per-example outputs, so that the
consortium's metrics are sums that secure aggregation can compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

#: Bins of the predicted positive-class probability used for ROC AUC.
AUC_BINS = 1000


class TrainSettings(BaseModel):
    """How a site trains in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)


def make_optimizer(params: list[torch.Tensor], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)


def train_local(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    proximal_center: list[torch.Tensor] | None = None,
) -> float:
    """Train ``model`` in place; returns the mean training loss of the last epoch.

    With ``proximal_mu > 0`` the objective gains FedProx's term
    ``mu/2 * ||w - w_center||^2`` (Li et al., MLSys 2020). Shuffling uses its
    own generator seeded by ``seed``, so a run is reproducible.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    if proximal_mu > 0 and proximal_center is None:
        raise ValueError("proximal_mu > 0 needs the global parameters as proximal_center")
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    model.train()
    last = 0.0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            if proximal_mu > 0:
                prox = sum(((p - c) ** 2).sum() for p, c in zip(params, proximal_center))  # type: ignore[arg-type]
                (loss + 0.5 * proximal_mu * prox).backward()
            else:
                loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        last = total / max(seen, 1)
    return last


@dataclass(frozen=True)
class EvalStats:
    """Sufficient statistics of an evaluation: sums, so sites' statistics add up to the pooled ones."""

    n: int
    correct: int
    loss_sum: float
    #: For binary tasks: int64 [2, AUC_BINS] counts of negatives / positives per
    #: bin of the predicted positive-class probability. None otherwise.
    score_hist: np.ndarray | None

    def metrics(self) -> dict[str, float]:
        """Accuracy and mean loss, plus ROC AUC for binary tasks."""
        if self.n == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        out = {"accuracy": self.correct / self.n, "loss": self.loss_sum / self.n}
        if self.score_hist is not None:
            out["auc"] = auc_from_histograms(self.score_hist[0], self.score_hist[1])
        return out


def auc_from_histograms(neg: np.ndarray, pos: np.ndarray) -> float:
    """ROC AUC from binned scores: P(score_pos > score_neg) + 0.5 P(same bin).

    Exact when no negative and positive share a bin; otherwise ties inside a
    bin count one half, which moves the result by at most the share of
    positive-negative pairs that land in the same bin.
    """
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    wins = float(np.dot(pos, neg_below) + 0.5 * np.dot(pos, neg))
    return wins / (n_neg * n_pos)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int) -> EvalStats:
    """Evaluate ``model`` on (X, y) and return summable statistics."""
    model.eval()
    if X.shape[0] == 0:
        hist = np.zeros((2, AUC_BINS), dtype=np.int64) if n_classes == 2 else None
        return EvalStats(0, 0, 0.0, hist)
    logits = model(X)
    loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
    correct = int((logits.argmax(dim=1) == y).sum())
    hist = None
    if n_classes == 2:
        p = torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float64)
        bins = np.minimum((p * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        labels = y.numpy()
        hist = np.zeros((2, AUC_BINS), dtype=np.int64)
        np.add.at(hist, (labels, bins), 1)
    return EvalStats(int(X.shape[0]), correct, loss_sum, hist)
