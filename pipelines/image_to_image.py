"""Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to ``strength`` and denoise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, image_tensor
from pipelines.options import Conditioning, SamplingOptions


class ImageToImagePipeline(Pipeline):
    """``pipe(prompt, image, strength, ...)``: text-to-image that starts from ``image``'s latents."""

    @torch.no_grad()
    def encode_image(self, pixels: Tensor) -> Tensor:
        """Pixels (B,3,H,W) in [-1, 1] → scaled latents: the mean of the autoencoder's posterior."""
        vae = self.models.vae
        return vae.encode(pixels.to(next(vae.parameters()).dtype)).mean.float() * vae.config.scale_factor

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None,
        image: ImageInput,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        sigma_spacing: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        clip_skip: int | None = None,
    ) -> PipelineOutput:
        """``strength`` ∈ (0, 1]: the share of the sampler's steps that is run; 1 ignores the image
        apart from its size. The image is encoded to the posterior mean."""
        pixels = image_tensor(image).to(self.device)
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            sigma_spacing=sigma_spacing,
            height=pixels.shape[-2], width=pixels.shape[-1], num_images_per_prompt=num_images_per_prompt, seed=seed,
            generator=generator, output_type=output_type, eta=eta, progress=progress, callback=callback,
            callback_on_step_end=callback_on_step_end,
        )
        start = self.encode_image(pixels)
        conditioning = Conditioning.from_prompts(prompt, negative_prompt, init_latents=start, strength=strength,
                                                 prompt_embeds=prompt_embeds,
                                                 negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        return self.generate(conditioning, options)
