"""Our SD U-Net against diffusers' ``UNet2DConditionModel`` on the same random weights.

The diffusers model goes through its own ``save_pretrained`` folder (config.json + safetensors)
and our conversion; the original key layout is checked against diffusers' single-file converter;
the full-size SD v1.5 / v2 layouts are checked key by key on the meta device."""

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file

from ldm.io.unet_keys import (
    infer_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
)
from ldm.modules import UNet, UNetConfig, timestep_embedding
from ldm.modules.unet import widen_inputs

TOL = 1e-4
TINY = {  # SD v1 layout at reduced width
    "block_out_channels": [32, 64, 64, 64],
    "norm_num_groups": 16,
    "cross_attention_dim": 48,
    "attention_head_dim": 4,
    "layers_per_block": 2,
}
VARIANTS = {
    "v1": {},
    "v2": {"attention_head_dim": [2, 4, 4, 4], "use_linear_projection": True, "cross_attention_dim": 64,
           "transformer_layers_per_block": 2},  # head dim 16, like SD v2's 64
    "inpaint": {"in_channels": 9, "layers_per_block": 1},
    "classes": {"num_class_embeds": 10, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D", "UpBlock2D"]},
}
SD15 = {  # diffusers' config.json of runwayml/stable-diffusion-v1-5 unet (sample_size dropped)
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = SD15 | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
               "upcast_attention": True, "dual_cross_attention": False, "num_class_embeds": None}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: waking a second thread per op costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def diffusers_unet(variant: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**(TINY | VARIANTS[variant])).eval()


def inputs(config: UNetConfig, size: tuple[int, int] = (8, 8), batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(batch, config.in_channels, *size, generator=g),
        "t": torch.tensor([999, 17])[:batch],
        "context": torch.randn(batch, 7, config.context_dim, generator=g),
        "y": torch.randint(0, config.num_classes, (batch,), generator=g) if config.num_classes else None,
    }


@torch.no_grad()
def run_diffusers(model: UNet2DConditionModel, x, t, context, y) -> torch.Tensor:
    return model(x, t, encoder_hidden_states=context, class_labels=y).sample


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every weight, so the zero-initialised output convs do not hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_diffusers_from_saved_folder(variant: str, tmp_path) -> None:
    reference = diffusers_unet(variant)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    config = unet_config_from_diffusers(cfg)
    ours = UNet(config).eval()
    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    ours.load_state_dict(unet_diffusers_to_original(state, config), strict=True)
    size = (10, 6) if variant == "inpaint" else (16, 16)  # not multiples of 8: odd skip sizes
    args = inputs(config, size)
    expected = run_diffusers(reference, **args)
    with torch.no_grad():
        got = ours(**args)
    assert expected.abs().mean() > 0.05
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("variant", ["v1", "v2", "classes"])
def test_our_layout_round_trips_through_diffusers(variant: str) -> None:
    config = unet_config_from_diffusers(TINY | VARIANTS[variant])
    ours = perturbed(UNet(config))
    state = ours.state_dict()
    converted = unet_original_to_diffusers(state, config)
    reference = UNet2DConditionModel(**unet_config_to_diffusers(config)).eval()
    reference.load_state_dict(converted, strict=True)
    back = unet_diffusers_to_original(converted, config)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    args = inputs(config)
    with torch.no_grad():
        assert (ours(**args) - run_diffusers(reference, **args)).abs().max() <= TOL


@pytest.mark.parametrize("variant", ["v1", "v2", "classes"])
def test_original_layout_loads_with_diffusers_own_converter(variant: str) -> None:
    config = unet_config_from_diffusers(TINY | VARIANTS[variant])
    ours = perturbed(UNet(config), seed=1)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    diffusers_config = unet_config_to_diffusers(config)
    reference = UNet2DConditionModel(**diffusers_config).eval()
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, diffusers_config), strict=True)
    args = inputs(config)
    with torch.no_grad():
        assert (ours(**args) - run_diffusers(reference, **args)).abs().max() <= TOL


@pytest.mark.parametrize("diffusers_config", [SD15, SD21], ids=["sd-v1.5", "sd-v2.1"])
def test_full_size_keys_and_shapes_map_both_ways(diffusers_config: dict) -> None:
    config = unet_config_from_diffusers(diffusers_config)
    with torch.device("meta"):
        ours = UNet(config).state_dict()
        theirs = UNet2DConditionModel(**unet_config_to_diffusers(config)).state_dict()
    converted = unet_original_to_diffusers(ours, config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    back = unet_diffusers_to_original(theirs, config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    prefixed = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    assert infer_unet_config(prefixed) == config


def test_sd_configs() -> None:
    assert unet_config_from_diffusers(SD15) == UNetConfig()
    v2 = unet_config_from_diffusers(SD21)
    assert (v2.head_dim, v2.num_heads, v2.context_dim, v2.use_linear_projection) == (64, None, 1024, True)
    assert unet_config_to_diffusers(v2)["attention_head_dim"] == [5, 10, 20, 20]
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet().parameters()) == 859_520_964  # SD v1.5's U-Net


def test_infer_unet_config_variants() -> None:
    for variant in ("inpaint", "classes"):
        config = unet_config_from_diffusers(TINY | VARIANTS[variant])
        with torch.device("meta"):
            state = UNet(config).state_dict()
        assert infer_unet_config(state, num_heads=4, norm_groups=16) == config
    odd = UNetConfig(model_channels=16, channel_mult=(2, 3), attention_levels=(1,), norm_groups=8, num_heads=2,
                     context_dim=8)  # CompVis allows channel_mult[0] != 1, diffusers does not
    with torch.device("meta"):
        state = UNet(odd).state_dict()
    assert infer_unet_config(state, num_heads=2, norm_groups=8) == odd
    with pytest.raises(ValueError, match="channel_mult"):
        unet_config_to_diffusers(odd)
    with pytest.raises(ValueError, match="not an SD U-Net state dict"):
        infer_unet_config({"encoder.conv_in.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel_mult": ()}, "channel_mult"),
        ({"attention_levels": (0, 4)}, "attention_levels"),
        ({"num_heads": 8, "head_dim": 64}, "exactly one"),
        ({"norm_groups": 24}, "norm_groups=24"),
        ({"num_heads": 7}, "num_heads=7"),
        ({"model_channels": 0}, "model_channels"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"attention_head_dim": [2, 3, 4, 4]}, "attention_head_dim"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types"),
        ({"layers_per_block": [1, 2, 2, 2]}, "layers_per_block"),
    ],
)
def test_unsupported_diffusers_configs(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers(TINY | change)


def test_forward_inputs() -> None:
    config = unet_config_from_diffusers(TINY | VARIANTS["inpaint"])
    model = perturbed(UNet(config))
    args = inputs(config, batch=1)
    with torch.no_grad():
        by_scalar = model(args["x"], 999, args["context"])
        assert torch.equal(by_scalar, model(args["x"], torch.tensor([999.0]), args["context"]))
        with pytest.raises(ValueError, match="context"):
            model(args["x"], 999)
        with pytest.raises(ValueError, match="num_classes"):
            model(args["x"], 999, args["context"], y=torch.tensor([1]))
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # [cos, sin] at t = 0


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = unet_config_from_diffusers(TINY | VARIANTS["inpaint"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = perturbed(UNet(config)).train().enable_gradient_checkpointing(checkpointing)
        model(**inputs(config, size=(8, 8))).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_widen_inputs_keeps_the_function_and_refuses_other_changes() -> None:
    config = unet_config_from_diffusers(TINY | VARIANTS["inpaint"])
    model = perturbed(UNet(config)).eval()
    args = inputs(config, batch=2)
    wide = widen_inputs(model, dataclasses.replace(config, in_channels=11)).eval()
    extra = torch.randn(2, 2, *args["x"].shape[-2:])
    with torch.no_grad():  # the new inputs start with zero weights: the same outputs whatever they hold
        widened = wide(torch.cat([args["x"], extra], 1), args["t"], args["context"])
        assert torch.allclose(model(**args), widened, atol=1e-6)
    with pytest.raises(ValueError, match=r"\['model_channels'\] differ"):
        widen_inputs(model, dataclasses.replace(config, model_channels=64))
    with pytest.raises(ValueError, match="would drop inputs"):
        widen_inputs(model, dataclasses.replace(config, in_channels=4))
