"""The closed descriptions of a model and of local training: plain pydantic, no torch.

They live apart from the torch code that acts on them so that reading a
configuration, an agreement or a transcript (``consortium verify``, the
governance commands) does not load torch: a privacy officer checking a run
waits a fraction of a second instead of two.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ModelKind = Literal["logistic", "mlp", "cnn"]


class ModelSpec(BaseModel):
    """Which built-in architecture to train, and its size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ModelKind = "mlp"
    hidden: tuple[Annotated[int, Field(ge=1, le=65536)], ...] = (64,)


class TrainSettings(BaseModel):
    """How a site trains in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=1_000_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
