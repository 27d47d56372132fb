"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4):
the U-Net's encoder half (time-conditioned ResBlocks and downsampling) then a pooled linear head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.modules.resnet import Downsample, ResBlock
from ldm.modules.unet import timestep_embedding
from ldm.validation import check_int


@dataclass
class ClassifierConfig:
    in_channels: int = 4
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    num_classes: int = 3
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        for name in ("in_channels", "model_channels", "num_res_blocks", "norm_groups"):
            check_int(name, getattr(self, name), 1)
        check_int("num_classes", self.num_classes, 2)
        if not self.channel_mult:
            raise ValueError("channel_mult=() is empty; allowed: a non-empty tuple of positive integers")
        for mult in self.channel_mult:
            check_int("channel_mult", mult, 1)
            if self.model_channels * mult % self.norm_groups:
                channels = self.model_channels * mult
                raise ValueError(f"norm_groups={self.norm_groups} does not divide {channels} channels; "
                                 "allowed: a divisor of every model_channels·channel_mult")


class NoiseAwareClassifier(nn.Module):
    """``classifier(x_t, t) -> logits (B, num_classes)`` for noisy latents x_t at timesteps t."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or ClassifierConfig()
        emb = 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.blocks.append(ResBlock(ch, c.model_channels * mult, emb, c.norm_groups))
                ch = c.model_channels * mult
            if level != len(c.channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        self.head = nn.Sequential(nn.GroupNorm(c.norm_groups, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(ch, c.num_classes))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.head(h)
