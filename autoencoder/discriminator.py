"""PatchGAN discriminator used to train the KL autoencoder.

The pix2pix ``NLayerDiscriminator`` (Isola et al. 2017, sec. 3.2.2) as used by taming-transformers
(Esser et al. 2021, sec. 3.1) and CompVis ``LPIPSWithDiscriminator`` (Rombach et al. 2022, app. G).
Layer order and ``main.{i}`` names match taming, so a ``loss.discriminator.*`` slice of a CompVis
autoencoder training checkpoint loads with ``load_state_dict``.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from ldm.validation import check_choice, check_int

logger = logging.getLogger(__name__)

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm alternative: 32 groups (fewer when the width is small), as in the autoencoder.
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """Image (B,C,H,W) → patch logits (B,1,h,w), one per overlapping receptive field.

    conv4x4/2 + LeakyReLU(0.2); ``num_layers - 1`` × (conv4x4/2 + norm + LeakyReLU) doubling the
    width up to 8·base; one conv4x4/1 + norm + LeakyReLU; a final conv4x4/1 to one channel.
    With ``num_layers=3`` the receptive field is 70×70. Each 4×4/2 conv halves the map and each
    4×4/1 conv (padding 1) shrinks it by one, so inputs need ``H, W >= 3 · 2**num_layers``
    (24 for the default; use ``num_layers=2`` for 16×16 images).

    ``norm="batch"`` (default) is taming's BatchNorm, kept for checkpoint compatibility; real and
    fake batches go through separately, so each is normalised with its own statistics, exactly
    as in taming. ``norm="group"`` is batch-size independent (tiny batches, multi-GPU without
    SyncBatchNorm) but cannot load taming weights.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("base_channels", base_channels, 1)
        check_int("num_layers", num_layers, 1)
        check_choice("norm", norm, NORMS)
        bias = norm != "batch"  # a bias before BatchNorm is redundant (taming: use_bias=False)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c_prev = base_channels
        for n in range(1, num_layers + 1):
            c = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last of these keeps the resolution
            layers += [nn.Conv2d(c_prev, c, 4, stride, 1, bias=bias), _norm(norm, c), nn.LeakyReLU(0.2, True)]
            c_prev = c
        layers.append(nn.Conv2d(c_prev, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def init_weights(m: nn.Module) -> None:
    """taming ``weights_init``: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), norm shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
