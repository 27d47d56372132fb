"""Super-resolution and semantic-map metrics on held-out shapes samples."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ldm.data.shapes import ShapeSample, detect_objects, make_sample, object_mask
from pipelines.semantic_to_image import SemanticToImagePipeline
from pipelines.super_resolution import SuperResolutionPipeline


def heldout_samples(count: int, seed: int, two_object_prob: float = 0.4) -> list[ShapeSample]:
    return [make_sample(seed, i, two_object_prob) for i in range(count)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, 3, H, W) images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _as_unit(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def evaluate_super_resolution(pipe: SuperResolutionPipeline, count: int, seed: int, steps: int, sampler: str,
                              batch_size: int = 64) -> tuple[dict[str, Any], dict]:
    """PSNR of the model and of bicubic upsampling against the 64×64 originals, and how far the
    output, area-downsampled back, lies from the 16×16 input (mean abs in [0, 1])."""
    samples = heldout_samples(count, seed)
    outputs = []
    for b, start in enumerate(range(0, count, batch_size)):
        low = _as_unit([s.low_res for s in samples[start:start + batch_size]])
        outputs.append(pipe(low, num_inference_steps=steps, sampler=sampler, seed=seed + b, output_type="pt",
                            progress=False).images)
    out = torch.cat(outputs)
    high, low = _as_unit([s.image for s in samples]), _as_unit([s.low_res for s in samples])
    bicubic = F.interpolate(low, size=high.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    factor = high.shape[-1] // low.shape[-1]
    model_psnr, bicubic_psnr = psnr(out, high).mean().item(), psnr(bicubic, high).mean().item()
    report = {"images": count, "data_seed": seed, "steps": steps, "sampler": sampler,
              "psnr_model_db": model_psnr, "psnr_bicubic_db": bicubic_psnr, "psnr_gain_db": model_psnr - bicubic_psnr,
              "downsample_consistency_mae": (F.avg_pool2d(out, factor) - low).abs().mean().item()}
    return report, {"low": low, "bicubic": bicubic, "output": out, "target": high}


def evaluate_semantic(pipe: SemanticToImagePipeline, count: int, seed: int, steps: int, sampler: str,
                      batch_size: int = 64) -> tuple[dict[str, Any], dict]:
    """Foreground IoU between each input map and the object pixels of its output, and whether
    each region of the map holds an object of its class (the found object overlapping it most)."""
    samples = heldout_samples(count, seed)
    images = []
    for b, start in enumerate(range(0, count, batch_size)):
        maps = torch.from_numpy(np.stack([s.semantic for s in samples[start:start + batch_size]])).long()
        out = pipe(maps, num_inference_steps=steps, sampler=sampler, seed=seed + b, output_type="np", progress=False)
        images.extend(np.round(out.images * 255).astype(np.uint8))
    ious, hits = [], []
    for sample, image in zip(samples, images):
        truth, found = sample.semantic > 0, object_mask(image)
        ious.append((truth & found).sum() / max(1, (truth | found).sum()))
        detected = detect_objects(image)
        hits.extend(_region_class_hit(obj, detected) for obj in sample.objects)
    report = {"images": count, "data_seed": seed, "steps": steps, "sampler": sampler,
              "foreground_iou": float(np.mean(ious)), "region_class_accuracy": float(np.mean(hits)),
              "regions": len(hits)}
    return report, {"samples": samples, "images": images}


def box_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """The area (pixels) shared by boxes ``a`` and ``b`` (x0, y0, x1, y1 with exclusive ends)."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def best_match(truth: Any, detected: list) -> Any:
    """The detected object whose box overlaps ``truth``'s most (None: none overlaps it)."""
    best = max(detected, key=lambda obj: box_overlap(obj.bbox, truth.bbox), default=None)
    return best if best is not None and box_overlap(best.bbox, truth.bbox) > 0 else None


def _region_class_hit(truth: Any, detected: list) -> bool:
    """Whether the detected object overlapping ``truth``'s box most has its shape."""
    match = best_match(truth, detected)
    return match is not None and match.shape == truth.shape
