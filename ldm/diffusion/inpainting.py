"""Inpainting with any denoiser: the known region's x̂_0 is the known image, at every noise level.

A model trained without a mask input (4 latent channels) can still fill a hole: where the mask is 0 the
denoiser's estimate is replaced by the known latents, D'(x; σ) = m·D(x; σ) + (1 - m)·x_known. Every sampler then
moves the known region along x = x_known + σ ε̂ and ends on x_known at σ = 0 (DDIM, which stops at σ(t=0) > 0, is
given the known latents once more at its end: ``keep_known``, as diffusers' last step does), while the hole is denoised
in the context of it (the latent blend of Avrahami et al. 2023 / diffusers' 4-channel inpainting, written as a
denoiser so that it works with every sampler). Models trained for inpainting (9 channels: latents, mask, masked
image latents) take the mask as a U-Net input instead (pipelines.InpaintPipeline).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldm.diffusion.denoiser import Sigma, _sigma64
from ldm.diffusion.guidance import Guidance
from ldm.diffusion.schedule import NoiseSchedule, broadcast
from ldm.validation import check_same_shape


def keep_known(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is 1, ``known`` where it is 0, blended between."""
    m = mask.to(x)
    return m * x + (1 - m) * known.to(x)


class KnownRegion(Guidance):
    """``denoiser`` with x̂_0 := ``known`` where ``mask`` is 0 (soft masks blend): ``mask`` (B or 1, 1, h, w) in
    [0, 1], 1 = to be generated; ``known`` (B or 1, C, h, w): the latents of the image to keep."""

    def __init__(self, denoiser: Any, known: Tensor, mask: Tensor, schedule: NoiseSchedule | None = None,
                 prediction_type: str = "epsilon") -> None:
        check_same_shape("mask", (mask.shape[0], *mask.shape[2:]), (mask.shape[0], *known.shape[2:]))
        if mask.shape[1] != 1:
            raise ValueError(f"mask has {mask.shape[1]} channels; allowed: 1")
        self.known, self.mask = known, mask
        super().__init__(denoiser, schedule, prediction_type)

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        x0 = keep_known(self.inner().denoise(x, sigma)[0], self.known, self.mask)
        return x0, (x - x0) / broadcast(_sigma64(sigma), x)
