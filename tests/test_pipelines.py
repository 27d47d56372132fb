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

FAST = dict(num_inference_steps=3, progress=False, seed=0)  # seeded: calls are compared


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
        ({"guidance_scale": -1.0}, r"guidance_scale=-1.0 is out of range; allowed: a finite number in \[0, inf\)"),
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


# --- against hand-run samplers: diffusers' schedulers step, the guidance and the concat condition are computed here
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)  # small_models()' ScheduleConfig


def diffusers_scheduler(sampler: str, steps: int):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}[sampler]
    scheduler = kind.from_config(DDIMScheduler(**SD_SCHEDULER).config)
    scheduler.set_timesteps(steps)
    return scheduler


def hand_run(sampler: str, steps: int, noise: torch.Tensor, epsilon) -> torch.Tensor:
    """The diffusers scheduler's loop with ``epsilon(x_t, t, √(1-ᾱ_t))`` as the model: the VP latents at the end."""
    scheduler = diffusers_scheduler(sampler, steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_t = scheduler.scale_model_input(x, t)
        if sampler == "euler":  # x_t = x / √(σ²+1): √(1-ᾱ_t) = σ / √(σ²+1)
            sigma = scheduler.sigmas[i]
            noise_std = sigma / (sigma**2 + 1).sqrt()
        else:
            noise_std = (1 - scheduler.alphas_cumprod[int(t)]).sqrt()
        x = scheduler.step(epsilon(x_t, torch.full((x.shape[0],), float(t)), float(noise_std)), t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_classifier_guidance_equals_the_formula_by_hand(sampler: str, guidance_scale: float) -> None:
    """Dhariwal & Nichol 2021, Alg. 2 / eq. 14: ε̂ = ε − s·√(1−ᾱ_t)·∇_{x_t} log p(y | x_t), with torch.autograd on
    the classifier here, over CFG's ε = ε_u + g·(ε_c − ε_u) when g > 1, stepped by diffusers' scheduler."""
    models = small_models(classifier=True)
    pipe, scale, label = ClassifierGuidedPipeline(models), 30.0, 1
    context = models.text_encoder(models.tokenizer(["a shape", ""]))  # (2, 77, D): cond, uncond

    def epsilon(x_t: torch.Tensor, t: torch.Tensor, noise_std: float, classifier_scale: float = scale) -> torch.Tensor:
        with torch.no_grad():
            cond = models.unet(x_t, t, context[:1])
            eps = cond if guidance_scale == 1 else (u := models.unet(x_t, t, context[1:])) + guidance_scale * (cond - u)
        x = x_t.detach().requires_grad_(True)
        log_p = torch.log_softmax(models.classifier(x, t), dim=-1)[0, label]
        return eps - classifier_scale * noise_std * torch.autograd.grad(log_p, x)[0]

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # what seed=5 draws
    call = dict(prompt="a shape", guidance_scale=guidance_scale, sampler=sampler, num_inference_steps=4, seed=5,
                output_type="latent", progress=False)
    ours = pipe("square", classifier_scale=scale, **call).images
    by_hand = hand_run(sampler, 4, noise, epsilon)
    unguided = hand_run(sampler, 4, noise, lambda x_t, t, std: epsilon(x_t, t, std, 0.0))
    # measured max |ours - by hand|: DDIM 1.0e-5 / 3.4e-5 (g = 1 / 3), Euler 4.6e-5 / 2.5e-4 (2.7e-5 relative: Euler
    # takes t(σ) by inverting σ in float64 where diffusers passes its float32 grid; the U-Net's fused ×2 upsampling
    # convolves batch 2 and batch 1 in other summation orders); the guidance term moves the result by 0.67 (g = 1) and
    # 3.0 (g = 3), so a guidance off by more than ~0.1% fails
    torch.testing.assert_close(ours, by_hand, rtol=1e-4, atol=3e-4)
    assert (by_hand - unguided).abs().max() > 0.5


def test_semantic_condition_and_output_equal_a_hand_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The U-Net's extra input channels at every step are the label map's one-hot averaged over each latent
    pixel's 2×2 block (counted here in numpy), and the image is diffusers' DPM-Solver++(2M) run by hand with the
    U-Net fed [x_t, that condition], decoded by the VAE."""
    models = small_models(concat={"kind": "semantic", "num_classes": 4})
    pipe, labels = SemanticToImagePipeline(models), np.zeros((16, 16), dtype=np.uint8)
    labels[3:11, 5:13], labels[10:, :7], labels[:3, 11:] = 2, 3, 1  # edges off the 2×2 grid: fractional cells
    blocks = labels.reshape(8, 2, 8, 2)  # (h, 2, w, 2): latent pixel (i, j) covers labels[2i:2i+2, 2j:2j+2]
    expected = torch.from_numpy(np.stack([(blocks == k).mean(axis=(1, 3)) for k in range(4)])[None]).float()
    assert sorted(set(expected.flatten().tolist())) == [0.0, 0.25, 0.5, 0.75, 1.0]

    seen, forward = [], models.unet.forward

    def spy(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(x[:, 4:].clone())
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(models.unet, "forward", spy)
    ours = pipe(labels, num_inference_steps=4, seed=3, output_type="np", progress=False).images
    monkeypatch.undo()
    assert len(seen) == 4
    for condition in seen:
        torch.testing.assert_close(condition, expected, rtol=0, atol=1e-6)

    context = models.text_encoder(models.tokenizer([""]))

    @torch.no_grad()
    def epsilon(x_t: torch.Tensor, t: torch.Tensor, noise_std: float) -> torch.Tensor:
        return models.unet(torch.cat([x_t, expected], dim=1), t, context)

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = hand_run("dpmpp_2m", 4, noise, epsilon)
    with torch.no_grad():
        by_hand = (models.vae.decode(latents / models.vae.config.scale_factor) / 2 + 0.5).clamp(0, 1)
    # measured: 8.3e-7 max abs on an image of std 0.27; area- vs nearest-resizing the map differs by ≥ 0.25 per cell
    assert np.abs(ours - by_hand.permute(0, 2, 3, 1).numpy()).max() <= 1e-4 and by_hand.std() > 0.1
