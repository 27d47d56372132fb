"""Each sampler through the whole text-to-image pipeline against diffusers' StableDiffusionPipeline with the
scheduler of the same name, on SD v1 and v2-layout random weights: same prompt, latents, generator, guidance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from sd_fixtures import small_v2_models

from pipelines import TextToImagePipeline

PROMPT, NEGATIVE = "a large red circle in the top left on a white background", "a blue square"
SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
KARRAS = ("euler", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "heun", "lms", "unipc")  # diffusers' use_karras_sigmas


@pytest.fixture(scope="module")
def v2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("v2") / "sd"
    small_v2_models().save(path, to="diffusers")
    return path


def cases() -> list[tuple[str, str | None]]:
    return [(s, None) for s in SCHEDULERS] + [(s, "karras") for s in KARRAS]


@pytest.mark.parametrize("layout", ["v1", "v2"])
@pytest.mark.parametrize(("sampler", "spacing"), cases())
def test_pipeline_images_equal_diffusers(folder: Path, v2_folder: Path, layout: str, sampler: str,
                                         spacing: str | None) -> None:
    path = folder if layout == "v1" else v2_folder
    theirs = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    cls, extra = SCHEDULERS[sampler]
    if spacing == "karras":
        extra = {**extra, "use_karras_sigmas": True}
    if sampler == "dpmpp_sde":  # diffusers seeds its Brownian tree from torch's global RNG unless told; ours draws
        # that seed from the call's generator (its first draw here, as latents are given)
        extra = {**extra, "noise_sampler_seed": int(torch.randint(0, 2**63 - 1, (),
                                                                  generator=torch.Generator().manual_seed(5)))}
    theirs.scheduler = cls.from_config(theirs.scheduler.config, **extra)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    steps = 20 if sampler != "lcm" else 4
    reference = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                       latents=latents.clone(), generator=torch.Generator().manual_seed(5), height=16, width=16,
                       output_type="np").images
    ours = TextToImagePipeline.from_pretrained(path)
    images = ours(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, sampler=sampler,
                  sigma_spacing=spacing, latents=latents, generator=torch.Generator().manual_seed(5),
                  output_type="np", progress=False).images
    assert images.shape == reference.shape == (1, 16, 16, 3) and reference.std() > 0.01
    assert np.abs(images - reference).max() <= 1e-4 * max(1.0, reference.std())
