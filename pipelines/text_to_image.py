"""Text-to-image: prompts → CLIP context → guided sampling in latent space → VAE decoder."""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.options import Conditioning, SamplingOptions


class TextToImagePipeline(Pipeline):
    """``pipe(prompt, ...)`` → ``PipelineOutput(images)``; see ``__call__``."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = 0,
        latents: Tensor | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float | None] | None = None,
        tile: int | None = None,
        progress: bool = True,
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images per prompt.

        ``negative_prompt`` (one, or one per prompt) replaces the empty prompt as the
        unconditional branch of classifier-free guidance. ``seed`` draws the initial noise on a
        CPU generator (row i·n + j is prompt i, copy j); ``latents`` (unit variance) replace it.
        ``tile`` (in latent pixels) decodes in overlapping tiles, for sizes beyond memory.
        ``guidance_interval`` (σ_lo, σ_hi) guides only at those noise levels; None takes the model's
        default (``model.yaml`` ``sampling``), which is every level unless the model says otherwise.
        """
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, height=height,
            width=width, num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents,
            output_type=output_type, eta=eta, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
            tile=tile, progress=progress, callback=callback,
        )
        return self.generate(Conditioning.from_prompts(prompt, negative_prompt), options)
