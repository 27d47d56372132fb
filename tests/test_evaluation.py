"""``ldm eval``: the adherence scores against rendered (ground-truth) images, the metrics
against oracle and blank "models", and the whole run on small random models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sd_fixtures import randomize, small_models

from ldm.data.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapeObject, make_sample, render
from ldm_toolkit.cli import main
from pipelines.evaluation import score_adherence, summarize_adherence
from pipelines.evaluation.classifier import evaluate_classifier_guidance
from pipelines.evaluation.controlnet import evaluate_controlnet
from pipelines.evaluation.spatial import evaluate_semantic, evaluate_super_resolution, heldout_samples, psnr
from pipelines.evaluation.text_to_image import heldout_prompts


def test_rendered_images_adhere_to_their_own_captions() -> None:
    for i in range(60):
        s = make_sample(1000, i, two_object_prob=0.5)
        assert score_adherence(s.caption, s.image)["whole"], s.caption
        assert score_adherence(s.full_caption, s.image)["whole"], s.full_caption


def test_a_wrong_attribute_is_caught_and_counted_once() -> None:
    image, _ = render("white", [ShapeObject("circle", "red", "large", "top left", (16, 16), (3, 3, 29, 29))], 64)
    scores = score_adherence("a large blue circle in the top left on a white background", image)
    assert scores["colour"] is False and scores["shape"] and scores["size"] and scores["position"]
    assert scores["background"] and scores["whole"] is False
    assert score_adherence("a red circle", image)["size"] is None  # not stated
    summary = summarize_adherence([scores, score_adherence("a red circle", image)])
    assert summary["colour"] == 0.5 and summary["whole"] == 0.5
    assert summary["attributes"] == pytest.approx(6 / 7)  # 7 stated attributes, one wrong


def test_shape_accuracy_is_also_kept_per_stated_class() -> None:
    image, _ = render("white", [ShapeObject("circle", "red", "large", "top left", (16, 16), (3, 3, 29, 29))], 64)
    scores = [score_adherence(caption, image) for caption in ("a red square", "a red circle", "a red square")]
    assert scores[0]["shape_square"] is False and scores[1]["shape_circle"] is True
    summary = summarize_adherence(scores)
    assert summary["shape_square"] == 0.0 and summary["shape_circle"] == 1.0 and "shape_triangle" not in summary
    assert summary["shape"] == pytest.approx(1 / 3) and summary["attributes"] == pytest.approx(4 / 6)


def test_a_swapped_relation_fails_the_relation_only() -> None:
    s = next(make_sample(1000, i, two_object_prob=1.0, drop_prob=0.0) for i in range(50)
             if " to the left of " in make_sample(1000, i, two_object_prob=1.0, drop_prob=0.0).caption)
    swapped = s.caption.replace(" to the left of ", " to the right of ")
    scores = score_adherence(swapped, s.image)
    assert scores["objects"] and scores["relation"] is False and scores["whole"] is False


def test_a_blank_image_fails_everything_stated() -> None:
    blank = np.full((64, 64, 3), 128, np.uint8)
    scores = score_adherence("a small red square at the top on a gray background", blank)
    assert scores["background"] and not any(scores[k] for k in ("shape", "colour", "size", "position", "count"))


def test_heldout_prompts_are_not_the_training_stream() -> None:
    train = {make_sample(0, i, 0.4, 0.5).caption for i in range(300)}
    assert heldout_prompts(300, 1000) != [make_sample(0, i, 0.4, 0.5).caption for i in range(300)]
    assert len(set(heldout_prompts(300, 1000)) - train) > 0


def test_psnr_matches_its_definition() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = a + 0.1
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0))


class Oracle:
    """A stand-in pipeline that returns the true image of each held-out sample (or a blank one)."""

    def __init__(self, samples: list, blank: bool = False) -> None:
        self.samples, self.blank, self.calls = samples, blank, 0

    def __call__(self, condition: torch.Tensor, **_: object) -> SimpleNamespace:
        batch = self.samples[self.calls * 64:self.calls * 64 + len(condition)]
        self.calls += 1
        images = np.stack([np.full_like(s.image, 255) if self.blank else s.image for s in batch]).astype(np.float32)
        images /= 255
        as_tensor = _["output_type"] == "pt"
        return SimpleNamespace(images=torch.from_numpy(images).permute(0, 3, 1, 2) if as_tensor else images)


def test_super_resolution_metrics_on_an_oracle() -> None:
    samples = [make_sample(1000, i, 0.4) for i in range(70)]
    report, _ = evaluate_super_resolution(Oracle(samples), 70, 1000, steps=1, sampler="ddim")
    assert report["psnr_model_db"] >= 99  # identical images: MSE clamped at 1e-10
    assert report["psnr_gain_db"] > 2  # bicubic loses the edges
    assert report["downsample_consistency_mae"] <= 0.5 / 255  # only the 16×16 copy's rounding


def test_semantic_metrics_on_an_oracle_and_a_blank_model() -> None:
    samples = [make_sample(1000, i, 0.4) for i in range(20)]
    report, _ = evaluate_semantic(Oracle(samples), 20, 1000, steps=1, sampler="ddim")
    assert report["foreground_iou"] == 1.0 and report["region_class_accuracy"] == 1.0
    report, _ = evaluate_semantic(Oracle(samples, blank=True), 20, 1000, steps=1, sampler="ddim")
    assert report["foreground_iou"] == 0.0 and report["region_class_accuracy"] == 0.0


class MapPainter:
    """A stand-in ControlNet pipeline: returns each scene's own image (``colour``: with its objects recoloured to
    another colour; ``blank``: white), and counts the calls without control."""

    def __init__(self, samples: list, recolour: bool = False, blank: bool = False) -> None:
        self.by_caption = {s.full_caption: s for s in samples}
        self.recolour, self.blank, self.uncontrolled = recolour, blank, 0

    def __call__(self, prompts: list[str], hints: torch.Tensor, controlnet_conditioning_scale: float,
                 **_: object) -> SimpleNamespace:
        self.uncontrolled += controlnet_conditioning_scale == 0
        images = []
        for prompt in prompts:
            s = self.by_caption[prompt]
            objects = [dataclasses.replace(o, colour=_other_colour(o.colour, s.background)) for o in s.objects]
            image = render(s.background, objects, 64)[0] if self.recolour else s.image
            images.append(np.full_like(image, 255) if self.blank else image)
        return SimpleNamespace(images=np.stack(images).astype(np.float32) / 255)


def _other_colour(colour: str, background: str) -> str:
    return next(c for c in COLOURS if c not in (colour, background))


def test_controlnet_metrics_separate_the_map_from_the_prompt() -> None:
    samples = heldout_samples(40, 1004, two_object_prob=0.5)
    assert len({len(s.objects) for s in samples}) == 2  # one- and two-object scenes
    exact = MapPainter(samples)
    report, _ = evaluate_controlnet(exact, 40, 1004, steps=1, sampler="ddim")
    assert exact.uncontrolled == 1  # the baseline: one batch of 40 at control scale 0
    assert report["controlnet"]["foreground_iou"] == 1.0 and report["controlnet"]["colour_and_shape"] == 1.0
    assert report["controlnet"]["objects"] == sum(len(s.objects) for s in samples)
    recoloured, _ = evaluate_controlnet(MapPainter(samples, recolour=True), 40, 1004, 1, "ddim", baseline=False)
    # the layout is right and the colours are not: IoU stays 1, colour accuracy falls to 0, shape stays 1
    scores = recoloured["controlnet"]
    assert scores["foreground_iou"] == 1.0 and scores["colour_accuracy"] == 0.0 and scores["shape_accuracy"] == 1.0
    assert "without_control" not in recoloured
    blank, _ = evaluate_controlnet(MapPainter(samples, blank=True), 40, 1004, 1, "ddim", baseline=False)
    assert blank["controlnet"]["foreground_iou"] == 0.0 and blank["controlnet"]["colour_accuracy"] == 0.0


class ShapeDrawer:
    """A stand-in classifier-guided pipeline: draws the target shape when guided, else circles."""

    models = SimpleNamespace(class_names=list(SHAPES))

    def __call__(self, name: str, classifier_scale: float, num_images_per_prompt: int, **_: object) -> SimpleNamespace:
        shape = name if classifier_scale > 0 else "circle"
        obj = ShapeObject(shape, "red", "large", "center", (32, 32), (19, 19, 45, 45))
        image, _ = render(list(BACKGROUNDS)[0], [obj], 64)
        return SimpleNamespace(images=np.stack([image] * num_images_per_prompt).astype(np.float32) / 255)


def test_classifier_guidance_metric() -> None:
    report, _ = evaluate_classifier_guidance(ShapeDrawer(), 30, 0, [0.0, 5.0], steps=1, sampler="ddim")
    assert report["by_scale"]["5.0"]["target_accuracy"] == 1.0
    assert report["by_scale"]["0.0"]["target_accuracy"] == pytest.approx(1 / 3)
    assert report["by_scale"]["0.0"]["shape_shares"]["circle"] == 1.0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    paths = {"text-to-image": root / "t2i", "super-resolution": root / "sr", "semantic": root / "sem",
             "classifier": root / "cls"}
    small_models().save(paths["text-to-image"])
    small_models(concat={"kind": "image", "upscale": 4}, text=False).save(paths["super-resolution"])
    small_models(concat={"kind": "semantic", "num_classes": 4}, text=False).save(paths["semantic"])
    small_models(classifier=True, text=False).save(paths["classifier"])
    from ldm.modules.clip import ClipConfig, build_clip, save_clip

    paths["clip"] = root / "clip"
    torch.manual_seed(0)
    tiny = ClipConfig(text={"width": 32, "layers": 1, "heads": 2, "max_length": 32}, image_size=32, vision_width=32,
                      vision_layers=1, vision_heads=2, projection_dim=16)
    save_clip(build_clip(tiny), paths["clip"])
    from ldm.io.controlnet_keys import write_controlnet_diffusers
    from ldm.modules.controlnet import ControlNet
    from pipelines import load_models

    net = ControlNet.from_unet(load_models(paths["text-to-image"]).unet, hint_block_channels=(8, 16))
    randomize(net, 3)  # nonzero zero-convs, so that the control changes the image
    paths["controlnet"] = root / "controlnet"
    write_controlnet_diffusers(net, paths["controlnet"])
    return paths


@pytest.mark.parametrize("task", ["text-to-image", "super-resolution", "semantic", "classifier", "clip", "controlnet"])
def test_ldm_eval_writes_report_and_pictures(task: str, small: dict[str, Path], tmp_path: Path, capsys) -> None:
    code = main(["eval", task, "--model", str(small[task]), "-o", str(tmp_path), "--count", "6", "--steps", "2",
                 "--guidance", "1,3", "--clip", str(small["clip"]), "--base", str(small["text-to-image"])])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / f"{task}.json").read_text())
    assert report["task"] == task
    if task == "clip":  # a report only: hard-negative accuracy per kind, each a share of its pairs
        assert report["images"] == 6 and all(0 <= e["accuracy"] <= 1 for e in report["by_kind"].values())
        return
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pictures and all((tmp_path / p).stat().st_size > 0 for p in pictures)
    if task == "text-to-image":
        assert list(report["by_guidance"]) == ["1.0", "3.0"] and "text-to-image-adherence.png" in pictures
        assert {"clip_score", "hard_negative", "by_kind"} <= set(report["by_guidance"]["3.0"]["clip"])
    if task == "controlnet":  # with and without the ControlNet, per scale; the grid's rows: map, output, baseline
        assert report["base"] == str(small["text-to-image"]) and list(report["by_guidance"]) == ["1.0", "3.0"]
        entry = report["by_guidance"]["3.0"]
        assert entry["pairs"] == 6 and {"controlnet", "without_control"} <= set(entry)
        assert "controlnet-grid.png" in pictures


@pytest.mark.parametrize("args, needle", [
    (["eval", "text-to-image", "--guidance", "1,x"], "--guidance"),
    (["eval", "text-to-image", "--count", "0"], "--count=0"),
    (["eval", "nonsense"], "invalid choice"),
])
def test_ldm_eval_bad_input_is_one_line(args: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) if "--count" not in args else _nothing():
        code = main(args)
        assert code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False
