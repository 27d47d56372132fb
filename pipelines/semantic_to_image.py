"""Semantic synthesis: a label map, one-hot and resized to the latent grid, concatenated with the
latents at every step (Rombach et al. 2022, §4.3.2); an optional prompt adds text guidance."""

from __future__ import annotations

import torch

from ldm.conditioning.spatial import semantic_condition
from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.images import ImageInput, label_map_tensor


class SemanticToImagePipeline(Pipeline):
    @torch.no_grad()
    def __call__(
        self,
        semantic_map: ImageInput,
        prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        sampler: str = "dpmpp_2m",
        num_images_per_prompt: int = 1,
        seed: int | None = 0,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """The output has the map's size; labels must lie in 0..num_classes-1 of the model. A batch
        of maps (B, H, W) gives one image per map (``num_images_per_prompt`` applies to one map)."""
        concat = self.models.concat or {}
        if concat.get("kind") != "semantic":
            raise ValueError("this model has no semantic-map condition; use a semantic model such as 'demo-semantic'")
        labels = label_map_tensor(semantic_map).to(self.device)
        height, width = labels.shape[-2:]
        f = self.models.vae.downsample_factor
        self.latent_shape(1, height, width)  # checks the size
        condition = semantic_condition(labels, int(concat["num_classes"]), (height // f, width // f))
        return self.generate(
            [prompt], [""], num_images_per_prompt=labels.shape[0] if labels.shape[0] > 1 else num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, height=height, width=width, seed=seed, latents=None,
            output_type=output_type, progress=progress, callback=callback, concat=condition,
        )
