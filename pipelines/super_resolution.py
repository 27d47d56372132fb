"""Super-resolution in the LDM-SR style: the low-resolution image, resized to the latent grid,
is concatenated with the latents at every step (Rombach et al. 2022, §4.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.spatial import image_condition
from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, image_tensor
from pipelines.options import Conditioning, SamplingOptions


class SuperResolutionPipeline(Pipeline):
    """``pipe(image, ...)``: ``image`` upscaled by ``upscale``, conditioned on the image itself."""

    max_pixels = 512 * 512  # the whole output is sampled and decoded at once (no attention to tile)
    memory_hint = "; demo-sr took 3 GB for one 512x512 output, about 11 kB a pixel, on a CPU"

    @property
    def upscale(self) -> int:
        """Output side / input side, from the model's concat config (default: the VAE factor)."""
        return int((self.models.concat or {}).get("upscale", self.models.vae.downsample_factor))

    def low_resolution_condition(self, image: ImageInput) -> tuple[Tensor, int, int]:
        """The image resized to the output's latent grid (B,3,h,w), and the output's height and width."""
        if (self.models.concat or {}).get("kind") != "image":
            raise ValueError("this model has no low-resolution image condition; use an SR model such as 'demo-sr'")
        low = image_tensor(image).to(self.device)
        height, width = low.shape[-2] * self.upscale, low.shape[-1] * self.upscale
        f = self.models.vae.downsample_factor
        if height % f or width % f:
            raise ValueError(f"image of size {low.shape[-1]}x{low.shape[-2]} is not allowed; allowed: sides whose "
                             f"×{self.upscale} is a multiple of {f}")
        return image_condition(low, (height // f, width // f)), height, width

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        sampler: str = "dpmpp_2m",
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> PipelineOutput:
        """Upscale ``image`` by ``self.upscale``; its side must be the model's native input size
        or a multiple of the latent grid's step. A batch of images gives one output per image."""
        condition, height, width = self.low_resolution_condition(image)
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, height=height,
            width=width, num_images_per_prompt=max(condition.shape[0], 1), seed=seed, generator=generator,
            output_type=output_type, progress=progress, callback=callback,
            callback_on_step_end=callback_on_step_end,
        )
        return self.generate(Conditioning([prompt], [""], concat=condition), options)
