"""The KL autoencoder against diffusers on the same random weights, its key/config conversion,
config inference and validation, and tiled decoding against a whole-image pass."""

import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file

from autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, tiled_decode, tiled_encode
from autoencoder.tiling import tiled_apply
from ldm.config import config_from_dict, config_to_dict
from ldm.io.vae_keys import (
    infer_vae_config,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_to_original,
    vae_original_to_diffusers,
)

PARITY_TOL = 1e-4
# Tiled vs whole-image pass of a random-weight VAE. Not rounding: GroupNorm statistics are per
# tile and convolutions see zero padding at tile borders; random weights amplify both.
# Decode, 24-latent tiles overlapping by 8 on a 72x72 latent: measured 0.325 max and 0.033 mean
# abs error on outputs of std 0.30 (with zero overlap the seams reach 1.48).
TILED_MAX_TOL = 0.4
TILED_MEAN_TOL = 0.045
# Encode, 48-pixel tiles overlapping by 16 on a 96x96 image: measured 0.015 mean abs error of the
# posterior mean (std 0.19).
TILED_ENCODE_MEAN_TOL = 0.02
SMALL_DIFFUSERS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "scaling_factor": 0.18215,
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (GroupNorm scales around 1, biases around 0) so no init hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float("norm" in name and name.endswith("weight")))
    return model.eval()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A small SD-layout diffusers VAE with random weights, saved with ``save_pretrained``."""
    path = tmp_path_factory.mktemp("vae")
    randomize(DiffusersVAE(**SMALL_DIFFUSERS), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_vae():
    """f=2, 16 channels, one ResNet per level: cheap enough for 144x144-pixel outputs."""
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    return randomize(AutoencoderKL(cfg), seed=0)


def load_diffusers(folder) -> tuple[DiffusersVAE, dict, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    ref = DiffusersVAE.from_pretrained(folder).eval()
    return ref, cfg, sd


def assert_same_outputs(ours: AutoencoderKL, ref: DiffusersVAE, x: torch.Tensor) -> None:
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        z = ref_post.mean
        errs = {
            "mean": (post.mean - ref_post.mean).abs().max().item(),
            "logvar": (post.logvar - ref_post.logvar).abs().max().item(),
            "decode": (ours.decode(z) - ref.decode(z).sample).abs().max().item(),
        }
    assert max(errs.values()) <= PARITY_TOL, errs


def test_diffusers_weights_load_into_ours_and_match(diffusers_folder, image):
    ref, cfg, sd = load_diffusers(diffusers_folder)
    ours = AutoencoderKL(AutoencoderConfig(**vae_config_from_diffusers(cfg))).eval()
    ours.load_state_dict(vae_diffusers_to_original(sd), strict=True)
    assert ours.downsample_factor == 4
    assert_same_outputs(ours, ref, image)


def test_round_trip_ours_to_diffusers(image):
    ours = randomize(AutoencoderKL(AutoencoderConfig(**vae_config_from_diffusers(SMALL_DIFFUSERS))), seed=2)
    ref = DiffusersVAE(**vae_config_to_diffusers(config_to_dict(ours.config))).eval()
    ref.load_state_dict(vae_original_to_diffusers(ours.state_dict()), strict=True)
    assert_same_outputs(ours, ref, image)
    back = vae_diffusers_to_original(vae_original_to_diffusers(ours.state_dict()))
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_our_layout_is_the_original_one(image):
    """diffusers' own single-file converter reads our state dict as an SD checkpoint."""
    ours = randomize(AutoencoderKL(AutoencoderConfig(**vae_config_from_diffusers(SMALL_DIFFUSERS))), seed=3)
    checkpoint = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, SMALL_DIFFUSERS)
    ref = DiffusersVAE(**SMALL_DIFFUSERS).eval()
    ref.load_state_dict(converted, strict=True)
    assert_same_outputs(ours, ref, image)


def test_legacy_diffusers_attention_names_are_accepted():
    sd = DiffusersVAE(**SMALL_DIFFUSERS).state_dict()
    legacy = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in sd.items()}
    assert vae_diffusers_to_original(legacy).keys() == vae_diffusers_to_original(sd).keys()


@pytest.mark.parametrize("mult, factor", [((1, 2, 4, 4), 8), ((1, 2, 4), 4)])
def test_infer_config_from_full_size_layout(mult, factor):
    cfg = AutoencoderConfig(channel_mult=mult)
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    assert model.downsample_factor == factor
    assert AutoencoderConfig(**infer_vae_config(model.state_dict())) == cfg
    if mult == (1, 2, 4, 4):  # the SD v1/v2 VAE: 83,653,863 parameters
        assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_infer_config_rejects_other_state_dicts():
    with pytest.raises(ValueError, match="missing.*encoder.conv_in.weight"):
        infer_vae_config({"model.diffusion_model.conv.weight": torch.zeros(1)})
    with torch.device("meta"):
        sd = {f"first_stage_model.{k}": v for k, v in AutoencoderKL().state_dict().items()}
    with pytest.raises(ValueError, match="first_stage_model"):
        infer_vae_config(sd)
    with pytest.raises(ValueError, match="not part of"):
        vae_original_to_diffusers({"encoder.conv_in.weight": torch.zeros(1), "loss.logvar": torch.zeros(1)})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("base_channels", 0, "base_channels=0"),
        ("channel_mult", (), r"channel_mult=\(\)"),
        ("channel_mult", (1, 0), r"channel_mult\[1\]=0"),
        ("norm_groups", 24, "norm_groups=24"),
        ("latent_channels", 2.5, "latent_channels=2.5"),
        ("scale_factor", 0.0, "scale_factor=0.0"),
    ],
)
def test_bad_config_values_name_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**{field: value})


def test_bad_diffusers_configs_are_rejected():
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        vae_config_from_diffusers({**SMALL_DIFFUSERS, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_diffusers({**SMALL_DIFFUSERS, "down_block_types": ["DownBlock2D"] * 3})
    with pytest.raises(ValueError, match="unknown key 'channels'; allowed keys: base_channels"):
        config_from_dict(AutoencoderConfig, {"channels": 3})


def test_posterior():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    moments[:, 4:] = moments[:, 4:] * 40  # push logvar outside the clamp
    post = DiagonalGaussian(moments)
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20
    a, b = (post.sample(torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    zero = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert torch.allclose(zero.kl(), torch.zeros(1))


def test_tiled_blending_is_exact_for_a_local_function():
    """A pixel-local ``fn`` must come back unchanged: the cross-fade weights sum to one."""
    x = torch.randn(1, 2, 50, 37, generator=torch.Generator().manual_seed(0))

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.nn.functional.interpolate(t, scale_factor=4.0, mode="nearest"))

    for tile, overlap in [(16, 0), (16, 5), (12, 9), (64, 8)]:
        out = tiled_apply(fn, x, tile, overlap, scale=4, out_channels=2)
        assert (out - fn(x)).abs().max() < 1e-5, (tile, overlap)  # float32 rounding of the weighted sum


def test_tiled_decode_matches_untiled(tiny_vae):
    vae = tiny_vae
    z = torch.randn(1, 4, 72, 72, generator=torch.Generator().manual_seed(1))  # 3 tiles of 24 per side
    with torch.no_grad():
        full = vae.decode(z)
        err = (tiled_decode(vae, z, tile=24, overlap=8) - full).abs()
        seams = (tiled_decode(vae, z, tile=24, overlap=0) - full).abs()
        assert torch.equal(tiled_decode(vae, z[..., :24, :24], tile=24, overlap=8), vae.decode(z[..., :24, :24]))
    assert err.max() <= TILED_MAX_TOL and err.mean() <= TILED_MEAN_TOL, (err.max(), err.mean())
    assert seams.max() >= 3 * err.max(), "blending should remove the seams of abutting tiles"


def test_tiled_encode(tiny_vae):
    vae = tiny_vae
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        full, tiled = vae.encode(x), tiled_encode(vae, x, tile=48, overlap=16)
        assert torch.equal(tiled_encode(vae, x, tile=96, overlap=16).mean, full.mean)
    assert tiled.mean.shape == full.mean.shape == (1, 4, 48, 48)
    assert (tiled.mean - full.mean).abs().mean() <= TILED_ENCODE_MEAN_TOL
    with pytest.raises(ValueError, match="tile=47"):
        tiled_encode(vae, x, tile=47, overlap=16)
