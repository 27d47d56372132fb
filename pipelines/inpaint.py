"""Inpainting: regenerate where the mask is white, keep the image where it is black.

Two kinds of model: an inpainting U-Net (Stable Diffusion inpainting layout, 2C+1 input channels: the latents, the
mask on the latent grid and the latents of the masked image, concatenated as diffusers' StableDiffusionInpaintPipeline
does), and any text-to-image U-Net (C channels), which inpaints by holding its estimate x̂_0 to the image's latents
outside the mask at every step (ldm.diffusion.inpainting.KnownRegion).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.samplers import Callback
from ldm.validation import check_float
from pipelines.base import PipelineOutput
from pipelines.image_to_image import ImageToImagePipeline
from pipelines.images import ImageInput, blur_mask, image_tensor, mask_tensor
from pipelines.options import Conditioning, SamplingOptions


class InpaintPipeline(ImageToImagePipeline):
    """``pipe(prompt, image, mask_image, ...)``: ``image`` with the white part of ``mask_image`` generated anew."""

    @property
    def has_mask_input(self) -> bool:
        """Whether the U-Net takes the mask and the masked image (2C+1 input channels) or not (C channels)."""
        c, given = self.models.vae.config.latent_channels, self.models.unet.config.in_channels
        if given not in (c, 2 * c + 1):
            raise ValueError(f"this U-Net takes {given} input channels; allowed for inpainting: {c} (any "
                             f"text-to-image model) or {2 * c + 1} (an inpainting model: latents, mask, masked image)")
        return given == 2 * c + 1

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None,
        image: ImageInput,
        mask_image: ImageInput,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        sigma_spacing: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        mask_blur: float = 0.0,
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        clip_skip: int | None = None,
    ) -> PipelineOutput:
        """``strength`` 1 starts from pure noise (the image enters through the mask input or the held region);
        below 1 from the image's latents noised to it. ``mask_blur`` (pixels, a Gaussian's std) softens the mask's
        edge: a text-to-image model blends across it; an inpainting U-Net sees the mask binarised at 0.5, as in
        diffusers. ``seed`` None draws one (reported in the output)."""
        check_float("strength", strength, 0.0, 1.0, low_open=True)
        pixels, mask = self._inputs(image, mask_image, mask_blur)
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            sigma_spacing=sigma_spacing,
            height=pixels.shape[-2], width=pixels.shape[-1], num_images_per_prompt=num_images_per_prompt, seed=seed,
            generator=generator, latents=latents, output_type=output_type, eta=eta, progress=progress,
            callback=callback, callback_on_step_end=callback_on_step_end,
        )
        known = self.encode_image(pixels)
        method: dict[str, Any] = {"strength": strength, "prompt_embeds": prompt_embeds, "clip_skip": clip_skip,
                                  "negative_prompt_embeds": negative_prompt_embeds}
        if strength < 1:
            method["init_latents"] = known
        if self.has_mask_input:
            hard = (mask >= 0.5).float()
            on_grid = F.interpolate(hard, size=known.shape[-2:])  # nearest, as diffusers
            method["concat"] = torch.cat([on_grid, self.encode_image(pixels * (hard < 0.5))], dim=1)
        else:
            method["keep"] = (known, F.interpolate(mask, size=known.shape[-2:], mode="area"))
        return self.generate(Conditioning.from_prompts(prompt, negative_prompt, **method), options)

    def _inputs(self, image: ImageInput, mask_image: ImageInput, mask_blur: float) -> tuple[Tensor, Tensor]:
        pixels = image_tensor(image).to(self.device)
        mask = mask_tensor(mask_image).to(self.device)
        if mask.shape[-2:] != pixels.shape[-2:] or mask.shape[0] not in (1, pixels.shape[0]):
            raise ValueError(f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} ({mask.shape[0]} mask(s)); allowed: the "
                             f"image's size {pixels.shape[-1]}x{pixels.shape[-2]}, one mask or one per image")
        if check_float("mask_blur", mask_blur, 0.0) > 0:
            mask = blur_mask(mask, mask_blur)
        return pixels, mask
