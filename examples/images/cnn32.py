"""A small CNN for 32x32 images that record-level DP-SGD can train: GroupNorm, never BatchNorm.

BatchNorm normalises each example with statistics of the whole batch, so one
example's gradient depends on the others and clipping it cannot bound its
influence; GroupNorm normalises each example on its own. This module imports
only torch, so a task, a test or a benchmark can load it by path.
"""

from __future__ import annotations

from torch import nn


def _groups(channels: int) -> int:
    """The most GroupNorm groups (up to 8) that divide ``channels``."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def group_norm_cnn(in_channels: int = 3, n_classes: int = 10, width: int = 32) -> nn.Module:
    """A three-block convolutional classifier for 32x32 images (any size works: the head pools globally).

    Blocks: conv3x3(in -> w) GN ReLU maxpool2 -> conv3x3(w -> 2w) GN ReLU
    maxpool2 -> conv3x3(2w -> 2w) GN ReLU, then global average pooling and a
    linear layer to the logits. With the defaults: 57,290 parameters.

    Args:
        in_channels: channels of the input images (3 for RGB, 1 for grayscale).
        n_classes: number of output logits.
        width: channels of the first block (the others have twice as many).

    Returns:
        An ``nn.Sequential`` taking (batch, in_channels, H, W) floats and returning (batch, n_classes) logits.

    Raises:
        ValueError: a non-positive argument.
    """
    if min(in_channels, n_classes, width) < 1:
        raise ValueError(f"in_channels, n_classes and width must be positive, got {in_channels}, {n_classes}, {width}")
    w2 = 2 * width
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, w2, 3, padding=1), nn.GroupNorm(_groups(w2), w2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w2, w2, 3, padding=1), nn.GroupNorm(_groups(w2), w2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w2, n_classes),
    )
