"""Concat conditioning: images and semantic maps brought to the latent grid (Rombach et al.
2022, §4.3: LDM-SR concatenates the low-resolution image, semantic synthesis the label map)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def image_condition(image: Tensor, size: tuple[int, int]) -> Tensor:
    """An image (B, C, H, W) in [-1, 1] resized (bicubic, or area when shrinking) to the latent ``size``."""
    if image.ndim != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (B, C, H, W)")
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = image.shape[-2] > size[0]
    mode, corners = ("area", None) if shrink else ("bicubic", False)
    return F.interpolate(image, size=size, mode=mode, align_corners=corners)


def semantic_condition(labels: Tensor, num_classes: int, size: tuple[int, int]) -> Tensor:
    """A label map (B, H, W) of ints in [0, num_classes) → one-hot (B, num_classes, *size), area-resized."""
    if labels.ndim != 3 or labels.dtype.is_floating_point:
        raise ValueError(f"semantic map has shape {tuple(labels.shape)} and dtype {labels.dtype}; "
                         "expected (B, H, W) integers")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = high if high >= num_classes else low
        raise ValueError(f"semantic map has label {bad}; allowed: labels 0..{num_classes - 1} of this model")
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()  # (B, H, W, K) → (B, K, H, W)
    return F.interpolate(one_hot, size=size, mode="area") if tuple(labels.shape[-2:]) != tuple(size) else one_hot


def as_condition_batch(tensor: Tensor, batch: int) -> Tensor:
    """Repeat a single condition to the batch, or check it already has ``batch`` rows."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"condition has batch {tensor.shape[0]}; expected 1 or {batch}")
