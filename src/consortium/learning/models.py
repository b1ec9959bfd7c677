"""Built-in models, described by a closed spec so that no code crosses a site's boundary.

A site builds the model named in a fit request from this spec; it never
unpickles or imports a model sent by someone else. Every model starts with a
``Standardize`` layer whose constants come from the consortium's pooled
feature statistics (sums of counts, values and squares, never rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from consortium.errors import ModelError
from consortium.learning.specs import ModelSpec


def standardisation(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of each column of ``X`` over its present values (NaN: missing), for ``Standardize``;
    a constant (or wholly missing) feature gets scale 1 (passes unscaled) and a wholly missing one mean 0."""
    X64 = np.asarray(X, dtype=np.float64)
    present = ~np.isnan(X64)
    count = np.maximum(present.sum(axis=0), 1)
    filled = np.where(present, X64, 0.0)
    mean = filled.sum(axis=0) / count
    var = np.maximum((filled * filled).sum(axis=0) / count - mean * mean, 0.0)
    scale = np.sqrt(var)
    return mean, np.where(scale < 1e-6, 1.0, scale)


class Standardize(nn.Module):
    """x -> (x - mean) / scale with constant (non-trainable) buffers; a missing value (NaN) becomes 0, the mean.

    The mean and scale are the consortium's (from secure sums over every site's present values), so a
    column declared ``missing: impute`` is imputed with the consortium-wide mean, never a site's own.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num((x - self.mean) / self.scale, nan=0.0)


class _SmallCNN(nn.Module):
    """Two 3x3 convolutions, one pooling, two dense layers: sized for 8x8 digits."""

    def __init__(self, image_shape: tuple[int, int, int], n_classes: int, hidden: int) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * (h // 2) * (w // 2), hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, *self.image_shape)))


def build_model(
    spec: ModelSpec,
    *,
    n_features: int,
    n_classes: int,
    mean: np.ndarray,
    scale: np.ndarray,
    image_shape: tuple[int, int, int] | None = None,
    seed: int | None = 0,
) -> nn.Module:
    """Build the model ``spec`` names, its weights initialised from ``seed``, with ``n_classes`` outputs
    (a classifier's logits; 1 for a regression)."""
    if n_features < 1 or n_classes < 1:
        raise ModelError(f"a model needs at least 1 feature and 1 output, got {n_features} and {n_classes}")
    # Initialisation draws from torch's default generator: fork it so the seed
    # decides the weights without leaving the caller's random state changed
    # (seed None: the caller seeded the generator and the weights are drawn from it).
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if spec.kind == "logistic":
            body: nn.Module = nn.Linear(n_features, n_classes)
        elif spec.kind == "mlp":
            layers: list[nn.Module] = []
            width = n_features
            for h in spec.hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            body = nn.Sequential(*layers, nn.Linear(width, n_classes))
        else:
            if image_shape is None or int(np.prod(image_shape)) != n_features:
                raise ModelError(
                    "model 'cnn' needs image data (like the digits dataset): use model kind 'mlp' or 'logistic' here"
                )
            body = _SmallCNN(image_shape, n_classes, spec.hidden[0] if spec.hidden else 64)
    return nn.Sequential(Standardize(mean, scale), body)
