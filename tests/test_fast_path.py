"""Exact CPU fast paths of sampling, each against an independent reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import load_file
from test_autoencoder import SMALL_DIFFUSERS, randomize
from test_unet import diffusers_unet, inputs, run_diffusers

from autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.config import config_to_dict
from ldm.io.unet_keys import unet_config_from_diffusers, unet_diffusers_to_original
from ldm.io.vae_keys import vae_config_from_diffusers, vae_config_to_diffusers, vae_original_to_diffusers
from ldm.modules import UNet, Upsample
from ldm.modules import upsample as subpixel
from ldm.modules.upsample import clear_phase_weights, nearest_up2_conv3, set_subpixel_upsample

# ---------------------------------------------------------------------------------------------
# subpixel upsample and in-place autoencoder ops
# ---------------------------------------------------------------------------------------------

UP_TOL = 1e-5  # float32 against a float64 reference, outputs of magnitude ~1
PARITY_TOL = 1e-4  # ours against diffusers, as in test_autoencoder.py / test_unet.py
CL = torch.channels_last


@pytest.fixture
def switch():
    """The subpixel switch, restored after the test: ``switch(False)`` turns the fast path off."""
    previous = subpixel.SUBPIXEL_UPSAMPLE
    yield set_subpixel_upsample
    set_subpixel_upsample(previous)


def random_conv(c_in: int, c_out: int, seed: int) -> torch.nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((torch.rand(conv.weight.shape, generator=g) * 2 - 1) * (9 * c_in) ** -0.5 * 2)
        conv.bias.copy_(torch.randn(c_out, generator=g))
    return conv


def reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """conv3x3(nearest ×2) in float64, through the upsampled tensor."""
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    return F.conv2d(up, conv.weight.double(), conv.bias.double(), padding=1)


def matches_reference(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """The fast path in inference mode equals the float64 reference (relative to outputs above 1)."""
    expected = reference(x, conv)
    with torch.inference_mode():
        got = nearest_up2_conv3(x, conv)
    return bool((got.double() - expected).abs().max() <= UP_TOL * expected.abs().max().clamp(min=1))


def has_phase_cache(conv: torch.nn.Conv2d) -> bool:
    return subpixel._CACHE_ATTR in conv.__dict__


@pytest.mark.parametrize("shape, c_out, channels_last", [
    ((1, 8, 5, 7), 8, False),  # odd H and W
    ((3, 16, 6, 4), 24, False),  # batch 3, more output than input channels
    ((3, 12, 9, 1), 4, False),  # a single column
    ((1, 32, 8, 8), 32, True),
    ((3, 16, 7, 5), 8, True),
])
def test_nearest_up2_conv3_is_conv_of_the_upsampled_input(shape, c_out, channels_last) -> None:
    conv = random_conv(shape[1], c_out, seed=sum(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x, conv = x.to(memory_format=CL), conv.to(memory_format=CL)
    expected = reference(x, conv)
    with torch.inference_mode():
        got = nearest_up2_conv3(x, conv)
    assert has_phase_cache(conv)  # the fast path ran
    assert got.shape == (shape[0], c_out, 2 * shape[2], 2 * shape[3]) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert expected.abs().max() > 1.0
    assert (got.double() - expected).abs().max() <= UP_TOL


def test_without_the_fast_path_the_plain_composition_runs(switch) -> None:
    conv = random_conv(8, 8, seed=0)
    x = torch.randn(2, 8, 5, 6)
    plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.equal(nearest_up2_conv3(x, conv), plain)  # grad enabled: training keeps autograd's path
    assert not has_phase_cache(conv)
    switch(False)
    with torch.no_grad():
        assert torch.equal(nearest_up2_conv3(x, conv), plain)
    assert not has_phase_cache(conv)
    strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)  # other geometries are not rewritten
    switch(True)
    with torch.no_grad():
        assert torch.equal(nearest_up2_conv3(x, strided), strided(F.interpolate(x, scale_factor=2.0)))
    assert not has_phase_cache(strided)


def test_phase_weights_follow_changes_of_the_weight() -> None:
    conv = random_conv(8, 8, seed=3)
    x = torch.randn(1, 8, 6, 5)
    assert matches_reference(x, conv) and has_phase_cache(conv)
    with torch.no_grad():  # an optimizer step or load_state_dict: bumps the version counter
        conv.weight.add_(0.1)
    assert matches_reference(x, conv)
    conv.load_state_dict({"weight": conv.weight * -1, "bias": conv.bias})
    assert matches_reference(x, conv)
    for scale in (2.0, 0.5, 2.0):  # a LoRA-style swap: a new tensor each time, possibly at a freed address
        conv.weight.data = conv.weight.data * scale
        assert matches_reference(x, conv)
    version = conv.weight._version
    conv.weight.data.mul_(2)  # through .data the version counter does not move: the probe sees it
    assert conv.weight._version == version
    assert matches_reference(x, conv)
    conv.weight.grad = torch.randn_like(conv.weight)
    torch.optim.AdamW([conv.weight], lr=0.1, fused=True).step()  # nor does a fused step
    assert matches_reference(x, conv)
    conv.weight.data[0, 0, 0, 1] += 1.0  # one value, which the probe may miss: cleared by hand
    clear_phase_weights(conv)
    assert matches_reference(x, conv)


def small_vae_pair(seed: int) -> tuple[AutoencoderKL, DiffusersVAE]:
    """Our small autoencoder (two ×2 upsamples) with random weights and diffusers' on the same weights."""
    ours = randomize(AutoencoderKL(AutoencoderConfig(**vae_config_from_diffusers(SMALL_DIFFUSERS))), seed=seed)
    ref = DiffusersVAE(**vae_config_to_diffusers(config_to_dict(ours.config))).eval()
    ref.load_state_dict(vae_original_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


@pytest.mark.parametrize("channels_last", [False, True])
def test_autoencoder_decode_matches_diffusers_in_inference_mode(switch, channels_last: bool) -> None:
    switch(True)
    ours, ref = small_vae_pair(seed=5)
    z = torch.randn(2, 4, 7, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
    if channels_last:
        ours, z = ours.to(memory_format=CL), z.to(memory_format=CL)
    with torch.inference_mode():
        got = ours.decode(z)
        again = ours.decode(z)  # the cached phase weights and the in-place ops leave no trace
    assert all(has_phase_cache(level.upsample.conv) for level in ours.decoder.up[1:])
    assert expected.abs().mean() > 0.05
    assert (got - expected).abs().max() <= PARITY_TOL
    assert torch.equal(got, again)
    with torch.inference_mode():  # the encoder's in-place norm_out/ResNet additions, too
        x = torch.rand(1, 3, 16, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
        mean = ours.encode(x.to(memory_format=CL) if channels_last else x).mean
    with torch.no_grad():
        assert (mean - ref.encode(x).latent_dist.mean).abs().max() <= PARITY_TOL


def test_decoder_gradients_are_those_of_the_plain_path(switch) -> None:
    ours, _ = small_vae_pair(seed=6)
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    results = []
    for enabled in (True, False):
        switch(enabled)
        ours.zero_grad(set_to_none=True)
        z_ = z.clone().requires_grad_(True)
        out = ours.decode(z_)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), z_.grad, {n: p.grad.clone() for n, p in ours.decoder.named_parameters()}))
    (out_on, dz_on, grads_on), (out_off, dz_off, grads_off) = results
    assert torch.equal(out_on, out_off) and torch.equal(dz_on, dz_off)
    assert grads_on.keys() == grads_off.keys() and all(torch.equal(grads_on[n], grads_off[n]) for n in grads_on)
    assert dz_on.abs().max() > 0
    with torch.inference_mode():  # and the sampling path agrees with the training one
        assert (ours.decode(z) - out_on).abs().max() <= UP_TOL * 10


@pytest.mark.parametrize("variant, size", [("v1", (16, 16)), ("inpaint", (10, 6))])  # (10, 6): odd skip sizes
def test_unet_matches_diffusers_in_inference_mode(switch, tmp_path, variant: str, size: tuple[int, int]) -> None:
    switch(True)
    reference = diffusers_unet(variant)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    config = unet_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    ours = UNet(config).eval()
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours.load_state_dict(unet_diffusers_to_original(state, config), strict=True)
    args = inputs(config, size)
    expected = run_diffusers(reference, **args)
    with torch.inference_mode():
        got = ours(**args)
    upsamples = [m for m in ours.modules() if isinstance(m, Upsample)]
    assert upsamples and any(has_phase_cache(m.conv) for m in upsamples)
    assert expected.abs().mean() > 0.05
    assert (got - expected).abs().max() <= PARITY_TOL


def test_unet_upsample_to_an_odd_size_keeps_the_interpolation() -> None:
    up = Upsample(8)
    x = torch.randn(2, 8, 3, 5)
    with torch.inference_mode():
        odd = up(x, size=(5, 9))
        assert not has_phase_cache(up.conv)
        twice = up(x, size=(6, 10))
        assert has_phase_cache(up.conv)
    assert torch.equal(odd, up.conv(F.interpolate(x, size=(5, 9), mode="nearest")))
    assert (twice.double() - reference(x, up.conv)).abs().max() <= UP_TOL


# ---------------------------------------------------------------------------------------------
# DeepCache feature reuse (opt-in approximation)
# ---------------------------------------------------------------------------------------------


def deep_cache_unet() -> UNet:
    from sd_fixtures import randomize as randomize_all

    from ldm.modules import UNetConfig

    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                           num_heads=2, context_dim=16, norm_groups=8))
    randomize_all(unet, 3)
    return unet.eval()


def count_middle_calls(unet: UNet) -> list[int]:
    calls = [0]
    unet.middle_block.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def deep_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 16, generator=g)


def test_deep_cache_runs_in_full_every_interval_calls() -> None:
    from ldm.modules.unet import reusing_deep_features

    unet, (x, context) = deep_cache_unet(), deep_inputs()
    calls = count_middle_calls(unet)
    with torch.no_grad(), reusing_deep_features(unet, interval=3, depth=1, first=0):
        for t in (900, 800, 700, 600, 500):
            unet(x, torch.tensor([t, t]), context)
    assert calls[0] == 2  # calls 1 and 4 in full; 2, 3 and 5 reuse
    calls[0] = 0
    with torch.no_grad(), reusing_deep_features(unet, interval=1):
        plain = [unet(x, torch.tensor([t, t]), context) for t in (900, 800)]
    assert calls[0] == 2
    with torch.no_grad():
        assert all(torch.equal(a, unet(x, torch.tensor([t, t]), context)) for a, t in zip(plain, (900, 800)))


def test_a_reusing_call_composes_the_shallow_blocks_with_the_stored_deep_features() -> None:
    from ldm.modules.unet import reusing_deep_features

    unet, (x, context) = deep_cache_unet(), deep_inputs()
    t = torch.tensor([700, 700])
    with torch.no_grad():
        full = unet(x, t, context)
        with reusing_deep_features(unet, interval=2, depth=1, first=0):
            first, again = unet(x, t, context), unet(x, t, context)  # the second reuses: same inputs, same result
            unet(x, t, context)  # full again (interval 2)
            moved = unet(x, t - 300, context)  # reuses features of t = 700 at t = 400: an approximation
        exact_moved = unet(x, t - 300, context)
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(again, full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(moved, exact_moved, atol=1e-4)


def test_deep_cache_runs_in_full_when_the_batch_changes_or_under_autograd() -> None:
    from ldm.modules.unet import reusing_deep_features

    unet, (x, context) = deep_cache_unet(), deep_inputs()
    calls = count_middle_calls(unet)
    with reusing_deep_features(unet, interval=4, first=0):
        with torch.no_grad():
            unet(x, torch.tensor([900, 900]), context)
            unet(x[:1], torch.tensor([800]), context[:1])  # guidance switched off: another batch, in full
        unet(x, torch.tensor([700, 700]), context).sum().backward()  # autograd: in full, not stored
    assert calls[0] == 3


def test_pipeline_deep_cache_is_opt_in_and_checked(capsys) -> None:
    from sd_fixtures import small_models

    from ldm_toolkit.cli import main
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(small_models())
    call = dict(num_inference_steps=6, seed=0, output_type="np", progress=False)
    exact = pipe("a red circle", **call).images
    pipe.enable_deep_cache(3, first=0)
    approx = pipe("a red circle", **call).images
    pipe.disable_deep_cache()
    assert np.array_equal(pipe("a red circle", **call).images, exact)
    assert np.isfinite(approx).all() and not np.array_equal(approx, exact)
    with pytest.raises(ValueError, match="interval"):
        pipe.enable_deep_cache(0)
    assert main(["generate", "a red circle", "--deep-cache", "0", "-o", "/tmp/never.png"]) == 2
    err = capsys.readouterr().err
    assert "--deep-cache" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# torch.compile option
# ---------------------------------------------------------------------------------------------


def test_compile_without_a_compiler_warns_once_and_samples_uncompiled(monkeypatch, caplog) -> None:
    import logging

    from sd_fixtures import small_models

    import pipelines.speed as speed
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(small_models())
    call = dict(num_inference_steps=2, seed=0, output_type="np", progress=False)
    expected = pipe("a red circle", **call).images
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="pipelines.speed"):
        pipe.compile()
    assert [r.getMessage().count("\n") for r in caplog.records] == [0] and "C++ compiler" in caplog.text
    assert not hasattr(pipe.models.unet, "_compiled_call_impl") or pipe.models.unet._compiled_call_impl is None
    assert np.array_equal(pipe("a red circle", **call).images, expected)


@pytest.mark.slow
def test_the_compiled_unet_gives_the_same_image_and_logs_its_warm_up(caplog) -> None:
    import logging

    from sd_fixtures import small_models

    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(small_models())
    call = dict(num_inference_steps=2, seed=0, output_type="np", progress=False)
    expected = pipe("a red circle", **call).images
    pipe.compile()
    with caplog.at_level(logging.INFO, logger="pipelines.speed"):
        first = pipe("a red circle", **call).images
        again = pipe("a red circle", **call).images
    assert np.abs(first - expected).max() <= 1e-4 and np.abs(again - expected).max() <= 1e-4
    assert caplog.text.count("torch.compile warm-up") == 1  # the first call of this latent shape only
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# inference mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_tensors_a_pipeline_returns_are_ordinary_ones(output_type: str) -> None:
    from sd_fixtures import small_models

    from pipelines import TextToImagePipeline

    images = TextToImagePipeline(small_models())("a red circle", num_inference_steps=2, seed=0,
                                                 output_type=output_type, progress=False).images
    assert not images.is_inference()  # sampled under torch.inference_mode, handed back as a copy
    images.add_(1.0)  # in place outside inference mode: an inference tensor would refuse
    assert images.requires_grad_().requires_grad


def test_deep_cache_runs_the_first_calls_in_full() -> None:
    from ldm.modules.unet import reusing_deep_features

    unet, (x, context) = deep_cache_unet(), deep_inputs()
    calls = count_middle_calls(unet)
    with torch.no_grad(), reusing_deep_features(unet, interval=6, depth=1, first=7):
        for t in range(990, 0, -70):  # 15 calls: 1-7 in full, then every 6th (13)
            unet(x, torch.tensor([t, t]), context)
    assert calls[0] == 8
