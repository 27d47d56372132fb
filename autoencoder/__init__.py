"""KL autoencoder of Stable Diffusion in the original (CompVis) key layout, tiled encode/decode,
and its training losses (L1 + KL + PatchGAN, LPIPS when weights are given)."""

from autoencoder.discriminator import PatchDiscriminator
from autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig
from autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from autoencoder.tiling import tiled_decode, tiled_encode

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "AutoencoderLoss",
    "AutoencoderLossConfig",
    "DiagonalGaussian",
    "PatchDiscriminator",
    "tiled_decode",
    "tiled_encode",
]
