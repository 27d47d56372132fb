"""Super-resolution in the LDM-SR style: the low-resolution image, resized to the latent grid,
is concatenated with the latents at every step (Rombach et al. 2022, §4.4)."""

from __future__ import annotations

import torch

from ldm.conditioning.spatial import image_condition
from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, image_tensor


class SuperResolutionPipeline(Pipeline):
    @property
    def upscale(self) -> int:
        """Output side / input side, from the model's concat config (default: the VAE factor)."""
        return int((self.models.concat or {}).get("upscale", self.models.vae.downsample_factor))

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        sampler: str = "dpmpp_2m",
        seed: int | None = 0,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """Upscale ``image`` by ``self.upscale``; its side must be the model's native input size
        or a multiple of the latent grid's step."""
        if (self.models.concat or {}).get("kind") != "image":
            raise ValueError("this model has no low-resolution image condition; use an SR model such as 'demo-sr'")
        low = image_tensor(image).to(self.device)
        height, width = low.shape[-2] * self.upscale, low.shape[-1] * self.upscale
        f = self.models.vae.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image of size {low.shape[-1]}x{low.shape[-2]} is not allowed; allowed: sides whose "
                             f"×{self.upscale} is a multiple of {f}")
        condition = image_condition(low, (height // f, width // f))
        return self.generate(
            [prompt], [""], num_images_per_prompt=low.shape[0] if low.shape[0] > 1 else 1,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, height=height,
            width=width, seed=seed, latents=None, output_type=output_type, progress=progress, callback=callback,
            concat=condition,
        )
