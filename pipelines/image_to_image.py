"""Image-to-image (SDEdit, Meng et al. 2022): noise the encoded image to ``strength`` and denoise."""

from __future__ import annotations

import torch

from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, image_tensor
from pipelines.text_to_image import as_prompt_list


class ImageToImagePipeline(Pipeline):
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        num_images_per_prompt: int = 1,
        seed: int | None = 0,
        output_type: str = "pil",
        eta: float = 0.0,
        progress: bool = True,
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """``strength`` ∈ (0, 1]: the share of the sampler's steps that is run; 1 ignores the image
        apart from its size. The image is encoded to the posterior mean."""
        pixels = image_tensor(image).to(self.device)
        vae = self.models.vae
        latents = vae.encode(pixels.to(next(vae.parameters()).dtype)).mean.float() * vae.config.scale_factor
        return self.generate(
            as_prompt_list(prompt), as_prompt_list(negative_prompt, "negative_prompt"),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, height=pixels.shape[-2], width=pixels.shape[-1],
            seed=seed, latents=None, output_type=output_type, eta=eta, progress=progress, callback=callback,
            init_latents=latents, strength=strength,
        )
