"""Model adapter: a ``torch.nn.Module``'s parameters as one flat float32 vector.

That vector (and what later layers make of it: clipped, noised, quantised,
masked) is all a site ever hands out. The layout hash names the parameter
layout (names, shapes, dtype, order) so that a vector can only be loaded into
a model of the same architecture: a mismatch is an error, never a silent
reshape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from consortium.errors import ModelError


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a module's trainable parameters, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    @property
    def hash(self) -> str:
        """SHA-256 (hex) of a canonical description of the layout."""
        canonical = json.dumps(
            {"dtype": "float32", "parameters": [[n, list(s)] for n, s in zip(self.names, self.shapes)]},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


class ModelAdapter:
    """Moves a module's parameters to and from one flat float32 numpy vector."""

    def __init__(self, module: torch.nn.Module) -> None:
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not params:
            raise ModelError("the model has no trainable parameters: give it at least one layer with weights")
        for name, p in params:
            if p.dtype != torch.float32:
                raise ModelError(
                    f"parameter '{name}' is {p.dtype}, not torch.float32: convert the model with model.float()"
                )
        self.module = module
        self._params = [p for _, p in params]
        self.layout = ParameterLayout(
            names=tuple(n for n, _ in params), shapes=tuple(tuple(p.shape) for _, p in params)
        )

    @property
    def layout_hash(self) -> str:
        return self.layout.hash

    @property
    def size(self) -> int:
        return self.layout.size

    def get_vector(self) -> np.ndarray:
        """A copy of the parameters as one float32 vector."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self._params]).numpy().copy()

    def set_vector(self, vector: np.ndarray) -> None:
        """Load ``vector`` into the parameters; raises ModelError on any mismatch."""
        vector = np.asarray(vector)
        if vector.dtype != np.float32 or vector.ndim != 1:
            raise ModelError(
                f"expected a 1-D float32 vector, got {vector.ndim}-D {vector.dtype}: "
                "pass the vector that ModelAdapter.get_vector produced"
            )
        if vector.shape[0] != self.size:
            raise ModelError(
                f"vector has {vector.shape[0]} values but the model layout {self.layout_hash[:12]} has "
                f"{self.size}: the vector belongs to another architecture"
            )
        if not np.all(np.isfinite(vector)):
            raise ModelError("parameter vector contains NaN or infinity: refusing to load it")
        source = torch.from_numpy(vector)
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.copy_(source[offset : offset + n].view_as(p))
                offset += n
