"""Text-to-image adherence over held-out prompts for a sweep of guidance scales."""

from __future__ import annotations

from typing import Any

import numpy as np

from ldm.data.shapes import make_sample
from pipelines.evaluation.adherence import score_adherence, summarize_adherence
from pipelines.text_to_image import TextToImagePipeline


def heldout_prompts(count: int, seed: int, two_object_prob: float = 0.4, drop_prob: float = 0.5) -> list[str]:
    """``count`` prompts of the shapes grammar from data seed ``seed`` (optional parts dropped at
    random, as in training); evaluation seeds are ones the training never used."""
    return [make_sample(seed, i, two_object_prob, drop_prob).caption for i in range(count)]


def generate_batches(pipe: TextToImagePipeline, prompts: list[str], guidance: float, steps: int, sampler: str,
                     seed: int, batch_size: int) -> list[np.ndarray]:
    """One uint8 image (S, S, 3) per prompt; batch b uses noise seed ``seed + b``."""
    images = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        out = pipe(prompts[start:start + batch_size], guidance_scale=guidance, num_inference_steps=steps,
                   sampler=sampler, seed=seed + b, output_type="np", progress=False)
        images.extend(np.round(out.images * 255).astype(np.uint8))
    return images


def evaluate_text_to_image(pipe: TextToImagePipeline, count: int, seed: int, guidance_scales: list[float],
                           steps: int, sampler: str, batch_size: int = 64) -> tuple[dict[str, Any], dict]:
    """Adherence per guidance scale, split into one- and two-object prompts; also returns the
    images of each scale (for grids)."""
    prompts = heldout_prompts(count, seed)
    report: dict[str, Any] = {"prompts": len(prompts), "data_seed": seed, "steps": steps, "sampler": sampler,
                              "by_guidance": {}}
    images_by_scale = {}
    for scale in guidance_scales:
        images = generate_batches(pipe, prompts, scale, steps, sampler, seed, batch_size)
        report["by_guidance"][str(scale)] = split_adherence(prompts, images)
        images_by_scale[scale] = images
    return report, {"prompts": prompts, "images": images_by_scale}


def split_adherence(prompts: list[str], images: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Adherence summaries of the one-object and of the two-object prompts."""
    scores = [score_adherence(p, im) for p, im in zip(prompts, images)]
    return {"one_object": summarize_adherence([s for s in scores if "shape" in s]),
            "two_object": summarize_adherence([s for s in scores if "relation" in s])}
