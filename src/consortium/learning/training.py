"""Local training and evaluation on one site's own data.

Everything here runs inside a site. Evaluation returns sufficient statistics
(counts, sums, histogram bins) rather than per-example outputs, so that the
consortium's metrics are sums that secure aggregation can compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from consortium.data import Records, Table
from consortium.learning.specs import TrainSettings

#: Bins of the predicted positive-class probability used for ROC AUC.
AUC_BINS = 1000
#: Bins of the top-class confidence for calibration (expected calibration error, reliability diagram).
CAL_BINS = 15
#: Per group of a sensitive attribute: records, predicted positive, positives, true positives, negatives, false positives.
GROUP_FIELDS = ("n", "predicted_positive", "positives", "true_positives", "negatives", "false_positives")


def make_optimizer(params: list[torch.Tensor], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)


class TrainingData:
    """A site's training rows as local training reads them: how many, and the rows at given positions as
    tensors (float32 features, the task's training targets).

    Over a ``Table`` (or ``TrainingData.of(X, y)``) the rows are in memory and indexed; over a
    ``StreamedTable`` each call reads only the rows it asks for, so a step holds one batch, never the
    dataset. A task's own ``train`` loop reads through ``batches``; DP-SGD samples through ``rows``.

    Args:
        records: the site's training split.
        targets: maps a batch's labels to what the model trains on (``Task.training_targets``, e.g. a
            regression's standardised target); default: the labels as they are.
    """

    def __init__(self, records: Records, targets: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._records: Records | None = records
        self._targets = targets or (lambda y: y)
        self._n = records.n_rows
        #: Rows read at a time when a sample is larger (DP-SGD's Poisson sample is summed in such chunks).
        self.chunk_rows = records.batch_rows
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None
        if isinstance(records, Table):  # in memory: indexed, never copied
            self._memory = (torch.from_numpy(records.X), self._targets(torch.from_numpy(records.y)))

    @classmethod
    def of(cls, X: torch.Tensor, y: torch.Tensor) -> TrainingData:
        """Rows already in memory as tensors: features ``X`` (n, d) and training targets ``y`` (n,)."""
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X has {X.shape[0]} rows and y {y.shape[0]}: give one target per row")
        data = object.__new__(cls)
        data._records, data._targets, data._n, data.chunk_rows, data._memory = None, lambda t: t, int(X.shape[0]), int(X.shape[0]), (X, y)
        return data

    def __len__(self) -> int:
        return self._n

    @property
    def streamed(self) -> bool:
        """Whether the rows are read on demand (a ``StreamedTable``) rather than held in memory."""
        return self._memory is None

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and training targets of the rows at positions ``idx`` (a 1-D int64 tensor)."""
        if self._memory is not None:
            return self._memory[0][idx], self._memory[1][idx]
        assert self._records is not None
        part = self._records.take(idx.numpy())
        return torch.from_numpy(part.X), self._targets(torch.from_numpy(part.y))

    def chunks(self, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows at ``idx`` in pieces of at most ``chunk_rows`` (in memory: one piece)."""
        for start in range(0, len(idx), max(self.chunk_rows, 1)):
            yield self.rows(idx[start : start + self.chunk_rows])

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over every row in mini-batches of ``batch_size``: shuffled by ``generator`` when given."""
        order = torch.randperm(self._n, generator=generator) if generator is not None else torch.arange(self._n)
        for start in range(0, self._n, batch_size):
            yield self.rows(order[start : start + batch_size])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row at once (a streamed table is read whole: only for what needs it all in memory)."""
        return self._memory if self._memory is not None else self.rows(torch.arange(self._n))


def train_local(
    model: nn.Module,
    data: TrainingData,
    settings: TrainSettings,
    *,
    seed: int,
    proximal_mu: float = 0.0,
    proximal_center: list[torch.Tensor] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Train ``model`` in place on ``data``; returns the mean training loss of the last epoch.

    ``loss``: a per-example loss (one value per example), averaged over each
    batch; default: cross-entropy of the logits.

    With ``proximal_mu > 0`` the objective gains FedProx's term
    ``mu/2 * ||w - w_center||^2`` (Li et al., MLSys 2020). Shuffling uses its
    own generator seeded by ``seed``, so a run is reproducible.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, settings)
    if proximal_mu > 0 and proximal_center is None:
        raise ValueError("proximal_mu > 0 needs the global parameters as proximal_center")
    gen = torch.Generator().manual_seed(seed)
    model.train()
    last = 0.0
    for _ in range(settings.epochs):
        total, seen = 0.0, 0
        for X, y in data.batches(settings.batch_size, generator=gen):
            opt.zero_grad(set_to_none=True)
            out = model(X)
            value = F.cross_entropy(out, y) if loss is None else loss(out, y).mean()
            if proximal_mu > 0:
                prox = sum(((p - c) ** 2).sum() for p, c in zip(params, proximal_center))  # type: ignore[arg-type]
                (value + 0.5 * proximal_mu * prox).backward()
            else:
                value.backward()
            opt.step()
            total += float(value.detach()) * len(y)
            seen += len(y)
        last = total / max(seen, 1)
    return last


@dataclass(frozen=True)
class Groups:
    """The two groups of a declared sensitive attribute: feature ``feature`` at or below ``threshold``, or above."""

    feature: int
    threshold: float
    positive: int = 1  # the class that counts as the favourable / positive prediction


@dataclass(frozen=True)
class EvalStats:
    """Sufficient statistics of an evaluation: sums, so sites' statistics add up to the pooled ones."""

    n: int
    correct: int
    loss_sum: float
    #: For binary tasks: int64 [2, AUC_BINS] counts of negatives / positives per
    #: bin of the predicted positive-class probability. None otherwise.
    score_hist: np.ndarray | None
    #: [3, CAL_BINS]: per bin of top-class confidence, the records, their summed confidence, the correct ones.
    calibration: np.ndarray | None = None
    #: [2, len(GROUP_FIELDS)]: per group of the sensitive attribute (at or below the threshold, above); None: none declared.
    groups: np.ndarray | None = None
    #: [sites, sum of the sites' accuracies, sum of their squares]: the spread across sites, never one site's figure.
    sites: np.ndarray | None = None
    #: [n, correct] on the test records under the declared distribution shift; None: none declared.
    shift: np.ndarray | None = None
    #: Records per class (the labels' counts): what the constant predictors' yardsticks come from.
    labels: np.ndarray | None = None

    def metrics(self) -> dict[str, float]:
        """Accuracy and mean loss, ROC AUC for binary tasks, and what else was measured: expected calibration
        error, the spread of accuracy across sites, fairness gaps between the groups, accuracy under shift."""
        if self.n == 0:
            return {"accuracy": float("nan"), "loss": float("nan")}
        out = {"accuracy": self.correct / self.n, "loss": self.loss_sum / self.n}
        if self.score_hist is not None:
            out["auc"] = auc_from_histograms(self.score_hist[0], self.score_hist[1])
        if self.calibration is not None:
            count, confidence, correct = self.calibration
            out["ece"] = float(np.abs(correct - confidence).sum() / max(count.sum(), 1))
        if self.sites is not None and self.sites[0] >= 2:
            k, total, squares = (float(v) for v in self.sites)
            out["site_accuracy_mean"] = total / k
            out["site_accuracy_std"] = math.sqrt(max(squares / k - (total / k) ** 2, 0.0))
        out.update(fairness_gaps(self.groups))
        if self.shift is not None and self.shift[0] > 0:
            out["shift_accuracy"] = float(self.shift[1] / self.shift[0])
        if self.labels is not None and self.labels.sum() > 0:  # what predicting the label distribution scores
            p = self.labels.astype(np.float64) / self.labels.sum()
            out["majority_accuracy"] = float(p.max())
            out["constant_loss"] = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        return out

    def reliability(self) -> list[dict[str, float]]:
        """The reliability diagram: per non-empty confidence bin, its range, records, mean confidence and accuracy."""
        if self.calibration is None:
            return []
        count, confidence, correct = self.calibration
        edges = np.linspace(0, 1, CAL_BINS + 1)
        return [
            {"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(round(count[b])),
             "confidence": float(confidence[b] / count[b]), "accuracy": float(correct[b] / count[b])}
            for b in range(CAL_BINS) if count[b] >= 0.5
        ]


def fairness_gaps(groups: np.ndarray | None) -> dict[str, float]:
    """Demographic parity difference |P(yhat=+|A) - P(yhat=+|B)| and equalised odds difference
    max(|TPR_A - TPR_B|, |FPR_A - FPR_B|) from the groups' counts; only the gaps both groups define."""
    if groups is None:
        return {}
    g = {f: groups[:, i].astype(np.float64) for i, f in enumerate(GROUP_FIELDS)}
    out: dict[str, float] = {}
    if np.all(g["n"] > 0):
        rate = g["predicted_positive"] / g["n"]
        out["demographic_parity_gap"] = float(abs(rate[0] - rate[1]))
    if np.all(g["positives"] > 0) and np.all(g["negatives"] > 0):
        tpr, fpr = g["true_positives"] / g["positives"], g["false_positives"] / g["negatives"]
        out["equalized_odds_gap"] = float(max(abs(tpr[0] - tpr[1]), abs(fpr[0] - fpr[1])))
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


def _group_counts(pred: np.ndarray, y: np.ndarray, member_b: np.ndarray, positive: int) -> np.ndarray:
    out = np.zeros((2, len(GROUP_FIELDS)))
    for g, rows in enumerate((~member_b, member_b)):
        p, t = pred[rows] == positive, y[rows] == positive
        out[g] = [rows.sum(), p.sum(), t.sum(), (p & t).sum(), (~t).sum(), (p & ~t).sum()]
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, n_classes: int, *,
    groups: Groups | None = None, shifted: torch.Tensor | None = None,
) -> EvalStats:
    """Evaluate ``model`` on (X, y) and return summable statistics.

    ``groups``: also count, per group of that sensitive attribute, what the
    fairness gaps need. ``shifted``: the same records under a distribution
    shift (same labels), whose accuracy is counted too. The loss is the
    log-loss (cross-entropy), whatever loss the task trained with, so that
    runs and the constant predictor compare on one scale.
    """
    model.eval()
    n = X.shape[0]
    calibration = np.zeros((3, CAL_BINS))
    group_counts = None if groups is None else np.zeros((2, len(GROUP_FIELDS)))
    shift = None if shifted is None else np.zeros(2)
    if n == 0:
        hist = np.zeros((2, AUC_BINS), dtype=np.int64) if n_classes == 2 else None
        return EvalStats(0, 0, 0.0, hist, calibration, group_counts, None, shift, np.zeros(n_classes))
    logits = model(X)
    loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
    probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    pred, labels = probs.argmax(axis=1), y.numpy()
    right = pred == labels
    correct = int(right.sum())
    confidence = probs.max(axis=1)
    cal_bin = np.minimum((confidence * CAL_BINS).astype(np.int64), CAL_BINS - 1)
    for row, values in enumerate((np.ones(n), confidence, right.astype(np.float64))):
        np.add.at(calibration[row], cal_bin, values)
    hist = None
    if n_classes == 2:
        bins = np.minimum((probs[:, 1] * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        hist = np.zeros((2, AUC_BINS), dtype=np.int64)
        np.add.at(hist, (labels, bins), 1)
    if groups is not None:
        group_counts = _group_counts(pred, labels, X[:, groups.feature].numpy() > groups.threshold, groups.positive)
    if shifted is not None:
        shift = np.array([n, float((model(shifted).argmax(dim=1) == y).sum())])
    labels_count = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return EvalStats(n, correct, loss_sum, hist, calibration, group_counts, None, shift, labels_count)
