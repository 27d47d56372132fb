"""InpaintPipeline: an inpainting U-Net against diffusers' StableDiffusionInpaintPipeline on the same random
weights, and a text-to-image U-Net that keeps the known region."""

from __future__ import annotations

from pathlib import Path

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as diffusers_inpaint
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionInpaintPipeline
from PIL import Image
from sd_fixtures import diffusers_v1_pipeline, small_models

from pipelines import InpaintPipeline

PROMPT, NEGATIVE = "a large red circle in the top left on a white background", "a blue square"
DIFFUSERS_SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


def start_image(size: int = 16) -> Image.Image:
    y, x = np.indices((size, size))
    pixels = np.stack([(x + y) * 128 // size, 255 - x * 255 // size, (y * 16) % 256], axis=-1)
    pixels[size // 5: size // 2, size // 2: size - 2] = (240, 200, 40)
    return Image.fromarray(pixels.astype(np.uint8))


def mask_image(size: int = 16) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255  # generate here
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sd-inpaint")
    pipe = diffusers_v1_pipeline(tmp, in_channels=9)
    StableDiffusionInpaintPipeline(**pipe.components).save_pretrained(tmp / "sd")
    return tmp / "sd"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_an_inpainting_unet_gives_diffusers_image(inpainting_folder: Path, sampler: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same prompt, mask, latents and guidance. Ours encodes the masked image to the posterior mean (as its
    img2img does); diffusers samples the posterior with the generator, so its retrieve_latents is set to the mean
    ("argmax") here: otherwise this random VAE's posterior std (about 1) would separate the two."""
    real_retrieve = diffusers_inpaint.retrieve_latents
    monkeypatch.setattr(diffusers_inpaint, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": real_retrieve(output, generator, "argmax"))
    theirs = StableDiffusionInpaintPipeline.from_pretrained(inpainting_folder, local_files_only=True)
    theirs.scheduler = DIFFUSERS_SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, output_type="np",
                num_images_per_prompt=2)
    reference = theirs(PROMPT, image=start_image(), mask_image=mask_image(), latents=latents, height=16, width=16,
                       **call).images

    ours = InpaintPipeline.from_pretrained(inpainting_folder)
    assert ours.has_mask_input and ours.models.unet.config.in_channels == 9
    images = ours(PROMPT, start_image(), mask_image(), sampler=sampler, latents=latents, progress=False, **call).images
    assert images.shape == reference.shape == (2, 16, 16, 3) and reference.std() > 0.01
    assert np.abs(images - reference).max() <= 1e-3  # measured: 3.9e-6 (dpmpp_2m)


def test_an_inpainting_checkpoint_loads_from_a_single_file(inpainting_folder: Path, tmp_path: Path) -> None:
    ours = InpaintPipeline.from_pretrained(inpainting_folder)
    ours.models.save(tmp_path / "inpaint.safetensors", to="sd")
    again = InpaintPipeline.from_pretrained(tmp_path / "inpaint.safetensors")
    assert again.has_mask_input
    call = dict(num_inference_steps=4, output_type="np", seed=5, progress=False)
    a = ours(PROMPT, start_image(), mask_image(), **call).images
    b = again(PROMPT, start_image(), mask_image(), **call).images
    assert np.abs(a - b).max() <= 1e-5


class IdentityAutoencoder(torch.nn.Module):
    """Latents = the pixels (with a fourth channel of zeros), f = 1: what the sampler keeps, the image shows."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.config, self.anchor = vae.config, torch.nn.Parameter(torch.zeros(()))
        self.config.scale_factor = 1.0

    downsample_factor = 1

    def encode(self, x: torch.Tensor):
        from autoencoder.model import DiagonalGaussian

        mean = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :3]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler", "euler_a", "ddpm"])
def test_a_text_to_image_unet_keeps_the_known_region(sampler: str) -> None:
    models = small_models()
    models.vae = IdentityAutoencoder(models.vae)
    models.sample_size = 16
    pipe = InpaintPipeline(models)
    assert not pipe.has_mask_input
    image, mask = start_image(), mask_image()
    out = pipe("a red circle", image, mask, sampler=sampler, num_inference_steps=8, seed=1, progress=False,
               output_type="np").images[0]
    keep = np.asarray(mask) == 0
    known = np.asarray(image).astype(np.float64) / 255
    assert np.abs(out[keep] - known[keep]).max() <= 1 / 255  # the known region, after decode
    assert np.abs(out[~keep] - known[~keep]).mean() > 0.05  # the hole was generated anew


def test_mask_blur_softens_the_edge_and_bad_masks_are_named() -> None:
    models = small_models()
    pipe = InpaintPipeline(models)
    _, soft = pipe._inputs(start_image(), mask_image(), 1.5)
    values = soft.unique()
    assert soft.min() == 0 and soft.max() > 0.9 and ((values > 0) & (values < 1)).sum() > 3
    with pytest.raises(ValueError, match=r"mask_image is 8x8 \(1 mask\(s\)\); allowed: the image's size 16x16"):
        pipe("x", start_image(), mask_image(8))
    with pytest.raises(ValueError, match=r"strength=2.0 is out of range; allowed: a finite number in \(0, 1\]"):
        pipe("x", start_image(), mask_image(), strength=2.0)
    with pytest.raises(ValueError, match=r"mask_blur=-1.0 is out of range"):
        pipe("x", start_image(), mask_image(), mask_blur=-1.0)
    models.unet.config.in_channels = 5
    with pytest.raises(ValueError, match=r"this U-Net takes 5 input channels; allowed for inpainting: 4 .* or 9"):
        pipe("x", start_image(), mask_image())


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "euler_a"])
def test_known_region_alone_ends_on_the_known_latents(sampler: str) -> None:
    """The denoiser-level hold, without the pipeline's final paste: samplers that end at σ = 0 land on the known
    latents exactly where the mask is 0 (x̂_0 there is the known latents at every step), elsewhere they do not."""
    from ldm.diffusion import NoiseSchedule, sample
    from ldm.diffusion.inpainting import KnownRegion

    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    known, noise = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.8 * torch.tanh(0.6 * x + torch.sin(t.view(-1, 1, 1, 1) / 97.0))

    from ldm.diffusion import Denoiser

    held = KnownRegion(Denoiser(net, schedule), known, mask)
    out = sample(sampler, held, noise, schedule, 12, generator=torch.Generator().manual_seed(1))
    keep = mask.expand_as(out) == 0
    assert (out[keep] - known[keep]).abs().max() <= 1e-5
    assert (out[~keep] - known[~keep]).abs().mean() > 0.1
