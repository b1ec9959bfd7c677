"""What a site does with a fit request's local training: the ``LocalTrainer`` seam, and the two it ships.

A ``Site`` is given one trainer (``Site(..., trainer=...)``; by default
``PlainTrainer``, the task's own ``train``: plain local training on the
task's loss unless the task brings its own loop). The site owns everything around
it: it checks the round plan, loads the global model, picks the trainer,
then bounds, clips, weighs and (under secure aggregation) masks the delta
the trainer returns. The trainer only trains.

What a user trainer may replace, and what it may not::

    privacy of the round        trainer used
    ------------------------    -------------------------------------------
    none                        the site's trainer (user code allowed)
    site level (DP-FedAvg)      the site's trainer (user code allowed): the
                                site clips the returned delta to the event's
                                L2 clip and the noise joins it afterwards, so
                                the privacy claim holds whatever it returns
    record level (DP-SGD)       always ``DPSGDTrainer``: the privacy claim is
                                about each record's influence on every step,
                                which only the framework's DP-SGD bounds

So user code can never bend a record-level privacy claim: with a
record-level event the site ignores its own trainer (``trainer_for``), and
DP-SGD takes only the task's per-example loss from the task.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from consortium.errors import ProtocolError
from consortium.learning.adapter import ModelAdapter
from consortium.learning.specs import TrainSettings
from consortium.learning.task import Task
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import train_dp_sgd
from consortium.privacy.events import RecordLevelEvent, SiteLevelEvent


@runtime_checkable
class LocalTrainer(Protocol):
    """One site's local training in one round: the model in, its delta and training loss out.

    Implement ``train``; keep no data between calls beyond what the site
    gave you (the site's splits never leave it, and neither should anything
    derived from one record). Pass an instance as ``Site(..., trainer=...)``
    or ``run_simulation(..., trainer=...)``.
    """

    def train(
        self,
        model: ModelAdapter,
        data: TrainingData,
        settings: TrainSettings,
        *,
        privacy: RecordLevelEvent | SiteLevelEvent | None,
        proximal_mu: float,
        seed: int,
        noise: torch.Generator,
    ) -> tuple[np.ndarray, float]:
        """Train ``model.module`` (loaded with the round's global model) on this site's rows.

        Args:
            model: the site's model; ``model.module`` is the ``torch.nn.Module``
                holding the global parameters, ``model.get_vector()`` its flat
                float32 parameters (take it before training to form the delta).
            data: this site's training split (``TrainingData``): its rows as tensors of features and the
                task's training targets (``Task.training_targets``: class indices, or a regression's
                standardised target), in memory or read on demand; ``data.batches(size, generator=...)``
                gives shuffled mini-batches, ``data.tensors()`` everything at once.
            settings: the round's training settings (epochs, batch size, optimiser, learning rate).
            privacy: the round's privacy event, as the site will pay for it in its ledger:
                ``None`` (no DP), a ``SiteLevelEvent`` (the site clips what you return) or a
                ``RecordLevelEvent`` (only ever given to ``DPSGDTrainer``).
            proximal_mu: FedProx's proximal weight (0: none); the centre is the global model.
            seed: this site's seed for this round (``SeedSequence([site seed, round])``): shuffle with it.
            noise: the site's secure noise generator (seeded from the OS, or the test seed in test
                mode): DP noise is drawn from it, nothing else.

        Returns:
            ``(delta, loss)``: the trained parameters minus the global ones, as a 1-D float32
            vector of ``model.size`` values in ``model``'s layout, and the training loss
            (a float, reported to the coordinator only as part of the summed update).

        Raises:
            ModelError: the model or the data cannot be trained as asked; the site refuses
                the round with a signed refusal (nothing is paid).
            ProtocolError: the round asks for training this trainer does not do (for example
                a record-level event given to a non-private trainer); refused the same way.
        """
        ...


class PlainTrainer:
    """The task's own local training (``Task.train``: by default mini-batch SGD or Adam on the task's
    loss, with FedProx's term)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def train(
        self,
        model: ModelAdapter,
        data: TrainingData,
        settings: TrainSettings,
        *,
        privacy: RecordLevelEvent | SiteLevelEvent | None,
        proximal_mu: float,
        seed: int,
        noise: torch.Generator,
    ) -> tuple[np.ndarray, float]:
        if isinstance(privacy, RecordLevelEvent):
            raise ProtocolError("a record-level round trains only with DP-SGD, never with plain training")
        start = model.get_vector()
        center = [p.detach().clone() for p in model.module.parameters()] if proximal_mu > 0 else None
        loss = self.task.train(model.module, data, settings, seed=seed, proximal_mu=proximal_mu, proximal_center=center)
        return model.get_vector() - start, float(loss)


class DPSGDTrainer:
    """DP-SGD (``privacy.dpsgd.train_dp_sgd``) as the round's record-level event declares it: Poisson
    sampling at its rate, per-example clipping at its clip, Gaussian noise at its multiplier, its steps,
    on the task's per-example loss (the only thing it takes from the task)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def train(
        self,
        model: ModelAdapter,
        data: TrainingData,
        settings: TrainSettings,
        *,
        privacy: RecordLevelEvent | SiteLevelEvent | None,
        proximal_mu: float,
        seed: int,
        noise: torch.Generator,
    ) -> tuple[np.ndarray, float]:
        if not isinstance(privacy, RecordLevelEvent):
            raise ProtocolError(f"DP-SGD trains under a record-level privacy event, and this round has {privacy!r}")
        start = model.get_vector()
        center = [p.detach().clone() for p in model.module.parameters()] if proximal_mu > 0 else None
        loss = train_dp_sgd(
            model.module, data, settings,
            sampling_rate=privacy.sampling_rate, noise_multiplier=privacy.noise_multiplier, clip=privacy.clip,
            steps=privacy.steps, generator=noise, proximal_mu=proximal_mu, proximal_center=center, loss=self.task.loss,
        )
        return model.get_vector() - start, loss


def trainer_for(privacy: RecordLevelEvent | SiteLevelEvent | None, trainer: LocalTrainer, task: Task) -> LocalTrainer:
    """The trainer a round runs: DP-SGD on ``task``'s loss whenever its privacy event is record level,
    else the site's own."""
    return DPSGDTrainer(task) if isinstance(privacy, RecordLevelEvent) else trainer
