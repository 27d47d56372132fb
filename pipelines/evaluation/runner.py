"""``ldm eval TASK``: run one evaluation (or all) and write its report, plot and grids."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.evaluation.report import image_grid, plot_adherence, to_uint8, write_json

logger = logging.getLogger(__name__)

EVALUATIONS = ("text-to-image", "super-resolution", "semantic", "classifier", "clip", "controlnet")
DEFAULT_MODELS = {"text-to-image": "demo", "super-resolution": "demo-sr", "semantic": "demo-semantic",
                  "classifier": "demo-classifier", "clip": "demo-clip", "controlnet": "demo-controlnet"}
DEFAULT_GUIDANCE = {"text-to-image": [1.0, 2.0, 4.0, 7.5, 12.0], "controlnet": [7.5]}


@dataclass
class EvalOptions:
    count: int = 300  # held-out prompts / images / samples
    seed: int = 1000  # data seed (training uses 0-4); SR and semantic add 1 and 2
    steps: int = 25
    sampler: str = "dpmpp_2m"
    guidance: list[float] | None = None  # None: the task's (text-to-image 1, 2, 4, 7.5, 12; controlnet 7.5)
    classifier_scales: list[float] = field(default_factory=lambda: [0.0, 10.0])
    device: str = "cpu"
    clip: str | None = "demo-clip"  # text-to-image: the CLIP that scores the images too (None: the detector only)
    base: str = "demo"  # controlnet: the text-to-image model the ControlNet steers
    deep_cache: int | None = None  # text-to-image, controlnet: DeepCache interval (None: every call in full)


def run_evaluation(task: str, output: str | Path, model: str | None = None,
                   options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (default: the task's demo model) on held-out samples; writes
    ``<task>.json`` and pictures into ``output`` and returns the report."""
    if task not in EVALUATIONS:
        raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(EVALUATIONS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    model = model or DEFAULT_MODELS[task]
    options = dataclasses.replace(options or EvalOptions())
    if options.guidance is None:
        options.guidance = list(DEFAULT_GUIDANCE.get(task, [7.5]))
    report = {"task": task, "model": model, **({"deep_cache": options.deep_cache} if options.deep_cache else {}),
              **_RUNNERS[task](out, model, options)}
    write_json(report, out / f"{task}.json")
    logger.info("wrote %s", out / f"{task}.json")
    return report


def _text_to_image(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines import TextToImagePipeline
    from pipelines.evaluation.text_to_image import evaluate_text_to_image

    pipe = TextToImagePipeline.from_pretrained(model, device=o.device)
    if o.deep_cache:
        pipe.enable_deep_cache(o.deep_cache)
    report, extra = evaluate_text_to_image(pipe, o.count, o.seed, o.guidance, o.steps, o.sampler)
    if o.clip:
        from pipelines.evaluation.clip_score import ClipJudge, clip_scores

        judge = ClipJudge(o.clip, o.device)
        for scale in o.guidance:  # beside the detector's numbers: CLIP score and hard-negative score
            report["by_guidance"][str(scale)]["clip"] = clip_scores(judge, extra["images"][scale], extra["prompts"])
    plot_adherence(report, out / "text-to-image-adherence.png")
    rows = [extra["images"][scale][:12] for scale in o.guidance]  # a row per guidance scale, the same 12 prompts
    image_grid(rows).save(out / "text-to-image-grid.png")
    scales = ", ".join(f"{s:g}" for s in o.guidance)
    (out / "text-to-image-grid.txt").write_text(f"rows: guidance {scales}; columns: prompts\n"
                                                + "\n".join(extra["prompts"][:12]) + "\n")
    return report


def _super_resolution(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines import SuperResolutionPipeline
    from pipelines.evaluation.spatial import evaluate_super_resolution

    pipe = SuperResolutionPipeline.from_pretrained(model, device=o.device)
    report, extra = evaluate_super_resolution(pipe, o.count, o.seed + 1, o.steps, o.sampler)
    side = extra["target"].shape[-1]
    low = [np.kron(im, np.ones((side // im.shape[0], side // im.shape[1], 1), dtype=np.uint8))
           for im in to_uint8(extra["low"][:8])]
    rows = [low, to_uint8(extra["bicubic"][:8]), to_uint8(extra["output"][:8]), to_uint8(extra["target"][:8])]
    image_grid(rows).save(out / "super-resolution-grid.png")  # rows: input (nearest), bicubic, model, original
    return report


def _semantic(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines import SemanticToImagePipeline
    from pipelines.evaluation.spatial import evaluate_semantic

    pipe = SemanticToImagePipeline.from_pretrained(model, device=o.device)
    report, extra = evaluate_semantic(pipe, o.count, o.seed + 2, o.steps, o.sampler)
    palette = np.array([[255, 255, 255], [220, 30, 30], [30, 170, 50], [30, 70, 220]], dtype=np.uint8)
    maps = [palette[s.semantic] for s in extra["samples"][:8]]
    image_grid([maps, extra["images"][:8]]).save(out / "semantic-grid.png")  # rows: map, output
    return report


def _classifier(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines import ClassifierGuidedPipeline
    from pipelines.evaluation.classifier import evaluate_classifier_guidance

    pipe = ClassifierGuidedPipeline.from_pretrained(model, device=o.device)
    report, extra = evaluate_classifier_guidance(pipe, o.count, o.seed, o.classifier_scales, o.steps, o.sampler)
    per, names = extra["per_class"], extra["names"]
    rows = [[im for c in range(len(names)) for im in extra["images"][s][c * per:c * per + 4]]
            for s in o.classifier_scales]
    image_grid(rows).save(out / "classifier-grid.png")  # a row per scale; 4 columns per target class
    return report


def _clip(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines.evaluation.clip_score import ClipJudge, evaluate_clip

    return evaluate_clip(ClipJudge(model, o.device), o.count, o.seed + 3)


def _controlnet(out: Path, model: str, o: EvalOptions) -> dict[str, Any]:
    from pipelines import ControlNetPipeline
    from pipelines.evaluation.controlnet import evaluate_controlnet, hint_images

    pipe = ControlNetPipeline.from_pretrained(o.base, device=o.device, controlnet=model)
    if o.deep_cache:
        pipe.enable_deep_cache(o.deep_cache)
    report: dict[str, Any] = {"base": o.base, "by_guidance": {}}
    for scale in o.guidance:
        report["by_guidance"][str(scale)], extra = evaluate_controlnet(pipe, o.count, o.seed + 4, o.steps, o.sampler,
                                                                       scale)
    maps = to_uint8(hint_images(extra["samples"][:8]))  # rows: map, output, the same prompt without the map
    image_grid([maps, extra["controlnet"][:8], extra["without_control"][:8]]).save(out / "controlnet-grid.png")
    (out / "controlnet-grid.txt").write_text("rows: map, output, without the ControlNet; columns: prompts\n"
                                             + "\n".join(s.full_caption for s in extra["samples"][:8]) + "\n")
    return report


_RUNNERS = {"text-to-image": _text_to_image, "super-resolution": _super_resolution, "semantic": _semantic,
            "classifier": _classifier, "clip": _clip,
            "controlnet": _controlnet}
