"""diffusers' calling conventions on our pipelines (generator=, callback_on_step_end, prompt_embeds, torch_dtype,
components, save_pretrained) and the memory switches, on the small random SD v1 model diffusers saved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines import TextToImagePipeline

PROMPT = "a large red circle in the top left on a white background"
CALL = dict(num_inference_steps=6, output_type="np", progress=False)


@pytest.fixture(scope="module")
def ours(folder: Path) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(folder)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_a_list_of_generators_gives_each_image_its_own(ours: TextToImagePipeline, sampler: str) -> None:
    seeds = [3, 11, 7]
    batch = ours(PROMPT, num_images_per_prompt=3, sampler=sampler,
                 generator=[torch.Generator().manual_seed(s) for s in seeds], **CALL)
    assert batch.seed == seeds
    for row, seed in enumerate(seeds):
        alone = ours(PROMPT, sampler=sampler, generator=torch.Generator().manual_seed(seed), **CALL)
        assert alone.seed == seed
        assert np.abs(batch.images[row] - alone.images[0]).max() <= 1e-5  # a batch of 3 vs of 1: rounding only
    assert np.abs(batch.images[0] - batch.images[1]).max() > 1e-2
    with pytest.raises(ValueError, match=r"generator is a list of 2; allowed: one generator per image \(3\)"):
        ours(PROMPT, num_images_per_prompt=3, generator=[torch.Generator(), torch.Generator()], **CALL)
    with pytest.raises(ValueError, match="seed and generator are both given"):
        ours(PROMPT, seed=1, generator=torch.Generator(), **CALL)


def test_a_generator_draws_what_diffusers_draws(folder: Path, ours: TextToImagePipeline) -> None:
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    from diffusers import DPMSolverMultistepScheduler

    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    reference = theirs(PROMPT, num_inference_steps=6, height=16, width=16, output_type="np",
                       generator=torch.Generator().manual_seed(21)).images
    images = ours(PROMPT, generator=torch.Generator().manual_seed(21), **CALL).images
    assert np.abs(images - reference).max() <= 1e-3


def test_without_a_seed_each_call_draws_one_and_reports_it(ours: TextToImagePipeline) -> None:
    first, second = ours(PROMPT, **CALL), ours(PROMPT, **CALL)
    assert isinstance(first.seed, int) and first.seed != second.seed
    assert np.abs(first.images - second.images).max() > 1e-2
    again = ours(PROMPT, seed=first.seed, **CALL)
    assert np.array_equal(again.images, first.images)


def test_callback_on_step_end_sees_each_steps_latents(ours: TextToImagePipeline) -> None:
    seen = []

    def on_end(pipe, step, timestep, kwargs):
        assert pipe is ours
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        return kwargs

    latents = ours(PROMPT, seed=1, callback_on_step_end=on_end, **{**CALL, "output_type": "latent"}).images
    assert [s for s, _, _ in seen] == list(range(6)) and all(shape == (1, 4, 8, 8) for *_, shape in seen)
    assert [t for _, t, _ in seen] == sorted((t for _, t, _ in seen), reverse=True)
    assert latents.shape == (1, 4, 8, 8)


def test_prompt_embeds_stand_for_the_text(ours: TextToImagePipeline) -> None:
    cond, uncond = ours.encode_prompts([PROMPT], ["a blue square"])
    by_text = ours(PROMPT, negative_prompt="a blue square", seed=4, **CALL).images
    by_embeds = ours(prompt_embeds=cond, negative_prompt_embeds=uncond, seed=4, **CALL).images
    assert np.array_equal(by_text, by_embeds)
    long_negative = ours.encode_prompts(["a blue square " * 30])[0]  # 2 chunks: the prompt is padded to match
    assert ours(prompt_embeds=cond, negative_prompt_embeds=long_negative, seed=4, **CALL).images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="prompt and prompt_embeds are both given"):
        ours(PROMPT, prompt_embeds=cond, **CALL)


def test_components_dtype_and_save_pretrained(folder: Path, ours: TextToImagePipeline, tmp_path: Path) -> None:
    assert ours.unet is ours.models.unet and ours.vae is ours.models.vae
    assert ours.text_encoder is ours.models.text_encoder and ours.tokenizer is ours.models.tokenizer
    assert ours.scheduler.num_train_timesteps == 1000
    half = TextToImagePipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert next(half.unet.parameters()).dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    assert half(PROMPT, seed=2, **CALL).images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="dtype='float16' is not allowed"):
        TextToImagePipeline.from_pretrained(folder, torch_dtype="float16")
    ours.save_pretrained(tmp_path / "saved")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert set(theirs.components) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def test_attention_and_vae_slicing_keep_the_images(ours: TextToImagePipeline) -> None:
    plain = ours(PROMPT, num_images_per_prompt=2, seed=8, **CALL).images
    ours.enable_attention_slicing("max")
    ours.enable_vae_slicing()
    try:
        sliced = ours(PROMPT, num_images_per_prompt=2, seed=8, **CALL).images
    finally:
        ours.disable_attention_slicing()
        ours.disable_vae_slicing()
    assert np.abs(sliced - plain).max() <= 1e-5


def test_vae_tiling_is_the_default_tile_of_a_call(ours: TextToImagePipeline) -> None:
    called = ours(PROMPT, seed=8, tile=8, **{**CALL, "output_type": "pt"}).images
    ours.enable_vae_tiling(8)
    try:
        switched = ours(PROMPT, seed=8, **{**CALL, "output_type": "pt"}).images
    finally:
        ours.disable_vae_tiling()
    assert torch.equal(called, switched)


def test_cpu_offload_without_a_gpu_says_so(ours: TextToImagePipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for switch in (ours.enable_model_cpu_offload, ours.enable_sequential_cpu_offload):
        with pytest.raises(ValueError, match="CPU offload moves models to a GPU while they run; this machine has no"):
            switch()


_DECODE = """
import resource, sys, torch
from autoencoder import AutoencoderConfig, AutoencoderKL
from pipelines.memory import MemorySwitches
torch.manual_seed(0)
switches = MemorySwitches()
switches.models = type("M", (), {"vae": AutoencoderKL(AutoencoderConfig(base_channels=32)).eval()})()
if sys.argv[1] == "tiled":
    switches.enable_vae_tiling(32)
with torch.no_grad():
    switches.decode_latents(torch.randn(1, 4, 128, 128), None)  # a 1024x1024 image, SD's f = 8 layout
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_vae_tiling_lowers_the_peak_memory_of_a_1024_decode() -> None:
    """Each decode in its own process, so that each peak is its own (resident set, KiB); the images tiling gives
    are checked against untiled decoding in test_autoencoder (test_tiled_decode_matches_untiled)."""
    import subprocess
    import sys

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    peak = {mode: int(subprocess.run([sys.executable, "-c", _DECODE, mode], capture_output=True, text=True, env=env,
                                     check=True).stdout.split()[-1]) for mode in ("whole", "tiled")}
    assert peak["tiled"] < 0.6 * peak["whole"], peak  # measured: 2927 MB whole, 816 MB tiled (the whole process)
