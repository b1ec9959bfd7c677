"""The image example's task: a GroupNorm CNN on 32x32 colour images, with a class-weighted loss.

Which way the stripes of an image run, in random colours, positions and
widths, with pixel noise: a linear model on the pixels cannot tell, a small
CNN learns it.

Each site keeps its images in its own folder (one sub-folder per class, PNG
or JPEG of any size: they are resized to 32x32 as they are read); nothing
but the summed, noised updates and evaluation sums leaves a site. Record-level
DP-SGD trains this model as it is: GroupNorm normalises each image on its
own, where BatchNorm would mix the images of a batch (and is refused).

    python examples/images/make_data.py          # writes examples/images/data/site-*/<class>/*.png
    consortium simulate examples/images/config.yaml
"""

from __future__ import annotations

from pathlib import Path

import torch
from cnn32 import group_norm_cnn  # beside this file
from torch import nn
from torch.nn import functional as F

from consortium import ClassificationTask, DataShape
from consortium.data import load_image_folder

#: What the sites' images show, in the order every site indexes them: which way an image's stripes run.
CLASSES = ("horizontal-stripes", "vertical-stripes")
#: The loss weighs the class the consortium holds fewer of more.
CLASS_WEIGHTS = (1.0, 1.25)


class Shapes(ClassificationTask):
    """Which shape an image shows: a small GroupNorm CNN, class-weighted cross-entropy."""

    def model(self, shape: DataShape) -> nn.Module:
        assert shape.image_shape is not None, "this task reads images"
        channels = shape.image_shape[0]
        return nn.Sequential(  # each pixel standardised by the consortium's mean and deviation (secure sums)
            shape.standardize(), nn.Unflatten(1, shape.image_shape), group_norm_cnn(channels, shape.n_classes, width=8)
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, weight=torch.tensor(CLASS_WEIGHTS), reduction="none")

    def load(self, path: Path):
        return load_image_folder(path, size=32, classes=CLASSES)
