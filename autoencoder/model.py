"""The KL-regularised autoencoder of Stable Diffusion (Rombach et al. 2022, sec. 3 and app. G).

Module names follow the original CompVis ``ldm/modules/diffusionmodules/model.py`` so that
``state_dict()`` keys are exactly those of an SD checkpoint's ``first_stage_model.*`` (without
the prefix): ``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1.q``, ``decoder.up.{i}``, ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.modules.upsample import nearest_up2_conv3
from ldm.validation import check_float, check_int

logger = logging.getLogger(__name__)

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the CompVis / diffusers posterior


@dataclass
class AutoencoderConfig:
    """Shape of the autoencoder; the downsampling factor is ``2 ** (len(channel_mult) - 1)``."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215  # latents are multiplied by this before diffusion

    def __post_init__(self) -> None:
        limits = {"in_channels": 64, "out_channels": 64, "base_channels": 4096, "num_res_blocks": 16,
                  "latent_channels": 64, "norm_groups": 1024}  # upper bounds: a typo must not exhaust memory
        for name, high in limits.items():
            check_int(name, getattr(self, name), 1, high)
        mult = self.channel_mult
        if isinstance(mult, (str, bytes)) or not isinstance(mult, (list, tuple)) or not 1 <= len(mult) <= 8:
            raise ValueError(f"channel_mult={mult!r} must be a sequence of 1 to 8 positive integers")
        for i, m in enumerate(mult):
            check_int(f"channel_mult[{i}]", m, 1, 64)
        self.channel_mult = tuple(mult)
        self.scale_factor = check_float("scale_factor", self.scale_factor, 0.0, low_open=True)
        bad = [w for w in (self.base_channels, *self.widths) if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups!r} must divide every channel width "
                f"{[self.base_channels, *self.widths]}; {bad} are not divisible"
            )

    @property
    def widths(self) -> list[int]:
        """Channels of each resolution level, finest first."""
        return [self.base_channels * m for m in self.channel_mult]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _conv3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


IN_PLACE = True  # without autograd: SiLU and residual adds overwrite fresh tensors (off: to measure the gain)


def _in_place() -> bool:
    return IN_PLACE and not torch.is_grad_enabled()


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """SiLU(GroupNorm(x)); without autograd the SiLU overwrites the norm's output, which on the CPU
    costs a fraction of allocating (and first touching) a second tensor of the same size."""
    h = norm(x)
    return F.silu(h, inplace=True) if _in_place() else F.silu(h)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a (1x1 conv when widths differ) shortcut."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), _conv3(c_in, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), _conv3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        shortcut = self.nin_shortcut(x)
        if _in_place() and shortcut.dtype == h.dtype:  # into the fresh conv output; autograd keeps `+`
            return h.add_(shortcut)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (CompVis layout)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B,1,HW,C)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        y = y.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (CompVis' asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return nearest_up2_conv3(x, self.conv)  # conv(interpolate(x, ×2, nearest)), cheaper when sampling


class MidBlock(nn.Module):
    """ResNet → attention → ResNet at the coarsest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (ResNets) and an optional ``downsample`` / ``upsample``."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(c_out)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    """Image (B,C,H,W) → Gaussian moments (B, 2·latent, H/f, W/f) before ``quant_conv``."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, g, n = cfg.widths, cfg.norm_groups, len(cfg.widths)
        self.conv_in = _conv3(cfg.in_channels, cfg.base_channels)
        ins = [cfg.base_channels, *widths[:-1]]
        self.down = nn.ModuleList(
            Level(ins[i], widths[i], cfg.num_res_blocks, g, "down" if i < n - 1 else None) for i in range(n)
        )
        self.mid = MidBlock(widths[-1], g)
        self.norm_out = _norm(widths[-1], g)
        self.conv_out = _conv3(widths[-1], 2 * cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(_norm_silu(self.norm_out, self.mid(h)))


class Decoder(nn.Module):
    """Latent (B, latent, h, w) → image (B, C, h·f, w·f). ``up[i]`` works at the resolution of
    ``encoder.down[i]``, so the coarsest ``up[n-1]`` runs first (CompVis indexing)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, g, n = cfg.widths, cfg.norm_groups, len(cfg.widths)
        self.conv_in = _conv3(cfg.latent_channels, widths[-1])
        self.mid = MidBlock(widths[-1], g)
        ins = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            Level(ins[i], widths[i], cfg.num_res_blocks + 1, g, "up" if i > 0 else None) for i in range(n)
        )
        self.norm_out = _norm(widths[0], g)
        self.conv_out = _conv3(widths[0], cfg.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))), logvar clamped as in CompVis."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std·ε, with ε drawn on the generator's device (so a CPU seed is device-independent)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over latent dimensions: ½ Σ (μ² + σ² − 1 − log σ²)."""
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + ``quant_conv`` → posterior; ``post_quant_conv`` + decoder → image in [-1, 1].

    Latents are *unscaled*: multiply by ``config.scale_factor`` before diffusion and divide after.
    """

    def __init__(self, config: AutoencoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or AutoencoderConfig()
        z = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode_moments(self, x: Tensor) -> Tensor:
        """(B,C,H,W) → concatenated (mean, logvar), (B, 2·latent, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self.posterior(self.encode_moments(x))

    @staticmethod
    def posterior(moments: Tensor) -> DiagonalGaussian:
        """The posterior of concatenated (mean, logvar) moments, e.g. cached ones."""
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, as used by the training loss."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
