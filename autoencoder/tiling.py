"""Tiled encode / decode: run the VAE on overlapping tiles and blend them linearly.

Memory then scales with the tile, not the image (both entry points run without autograd). The result is not
bit-identical to a whole-image pass: GroupNorm statistics and the mid-block attention see one tile at a time,
and convolutions see zero padding at tile borders; the linear cross-fade hides the seams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from autoencoder.model import AutoencoderKL, DiagonalGaussian
from ldm.validation import check_int

logger = logging.getLogger(__name__)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
    """Decode latents (B,C,h,w) in ``tile``×``tile`` latent tiles overlapping by ``overlap``."""
    f = vae.downsample_factor
    return tiled_apply(vae.decode, z, tile, overlap, scale=f, out_channels=vae.config.out_channels)


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
    """Encode images (B,C,H,W) in pixel tiles; blends the posterior moments (mean, logvar)."""
    f = vae.downsample_factor
    for name, value in (("tile", tile), ("overlap", overlap), ("height", x.shape[-2]), ("width", x.shape[-1])):
        if value % f:
            raise ValueError(f"{name}={value!r} must be a multiple of the downsampling factor {f}")
    moments = tiled_apply(
        vae.encode_moments, x, tile, overlap, scale=1 / f, out_channels=2 * vae.config.latent_channels
    )
    return DiagonalGaussian(moments)


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: float, out_channels: int
) -> Tensor:
    """``fn`` over overlapping tiles of ``x``; ``fn`` maps an (n×n) tile to an (n·scale × n·scale) one."""
    check_int("tile", tile, 1)
    check_int("overlap", overlap, 0, tile - 1)
    b, _, h, w = x.shape
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    logger.debug("tiling %dx%d into %d tiles of %d (overlap %d)", h, w, len(ys) * len(xs), tile, overlap)
    out_h, out_w = round(h * scale), round(w * scale)
    out = x.new_zeros(b, out_channels, out_h, out_w)
    weight = x.new_zeros(1, 1, out_h, out_w)
    ramp, th, tw = round(overlap * scale), min(tile, h), min(tile, w)
    for y0 in ys:
        for x0 in xs:
            y = fn(x[..., y0 : y0 + th, x0 : x0 + tw])
            oy, ox = round(y0 * scale), round(x0 * scale)
            wy = _ramp(y.shape[-2], ramp, y0 > 0, y0 + th < h, x)
            wx = _ramp(y.shape[-1], ramp, x0 > 0, x0 + tw < w, x)
            mask = wy[:, None] * wx[None, :]  # (tile_h, tile_w) separable linear cross-fade
            out[..., oy : oy + y.shape[-2], ox : ox + y.shape[-1]] += y * mask
            weight[..., oy : oy + y.shape[-2], ox : ox + y.shape[-1]] += mask
    return out / weight


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets with stride ``tile - overlap``; the last tile is pulled back to end at ``size``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(n: int, ramp: int, fade_in: bool, fade_out: bool, like: Tensor) -> Tensor:
    """1-D weights: rise over ``ramp`` samples at a tile edge shared with a neighbour, else 1.

    Values are (k + ½)/ramp, never 0, so every output pixel has positive total weight.
    """
    w = torch.ones(n, dtype=like.dtype, device=like.device)
    if ramp > 0:
        rise = (torch.arange(min(ramp, n), dtype=like.dtype, device=like.device) + 0.5) / ramp
        if fade_in:
            w[: len(rise)] = torch.minimum(w[: len(rise)], rise)
        if fade_out:
            w[n - len(rise) :] = torch.minimum(w[n - len(rise) :], rise.flip(0))
    return w
