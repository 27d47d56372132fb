"""Classifier-guided sampling with a noise-aware classifier on latents, optionally with CFG."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ldm.diffusion.samplers import Callback
from pipelines.base import Pipeline, PipelineOutput
from pipelines.options import Conditioning, SamplingOptions


class ClassifierGuidedPipeline(Pipeline):
    """``pipe(class_label, classifier_scale, ...)``: images steered toward a class by the model's classifier."""

    def class_index(self, label: int | str) -> int:
        """A class index, or a class name from the model's ``class_names``."""
        names = list(self.models.class_names or [])
        if isinstance(label, str) and not label.isdigit():
            if label not in names:
                raise ValueError(f"class_label={label!r} is not allowed; allowed: {', '.join(names) or 'an integer'}")
            return names.index(label)
        return int(label)

    @torch.no_grad()
    def __call__(
        self,
        class_label: int | str,
        classifier_scale: float = 10.0,
        prompt: str = "",
        negative_prompt: str | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        sampler: str = "ddim",
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callback | None = None,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> PipelineOutput:
        """Steer the sampler toward ``class_label`` with ε̂ = ε - s·√(1-ᾱ)·∇ log p(y | x_t); a
        ``prompt`` with ``guidance_scale`` > 1 adds classifier-free guidance underneath."""
        labels = torch.tensor([self.class_index(class_label)])
        options = SamplingOptions(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
            num_images_per_prompt=num_images_per_prompt, seed=seed, generator=generator, output_type=output_type,
            progress=progress,
            callback=callback,
            callback_on_step_end=callback_on_step_end,
        )
        conditioning = Conditioning([prompt], [negative_prompt or ""], class_labels=labels,
                                    classifier_scale=classifier_scale)
        return self.generate(conditioning, options)
