"""KL autoencoder of Stable Diffusion in the original (CompVis) key layout, and tiled encode/decode."""

from autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from autoencoder.tiling import tiled_decode, tiled_encode

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "tiled_decode", "tiled_encode"]
