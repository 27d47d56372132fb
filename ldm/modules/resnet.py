"""Residual and resampling blocks of the SD U-Net, with CompVis ``openaimodel.py`` key names.

``ResBlock`` is the time-conditioned residual block of Ho et al. 2020 (appendix B, after
Wide ResNet): GroupNorm → SiLU → conv, plus a projection of the timestep embedding, then
GroupNorm → SiLU → conv, with a 1×1 ``skip_connection`` when the channel count changes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.modules.upsample import nearest_up2_conv3


class ResBlock(nn.Module):
    """Keys ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(  # index 2 was a Dropout in CompVis
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # zero_module in CompVis: the block starts as identity
        nn.init.zeros_(self.out_layers[3].bias)
        same = in_channels == out_channels
        self.skip_connection = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C) → (B, C, 1, 1)
        return self.out_layers(h).add_(self.skip_connection(x))  # in place: conv outputs are not saved for backward


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to ``size``, for odd skip sizes) then a 3×3 conv (key ``conv``).

    An exact ×2 (``size`` None or twice the input) runs through :func:`nearest_up2_conv3`, which
    convolves at the input resolution when sampling on the CPU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return nearest_up2_conv3(x, self.conv)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
