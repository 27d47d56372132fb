"""Classifier guidance: how often the generated shape is the class the classifier steers to."""

from __future__ import annotations

from typing import Any

import numpy as np

from ldm.data.shapes import detect_objects
from pipelines.classifier_guided import ClassifierGuidedPipeline


def evaluate_classifier_guidance(pipe: ClassifierGuidedPipeline, count: int, seed: int, scales: list[float],
                                 steps: int, sampler: str) -> tuple[dict[str, Any], dict]:
    """For each classifier scale (0: unguided), ``count`` samples split evenly over the classes;
    a sample hits when the largest object the detector finds has the target shape."""
    names = list(pipe.models.class_names or [])
    per_class = max(1, count // len(names))
    report: dict[str, Any] = {"samples_per_scale": per_class * len(names), "noise_seed": seed, "steps": steps,
                              "sampler": sampler, "by_scale": {}}
    images_by_scale = {}
    for scale in scales:
        hits, found_shapes, images = [], [], []
        for index, name in enumerate(names):
            out = pipe(name, classifier_scale=scale, num_images_per_prompt=per_class, num_inference_steps=steps,
                       sampler=sampler, seed=seed + index, output_type="np", progress=False)
            for image in np.round(out.images * 255).astype(np.uint8):
                objects = detect_objects(image)
                shape = objects[0].shape if objects else None
                hits.append(shape == name)
                found_shapes.append(shape)
                images.append(image)
        share = {n: found_shapes.count(n) / len(found_shapes) for n in names}
        report["by_scale"][str(scale)] = {"target_accuracy": float(np.mean(hits)), "shape_shares": share}
        images_by_scale[scale] = images
    return report, {"images": images_by_scale, "per_class": per_class, "names": names}
