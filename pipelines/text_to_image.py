"""Text-to-image: prompts → CLIP context → guided sampling in latent space → VAE decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        sigma_spacing: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float | None] | None = None,
        tile: int | None = None,
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        clip_skip: int | None = None,
    ) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images per prompt.

        ``negative_prompt`` (one, or one per prompt) replaces the empty prompt as the
        unconditional branch of classifier-free guidance; prompts of any length, ``(word:1.3)`` weighting and
        ``clip_skip`` as the WebUIs read them; ``prompt_embeds`` / ``negative_prompt_embeds`` in place of text.
        ``seed`` draws the initial noise on a CPU generator (row i·n + j is prompt i, copy j); None draws a seed
        and reports it (``output.seed``); ``generator`` (one, or one per image) draws instead, as in diffusers;
        ``latents`` (unit variance) replace the draw.
        ``tile`` (in latent pixels) decodes in overlapping tiles, for sizes beyond memory.
        ``guidance_interval`` (σ_lo, σ_hi) guides only at those noise levels; None takes the model's
        default (``model.yaml`` ``sampling``), which is every level unless the model says otherwise.
        """
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            sigma_spacing=sigma_spacing, height=height,
            width=width, num_images_per_prompt=num_images_per_prompt, seed=seed, generator=generator, latents=latents,
            output_type=output_type, eta=eta, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
            tile=tile, progress=progress, callback=callback, callback_on_step_end=callback_on_step_end,
        )
        conditioning = Conditioning.from_prompts(prompt, negative_prompt, prompt_embeds=prompt_embeds,
                                                 negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        return self.generate(conditioning, options)
