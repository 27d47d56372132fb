"""ControlNet: our module, conversion and pipeline against diffusers' ControlNetModel and
StableDiffusionControlNetPipeline on the same random weights (SD layout, small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file
from sd_fixtures import randomize

from ldm.io.controlnet_keys import (
    controlnet_diffusers_to_original,
    controlnet_original_to_diffusers,
    read_controlnet,
    write_controlnet_diffusers,
)
from ldm.modules.controlnet import ControlNet
from pipelines import ControlNetPipeline, TextToImagePipeline
from pipelines.controlnet import as_controlnet

SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
PROMPT, NEGATIVE = "a red circle", "blurry"
HINT_CHANNELS = (16, 32)  # one stride-2 conv: the hint is 2x the latents, as the fixture's f=2 autoencoder


@pytest.fixture(scope="module")
def references(folder: Path) -> list[ControlNetModel]:
    """Two diffusers ControlNets made from the fixture's U-Net, every weight random (zero convs included)."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    nets = []
    for seed in (7, 8):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
        randomize(net, seed)
        nets.append(net.eval())
    return nets


@pytest.fixture(scope="module")
def ours(folder: Path) -> ControlNetPipeline:
    return ControlNetPipeline.from_pretrained(folder)


def control_images() -> tuple[Image.Image, torch.Tensor]:
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    tensor = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return pil, tensor


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_equal_diffusers(references: list[ControlNetModel], guess_mode: bool) -> None:
    reference = references[0]
    net = as_controlnet(reference)
    assert set(net.state_dict()) >= {"input_hint_block.0.weight", "zero_convs.0.0.weight", "middle_block_out.0.bias"}
    g = torch.Generator().manual_seed(3)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    context, t = torch.randn(2, 77, 32, generator=g), torch.tensor([801.0, 41.0])
    with torch.no_grad():
        down, mid = reference(x, t, encoder_hidden_states=context, controlnet_cond=hint, conditioning_scale=0.7,
                              guess_mode=guess_mode, return_dict=False)
        our_down, our_mid = net(x, hint, t, context, conditioning_scale=0.7, guess_mode=guess_mode)
    assert len(our_down) == len(down) == 4
    for a, b in zip([*our_down, our_mid], [*down, mid]):
        assert a.shape == b.shape
        assert b.abs().max() > 0
        assert relative(a, b) <= 1e-5


def test_unet_residuals_equal_diffusers(folder: Path, ours: ControlNetPipeline) -> None:
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    g = torch.Generator().manual_seed(4)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor(500.0)
    down = [torch.randn(2, c, s, s, generator=g) for c, s in ((32, 8), (32, 8), (32, 4), (64, 4))]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    with torch.no_grad():
        expected = unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours.unet(x, t, context, down_residuals=down, mid_residual=mid)
        plain = ours.unet(x, t, context)
    assert relative(got, expected) <= 1e-5
    assert relative(got, plain) > 1e-2  # the residuals matter


def test_from_unet_copies_the_encoder_and_changes_nothing(ours: ControlNetPipeline) -> None:
    net = ControlNet.from_unet(ours.unet, hint_block_channels=HINT_CHANNELS)
    unet_state = ours.unet.state_dict()
    for key, value in net.state_dict().items():
        if key.split(".")[0] in ("input_blocks", "middle_block", "time_embed"):
            assert torch.equal(value, unet_state[key]), key
        elif key.startswith(("zero_convs", "middle_block_out", f"input_hint_block.{4 * len(HINT_CHANNELS) - 2}")):
            assert not value.any(), key
    pil, _ = control_images()
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=3, sampler="ddim", output_type="latent",
                latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), progress=False)
    plain = TextToImagePipeline.__call__(ours, PROMPT, **call).images
    ours.controlnet = net
    try:
        controlled = ours(PROMPT, image=pil, **call).images
    finally:
        ours.controlnet = None
    assert torch.equal(controlled, plain)


CASES = [  # (nets, guess_mode, start, end, sampler, guidance_scale)
    (1, False, 0.0, 1.0, "ddim", 7.5),
    (1, False, 0.2, 0.8, "dpmpp_2m", 7.5),
    (1, True, 0.2, 0.8, "ddim", 7.5),
    (1, True, 0.0, 1.0, "dpmpp_2m", 1.0),
    (2, False, [0.2, 0.0], [0.8, 0.5], "dpmpp_2m", 7.5),
    (2, True, 0.0, 1.0, "ddim", 5.0),
]


@pytest.mark.parametrize(("nets", "guess_mode", "start", "end", "sampler", "guidance_scale"), CASES)
def test_pipeline_equals_diffusers(folder: Path, references: list[ControlNetModel], ours: ControlNetPipeline,
                                   nets: int, guess_mode: bool, start, end, sampler: str,
                                   guidance_scale: float) -> None:
    pil, tensor = control_images()
    image = pil if nets == 1 else [pil, tensor]
    scale = 0.8 if nets == 1 else [0.8, 1.3]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=guidance_scale,
                controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                guess_mode=guess_mode, output_type="np")
    controlnet = references[0] if nets == 1 else references[:nets]
    reference_pipe = StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=controlnet,
                                                                       local_files_only=True)
    reference_pipe.scheduler = SCHEDULERS[sampler].from_config(reference_pipe.scheduler.config)
    reference_pipe.set_progress_bar_config(disable=True)
    expected = reference_pipe(PROMPT, image=image, latents=latents.clone(), **call).images
    ours.controlnet = controlnet
    try:
        got = ours(PROMPT, image=image, latents=latents, sampler=sampler, progress=False, **call).images
    finally:
        ours.controlnet = None
    assert got.shape == expected.shape == (1, 16, 16, 3)
    assert np.abs(got - expected).max() <= 1e-3
    plain = TextToImagePipeline.__call__(ours, PROMPT, latents=latents, sampler=sampler, progress=False,
                                         **{k: v for k, v in call.items() if "control" not in k and k != "guess_mode"})
    assert np.abs(plain.images - expected).max() > 1e-2  # the control matters


def test_saved_folder_loads_in_diffusers(references: list[ControlNetModel], tmp_path: Path) -> None:
    reference = references[1]
    net = as_controlnet(reference)
    write_controlnet_diffusers(net, tmp_path / "cn")
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True).eval()
    assert loaded.config.conditioning_embedding_out_channels == list(HINT_CHANNELS)
    g = torch.Generator().manual_seed(6)
    x, hint, context = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 16, 16, generator=g), torch.randn(
        1, 77, 32, generator=g)
    with torch.no_grad():
        args = dict(encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        expected = reference(x, 300, **args)
        again = loaded(x, 300, **args)
        ours_again = read_controlnet(tmp_path / "cn")(x, hint, 300, context)
    for a, b, c in zip([*again[0], again[1]], [*expected[0], expected[1]], [*ours_again[0], ours_again[1]]):
        assert torch.equal(a, b)
        assert relative(c, b) <= 1e-5


def test_original_single_file_with_prefix_loads(references: list[ControlNetModel], tmp_path: Path) -> None:
    net = as_controlnet(references[0])
    state = {"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "control_sd15_test.safetensors")
    assumed = read_controlnet(tmp_path / "control_sd15_test.safetensors").control_config.unet  # not in the weights
    assert (assumed.num_heads, assumed.norm_groups) == (8, 32)  # SD's, unless overridden
    loaded = read_controlnet(tmp_path / "control_sd15_test.safetensors", num_heads=2, norm_groups=8)
    assert loaded.control_config == net.control_config
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    diffusers_keys = controlnet_original_to_diffusers(state, net.control_config)
    assert set(diffusers_keys) == set(references[0].state_dict())
    assert set(controlnet_diffusers_to_original(diffusers_keys, net.control_config)) == set(net.state_dict())


@pytest.mark.parametrize(("image", "match"), [
    (torch.rand(1, 4, 16, 16), "image has 4 channels .*allowed: 3"),
    (Image.new("RGB", (1, 1)), "image is 1x1 pixels; allowed: at least 2x2"),
    (torch.rand(1, 3, 16, 16) * 2 - 1, r"allowed: \[0, 1\]"),
    (torch.rand(16, 16), r"allowed: \(C, H, W\) or \(B, C, H, W\)"),
    (torch.rand(3, 3, 16, 16), "image has 3 images; allowed: 1$"),
])
def test_a_bad_control_image_is_named(references: list[ControlNetModel], ours: ControlNetPipeline, image,
                                      match: str) -> None:
    ours.controlnet = references[0]
    try:
        with pytest.raises(ValueError, match=match) as info:
            ours(PROMPT, image=image, num_inference_steps=1, output_type="latent", progress=False)
    finally:
        ours.controlnet = None
    assert "\n" not in str(info.value)


def test_bad_control_settings_are_named(references: list[ControlNetModel], ours: ControlNetPipeline) -> None:
    pil, tensor = control_images()
    with pytest.raises(ValueError, match="no controlnet"):
        ours(PROMPT, image=pil)
    ours.controlnet = references
    try:
        with pytest.raises(ValueError, match="image must be a list of 2 control images"):
            ours(PROMPT, image=pil)
        with pytest.raises(ValueError, match="control_guidance_start=0.5 is not below control_guidance_end=0.5"):
            ours(PROMPT, image=[pil, tensor], control_guidance_start=0.5, control_guidance_end=0.5)
        with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 values"):
            ours(PROMPT, image=[pil, tensor], controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    finally:
        ours.controlnet = None
    with pytest.raises(ValueError, match="embeds its hint at 1/8 .*allowed: 1/2"):
        ours.controlnet = ControlNet.from_unet(ours.unet)  # SD's hint embedding: 8x, this autoencoder: 2x
