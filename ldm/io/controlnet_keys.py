"""ControlNet weights and configs between lllyasviel's original layout (``cldm.py``; our ``ControlNet``) and
diffusers' ``ControlNetModel``; reading either, writing diffusers folders.

The encoder's keys map as the U-Net's do (:mod:`ldm.io.unet_keys`); the ControlNet's own parts:

=========================================  ==========================================================
original                                   diffusers
=========================================  ==========================================================
``input_hint_block.0``                     ``controlnet_cond_embedding.conv_in``
``input_hint_block.{2 + 2j}`` (j < 2(n-1))  ``controlnet_cond_embedding.blocks.{j}``
``input_hint_block.{4n - 2}``              ``controlnet_cond_embedding.conv_out``
``zero_convs.N.0``                         ``controlnet_down_blocks.N``
``middle_block_out.0``                     ``controlnet_mid_block``
=========================================  ==========================================================

(n: the hint embedding's widths, 4 for SD; the odd indices of ``input_hint_block`` are SiLUs.) Original files
may carry the ``control_model.`` prefix of a full cldm checkpoint; only those keys are read then.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import Tensor

from ldm.io.files import (
    CheckpointError,
    atomic_folder,
    load_state_dict,
    read_json_object,
    save_state_dict,
    write_text_atomic,
)
from ldm.io.unet_keys import (
    _RESNET_PARTS,
    _block_prefixes,
    _rename,
    infer_unet_config,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)
from ldm.modules.controlnet import ControlNet, ControlNetConfig

ORIGINAL_PREFIX = "control_model."
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")
_ENCODER = ("time_embed", "label_emb", "input_blocks", "middle_block")
# ControlNetModel config entries that are not the U-Net's: read into ControlNetConfig
_CONTROL_KEYS = {"conditioning_channels", "conditioning_embedding_out_channels",
                 "controlnet_conditioning_channel_order", "global_pool_conditions"}


def _prefixes(config: ControlNetConfig) -> dict[str, tuple[str, bool]]:
    """Original module prefix → (diffusers prefix, is a ResBlock), for every module with weights."""
    table = {k: v for k, v in _block_prefixes(config.unet).items() if k.split(".")[0] in _ENCODER}
    n = len(config.hint_block_channels)
    table["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", False)
    for j in range(2 * (n - 1)):
        table[f"input_hint_block.{2 + 2 * j}"] = (f"controlnet_cond_embedding.blocks.{j}", False)
    table[f"input_hint_block.{4 * n - 2}"] = ("controlnet_cond_embedding.conv_out", False)
    levels, blocks = len(config.unet.channel_mult), config.unet.num_res_blocks
    for i in range(levels * (blocks + 1)):  # one zero conv per input block
        table[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", False)
    table["middle_block_out.0"] = ("controlnet_mid_block", False)
    return table


def strip_original_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ControlNet's keys of an original file: those under ``control_model.`` (prefix removed) when there are
    any, else all of them."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state_dict):
        return {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state_dict.items() if k.startswith(ORIGINAL_PREFIX)}
    return dict(state_dict)


def controlnet_original_to_diffusers(state_dict: Mapping[str, Tensor], config: ControlNetConfig) -> dict[str, Tensor]:
    """Original ControlNet keys (``control_model.`` stripped if present) → ``ControlNetModel`` keys (tensors
    shared); ``ValueError`` names keys that have no place in this config."""
    return _rename(strip_original_prefix(state_dict), _prefixes(config), _RESNET_PARTS)


def controlnet_diffusers_to_original(state_dict: Mapping[str, Tensor], config: ControlNetConfig) -> dict[str, Tensor]:
    """``ControlNetModel`` keys → original ControlNet keys; the inverse of the above."""
    table = {new: (old, is_resnet) for old, (new, is_resnet) in _prefixes(config).items()}
    return _rename(state_dict, table, {new: old for old, new in _RESNET_PARTS.items()})


def controlnet_config_from_diffusers(cfg: Mapping[str, Any]) -> ControlNetConfig:
    """A ``ControlNetModel`` config.json dict → ``ControlNetConfig`` (the U-Net part read as the U-Net's is)."""
    unet = {k: v for k, v in cfg.items() if k not in _CONTROL_KEYS}
    down = list(unet.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    unet["up_block_types"] = [kind.replace("Down", "Up") for kind in reversed(down)]  # a ControlNet has no decoder
    return ControlNetConfig(
        unet=unet_config_from_diffusers(unet),
        hint_channels=cfg.get("conditioning_channels", 3),
        hint_block_channels=tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
        channel_order=cfg.get("controlnet_conditioning_channel_order", "rgb"),
        global_pool_conditions=bool(cfg.get("global_pool_conditions", False)),
    )


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict[str, Any]:
    """``ControlNetConfig`` → kwargs of ``ControlNetModel(**d)``."""
    out = unet_config_to_diffusers(config.unet)
    for key in ("out_channels", "up_block_types"):
        out.pop(key)
    return out | {
        "conditioning_channels": config.hint_channels,
        "conditioning_embedding_out_channels": list(config.hint_block_channels),
        "controlnet_conditioning_channel_order": config.channel_order,
        "global_pool_conditions": config.global_pool_conditions,
    }


def infer_controlnet_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> ControlNetConfig:
    """``ControlNetConfig`` from the key names and shapes of an original ControlNet state dict (``control_model.``
    stripped if present); heads and norm groups by SD convention, as :func:`infer_unet_config` (``overrides``
    go to it)."""
    sd = strip_original_prefix(state_dict)
    needed = ["input_hint_block.0.weight", "input_blocks.0.0.weight", "middle_block_out.0.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        keys = list(sd)
        raise ValueError(f"not a ControlNet state dict: no {missing}; found {len(keys)} keys such as {keys[:3]}")
    conv_in = sd["input_blocks.0.0.weight"]  # (mc, in_channels, 3, 3)
    # the encoder alone says everything but out_channels, which a ControlNet has no use for: as the input's
    stand_in = {"out.2.weight": torch.empty(conv_in.shape[1], conv_in.shape[0], 3, 3, device="meta")}
    unet = infer_unet_config({k: v for k, v in sd.items() if k.split(".")[0] in _ENCODER} | stand_in, **overrides)
    hint = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    widths = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1:2]]  # conv_in, then each stride-2 conv
    if hint != list(range(0, len(hint) * 2, 2)) or len(hint) % 2 or len(hint) < 2:
        raise ValueError(f"input_hint_block has convolutions at {hint}; expected 0, 2, ..., 4n - 2")
    return ControlNetConfig(unet=unet, hint_channels=sd["input_hint_block.0.weight"].shape[1],
                            hint_block_channels=tuple(widths))


def read_controlnet(source: str | Path, **overrides: Any) -> ControlNet:
    """A ControlNet from a diffusers ``ControlNetModel`` folder (config.json + weights) or an original single file
    (``.safetensors``; ``.pth`` / ``.ckpt`` through weights_only unpickling), in float32. An original file does
    not hold heads and norm groups: SD's are assumed unless ``overrides`` (e.g. ``num_heads=2, norm_groups=8``)
    say otherwise (see :func:`infer_unet_config`)."""
    path = Path(source)
    if path.is_dir():
        if overrides:
            raise ValueError(f"{sorted(overrides)}: allowed only for an original single file; a diffusers folder "
                             "has its config")
        cfg = read_json_object(path / "config.json")
        weights = next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no ControlNet weights; expected one of {', '.join(WEIGHT_NAMES)}")
        state = load_state_dict(weights)
        try:
            config = controlnet_config_from_diffusers(cfg)
            state = controlnet_diffusers_to_original(state, config)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from None
    else:
        state = strip_original_prefix(load_state_dict(path))
        try:
            config = infer_controlnet_config(state, **overrides)
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from None
    return _build(config, state, str(path))


def controlnet_from_diffusers_model(model: Any) -> ControlNet:
    """Our ControlNet with the weights of a diffusers ``ControlNetModel`` instance (in float32)."""
    config = controlnet_config_from_diffusers(dict(model.config))
    state = controlnet_diffusers_to_original(model.state_dict(), config)
    return _build(config, state, type(model).__name__)


def _build(config: ControlNetConfig, state: Mapping[str, Tensor], source: str) -> ControlNet:
    net = ControlNet(config)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: ControlNet weights do not fit the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return net.eval()


def write_controlnet_diffusers(net: ControlNet, path: str | Path) -> None:
    """Write ``net`` as a folder ``diffusers.ControlNetModel.from_pretrained`` loads."""
    config = controlnet_config_to_diffusers(net.control_config)
    cfg = {"_class_name": "ControlNetModel", "_diffusers_version": diffusers.__version__, **config}
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_folder(path) as tmp:
        write_text_atomic(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
        save_state_dict(controlnet_original_to_diffusers(state, net.control_config), tmp / WEIGHT_NAMES[0])
