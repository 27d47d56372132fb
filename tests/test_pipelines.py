"""Every conditioning path end to end on small random-weight models, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import small_models

from pipelines import (
    ClassifierGuidedPipeline,
    ImageToImagePipeline,
    SemanticToImagePipeline,
    SuperResolutionPipeline,
    TextToImagePipeline,
)
from pipelines.images import image_tensor

FAST = dict(num_inference_steps=3, progress=False)


@pytest.fixture(scope="module")
def t2i() -> TextToImagePipeline:
    return TextToImagePipeline(small_models())


def test_image_to_image_keeps_more_of_the_image_at_low_strength(t2i: TextToImagePipeline) -> None:
    pipe = ImageToImagePipeline(t2i.models)
    image = Image.fromarray((np.indices((16, 16)).sum(0) * 8 % 256).astype(np.uint8)[..., None].repeat(3, -1))
    latents = pipe.models.vae.encode(image_tensor(image)).mean * pipe.models.vae.config.scale_factor
    reference = pipe.decode(latents, "np").images  # the image as the autoencoder reproduces it
    gaps = [np.abs(pipe("a red circle", image, strength=s, output_type="np", num_inference_steps=10,
                        progress=False).images - reference).mean() for s in (0.2, 1.0)]
    assert gaps[0] < gaps[1]


def test_super_resolution_upscales_by_the_model_factor() -> None:
    pipe = SuperResolutionPipeline(small_models(concat={"kind": "image", "upscale": 3}, text=False))
    low = Image.new("RGB", (8, 8), (220, 30, 30))
    out = pipe(low, **FAST).images[0]
    assert out.size == (24, 24)
    with pytest.raises(ValueError, match="image has mode 'L'; allowed: 'RGB'"):
        pipe(Image.new("L", (8, 8)), **FAST)
    with pytest.raises(ValueError, match=r"image of size 5x5 is not allowed"):
        pipe(Image.new("RGB", (5, 5)), **FAST)
    with pytest.raises(ValueError, match="prompt='a cat' is not allowed: this model has no text encoder"):
        pipe(low, prompt="a cat", **FAST)


def test_semantic_map_to_image_with_and_without_prompt() -> None:
    pipe = SemanticToImagePipeline(small_models(concat={"kind": "semantic", "num_classes": 4}))
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[4:12, 4:12] = 2
    plain = pipe(Image.fromarray(labels, mode="L"), output_type="np", **FAST).images
    prompted = pipe(labels, prompt="a green square", guidance_scale=3.0, output_type="np", **FAST).images
    assert plain.shape == prompted.shape == (1, 16, 16, 3) and not np.allclose(plain, prompted)
    labels[0, 0] = 7
    with pytest.raises(ValueError, match=r"semantic map has label 7; allowed: labels 0\.\.3 of this model"):
        pipe(labels, **FAST)


def test_classifier_guidance_with_cfg() -> None:
    pipe = ClassifierGuidedPipeline(small_models(classifier=True))
    call = dict(prompt="a shape", guidance_scale=3.0, output_type="latent", **FAST)
    unguided = pipe("square", classifier_scale=0.0, **call).images
    guided = pipe("square", classifier_scale=50.0, **call).images
    assert (guided - unguided).abs().max() > 1e-3
    torch.testing.assert_close(pipe(1, classifier_scale=0.0, **call).images, unguided)
    with pytest.raises(ValueError, match="class_label='hexagon' is not allowed; allowed: circle, square, triangle"):
        pipe("hexagon", **call)
    with pytest.raises(ValueError, match=r"class_label=5 is not allowed; allowed: 0\.\.2"):
        pipe(5, **call)


def test_tiled_decode_at_four_times_the_area(t2i: TextToImagePipeline) -> None:
    whole = t2i("a red circle", height=32, width=32, output_type="np", **FAST).images
    tiled = t2i("a red circle", height=32, width=32, output_type="np", tile=8, **FAST).images
    assert tiled.shape == whole.shape == (1, 32, 32, 3)
    assert np.abs(tiled - whole).mean() < 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 15}, "height=15 is not allowed; allowed: a positive multiple of 2"),
        ({"width": 0}, "width=0 is not allowed"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0 is out of range; allowed: an integer in \[1, 1000\]"),
        ({"guidance_scale": -1.0}, r"guidance_scale=-1.0 is out of range; allowed: \[0, inf\]"),
        ({"sampler": "plms"}, "sampler='plms' is not supported; allowed: 'ddpm', 'ddim'"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt=0 is out of range"),
        ({"output_type": "jpeg"}, "output_type='jpeg' is not supported; allowed: 'pil', 'np', 'pt', 'latent'"),
    ],
)
def test_bad_arguments(t2i: TextToImagePipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        t2i("a red circle", **{"num_inference_steps": 2, "progress": False, **kwargs})


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")
