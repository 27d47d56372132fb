"""Semantic synthesis: a label map, one-hot and resized to the latent grid, concatenated with the
latents at every step (Rombach et al. 2022, §4.3.2); an optional prompt adds text guidance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.spatial import semantic_condition
from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, label_map_tensor
from pipelines.options import Conditioning, SamplingOptions


class SemanticToImagePipeline(Pipeline):
    """``pipe(semantic_map, prompt="", ...)``: an image laid out by the label map."""

    def map_condition(self, semantic_map: ImageInput) -> tuple[Tensor, int, int]:
        """The map one-hot on the latent grid (B, num_classes, h, w), and the output's height and width."""
        concat = self.models.concat or {}
        if concat.get("kind") != "semantic":
            raise ValueError("this model has no semantic-map condition; use a semantic model such as 'demo-semantic'")
        labels = label_map_tensor(semantic_map).to(self.device)
        height, width = labels.shape[-2:]
        f = self.models.vae.downsample_factor
        self.latent_shape(1, height, width)  # checks the size
        return semantic_condition(labels, int(concat["num_classes"]), (height // f, width // f)), height, width

    @torch.no_grad()
    def __call__(
        self,
        semantic_map: ImageInput,
        prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        sampler: str = "dpmpp_2m",
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> PipelineOutput:
        """The output has the map's size; labels must lie in 0..num_classes-1 of the model. A batch
        of maps (B, H, W) gives one image per map (``num_images_per_prompt`` applies to one map)."""
        condition, height, width = self.map_condition(semantic_map)
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, height=height,
            width=width, num_images_per_prompt=condition.shape[0] if condition.shape[0] > 1 else num_images_per_prompt,
            seed=seed, generator=generator, output_type=output_type, progress=progress, callback=callback,
            callback_on_step_end=callback_on_step_end,
        )
        return self.generate(Conditioning([prompt], [""], concat=condition), options)
