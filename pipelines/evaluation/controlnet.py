"""ControlNet on the shapes domain: does the output follow the map (where the objects are, and their shapes) and
the prompt (their colours)? Held-out scenes give a semantic map (the hint) and their full caption (the prompt)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldm.data.shapes import ShapeSample, detect_objects, object_mask
from pipelines.controlnet import ControlNetPipeline
from pipelines.evaluation.spatial import best_match, heldout_samples
from pipelines.training.controlnet import render_hint


def hint_images(samples: list[ShapeSample]) -> torch.Tensor:
    """The samples' semantic maps as the ControlNet's hint: (B, 3, S, S) in [0, 1]."""
    return render_hint(torch.from_numpy(np.stack([s.semantic for s in samples]).astype(np.int64)))


def evaluate_controlnet(pipe: ControlNetPipeline, count: int, seed: int, steps: int, sampler: str,
                        guidance: float = 7.5, batch_size: int = 50,
                        baseline: bool = True) -> tuple[dict[str, Any], dict]:
    """Per scene: the foreground IoU of the map and the output's object pixels; per object of the map, whether
    the detected object overlapping its box most has the caption's colour, the map's shape, and both. With
    ``baseline`` the same prompts and noise without the ControlNet (control scale 0) are scored too."""
    samples = heldout_samples(count, seed, two_object_prob=0.5)  # prompts: their full captions
    report: dict[str, Any] = {"pairs": count, "data_seed": seed, "steps": steps, "sampler": sampler,
                              "guidance": guidance}
    extra: dict[str, Any] = {"samples": samples}
    for name, scale in (("controlnet", 1.0), ("without_control", 0.0))[:2 if baseline else 1]:
        images = _generate(pipe, samples, scale, guidance, steps, sampler, seed, batch_size)
        report[name] = score_scenes(samples, images)
        extra[name] = images
    return report, extra


def _generate(pipe: ControlNetPipeline, samples: list[ShapeSample], scale: float, guidance: float, steps: int,
              sampler: str, seed: int, batch_size: int) -> list[np.ndarray]:
    images = []
    for b, start in enumerate(range(0, len(samples), batch_size)):
        batch = samples[start:start + batch_size]
        out = pipe([s.full_caption for s in batch], hint_images(batch), controlnet_conditioning_scale=scale,
                   guidance_scale=guidance, num_inference_steps=steps, sampler=sampler, seed=seed + b,
                   output_type="np", progress=False)
        images.extend(np.round(out.images * 255).astype(np.uint8))
    return images


def score_scenes(samples: list[ShapeSample], images: list[np.ndarray]) -> dict[str, float]:
    """Mean foreground IoU over scenes; colour, shape and colour-and-shape accuracy over the maps' objects."""
    ious, colour, shape = [], [], []
    for sample, image in zip(samples, images):
        truth, found = sample.semantic > 0, object_mask(image)
        ious.append((truth & found).sum() / max(1, (truth | found).sum()))
        detected = detect_objects(image)
        for obj in sample.objects:
            match = best_match(obj, detected)
            colour.append(match is not None and match.colour == obj.colour)
            shape.append(match is not None and match.shape == obj.shape)
    both = [c and s for c, s in zip(colour, shape)]
    return {"foreground_iou": float(np.mean(ious)), "colour_accuracy": float(np.mean(colour)),
            "shape_accuracy": float(np.mean(shape)), "colour_and_shape": float(np.mean(both)), "objects": len(both)}
