"""U-Net state-dict and config conversion between the original SD layout and diffusers.

Pure functions of dicts. The original layout is CompVis ``openaimodel.py`` (our ``UNet``) with the
``model.diffusion_model.`` prefix stripped; the diffusers layout is ``UNet2DConditionModel``.
Both name transformer internals alike (``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...) and
keep tensor shapes (1×1 conv ``proj_in``/``proj_out`` in SD v1, linear with
``use_linear_projection``), so conversion only renames block prefixes and ResBlock parts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.modules.unet import UNetConfig

logger = logging.getLogger(__name__)

ORIGINAL_PREFIX = "model.diffusion_model."

# ResBlock parts: original name → diffusers ResnetBlock2D name
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _block_prefixes(config: UNetConfig) -> dict[str, tuple[str, bool]]:
    """Original module prefix → (diffusers prefix, is a ResBlock), for every module with weights."""
    table = {
        "time_embed.0": ("time_embedding.linear_1", False),
        "time_embed.2": ("time_embedding.linear_2", False),
        "label_emb": ("class_embedding", False),
        "input_blocks.0.0": ("conv_in", False),
        "middle_block.0": ("mid_block.resnets.0", True),
        "middle_block.1": ("mid_block.attentions.0", False),
        "middle_block.2": ("mid_block.resnets.1", True),
        "out.0": ("conv_norm_out", False),
        "out.2": ("conv_out", False),
    }
    n, levels = config.num_res_blocks, len(config.channel_mult)
    for level in range(levels):
        attn = level in config.attention_levels
        for j in range(n):  # encoder: input block 1 + level·(n+1) + j
            index = 1 + level * (n + 1) + j
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", True)
            if attn:
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", False)
        if level != levels - 1:
            table[f"input_blocks.{1 + level * (n + 1) + n}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", False)
        up = levels - 1 - level  # decoder: up block `up` works at `level`, n+1 blocks each
        for j in range(n + 1):
            index = up * (n + 1) + j
            table[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", True)
            if attn:
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", False)
        if level:
            index = up * (n + 1) + n
            table[f"output_blocks.{index}.{2 if attn else 1}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", False)
    return table


def _rename_key(key: str, table: dict[str, tuple[str, bool]], parts: dict[str, str]) -> str | None:
    """``key`` renamed by its longest module prefix in ``table`` (ResBlock parts through ``parts``)."""
    pieces = key.split(".")
    for depth in range(min(len(pieces) - 1, 5), 0, -1):
        prefix = ".".join(pieces[:depth])
        if prefix in table:
            new_prefix, is_resnet = table[prefix]
            module, param = ".".join(pieces[depth:-1]), pieces[-1]
            if is_resnet:
                if module not in parts:
                    return None
                module = parts[module]
            return ".".join(p for p in (new_prefix, module, param) if p)
    return None


def _rename(state_dict: Mapping[str, Tensor], table: dict[str, tuple[str, bool]], parts: dict[str, str]) -> dict:
    out = {key: _rename_key(key, table, parts) for key in state_dict}
    unknown = [key for key, new in out.items() if new is None]
    if unknown:
        raise ValueError(f"{len(unknown)} keys do not belong to a U-Net with this config, e.g. {unknown[:5]}")
    return {new: state_dict[key] for key, new in out.items()}


def unet_original_to_diffusers(state_dict: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """Original SD keys (``model.diffusion_model.`` stripped if present) → ``UNet2DConditionModel`` keys;
    tensors are shared, not copied. ``ValueError`` names keys that have no place in this config."""
    state_dict = {key.removeprefix(ORIGINAL_PREFIX): value for key, value in state_dict.items()}
    return _rename(state_dict, _block_prefixes(config), _RESNET_PARTS)


def unet_diffusers_to_original(state_dict: Mapping[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """``UNet2DConditionModel`` keys → original SD keys (prefix stripped); the inverse of the above."""
    table = {new: (old, is_resnet) for old, (new, is_resnet) in _block_prefixes(config).items()}
    return _rename(state_dict, table, {new: old for old, new in _RESNET_PARTS.items()})


# diffusers config entries we cannot express, with the only value we accept (diffusers' default)
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# read below, or without effect on the weights and on inference
_DIFFUSERS_READ = {
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
    "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
    "num_class_embeds", "norm_num_groups", "sample_size", "dropout", "upcast_attention", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "addition_embed_type_num_heads",
}
_DOWN = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
_UP = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}


def _uniform(name: str, value: Any, count: int) -> Any:
    """A per-block diffusers setting that must be the same for every block."""
    if isinstance(value, (list, tuple)):
        if len(set(map(str, value))) != 1 or len(value) != count:
            raise ValueError(f"{name}={list(value)!r} is not supported; allowed: one value for all {count} blocks")
        return value[0]
    return value


def _check_fixed(cfg: Mapping[str, Any], levels: int) -> None:
    for key, allowed in _DIFFUSERS_FIXED.items():
        value = _uniform(key, cfg[key], levels) if key == "only_cross_attention" and key in cfg else cfg.get(key)
        if key in cfg and value != allowed:
            raise ValueError(f"{key}={cfg[key]!r} is not supported; allowed: {allowed!r}")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DIFFUSERS_FIXED.keys() | _DIFFUSERS_READ)
    if unknown:
        logger.warning("diffusers U-Net config entries ignored: %s", unknown)
    if cfg.get("upcast_attention"):
        logger.info("upcast_attention=True ignored: SDPA accumulates its softmax in float32")


def _attention_levels(cfg: Mapping[str, Any], levels: int) -> tuple[int, ...]:
    """Levels with cross-attention blocks, from ``down_block_types`` (``up_block_types`` must mirror them)."""
    down = list(cfg.get("down_block_types", [_DOWN[True]] * 3 + [_DOWN[False]]))
    if len(down) != levels or any(kind not in _DOWN.values() for kind in down):
        raise ValueError(f"down_block_types={down!r} is not supported; allowed: {levels} of {sorted(_DOWN.values())}")
    attention = [kind == _DOWN[True] for kind in down]
    up = list(cfg.get("up_block_types", [_UP[False]] + [_UP[True]] * 3))
    mirrored = [_UP[a] for a in reversed(attention)]
    if up != mirrored:
        raise ValueError(f"up_block_types={up!r} is not supported; allowed: {mirrored!r}")
    return tuple(i for i, a in enumerate(attention) if a)


def _head_fields(channels: list[int], attention_head_dim: int | list[int]) -> dict[str, int | None]:
    """``num_heads`` or ``head_dim`` from diffusers' ``attention_head_dim`` (which holds heads, per level or not)."""
    heads = list(attention_head_dim) if isinstance(attention_head_dim, (list, tuple)) else [attention_head_dim]
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "head_dim": None}
    dims = {ch // h for ch, h in zip(channels, heads) if ch % h == 0}
    if len(heads) == len(channels) and len(dims) == 1 and all(ch % h == 0 for ch, h in zip(channels, heads)):
        return {"num_heads": None, "head_dim": dims.pop()}
    raise ValueError(f"attention_head_dim={heads!r} is not supported; allowed: the same number of heads, or "
                     "heads giving the same channels per head, at every level")


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """A ``UNet2DConditionModel`` config.json dict → ``UNetConfig``; ``ValueError`` on features the SD
    U-Net does not have. ``attention_head_dim`` is read as diffusers does: as the number of heads
    (a per-block list of them for SD v2, e.g. [5, 10, 20, 20] = 64 channels per head)."""
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels, mc = len(channels), channels[0]
    _check_fixed(cfg, levels)
    if any(ch % mc for ch in channels):
        raise ValueError(f"block_out_channels={channels!r} is not supported; allowed: multiples of the first entry")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(ch // mc for ch in channels),
        num_res_blocks=_uniform("layers_per_block", cfg.get("layers_per_block", 2), levels),
        attention_levels=_attention_levels(cfg, levels),
        context_dim=_uniform("cross_attention_dim", cfg.get("cross_attention_dim", 1280), levels),
        transformer_depth=_uniform("transformer_layers_per_block", cfg.get("transformer_layers_per_block", 1), levels),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        num_classes=cfg.get("num_class_embeds"),
        norm_groups=cfg.get("norm_num_groups", 32),
        **_head_fields(channels, cfg.get("attention_head_dim", 8)),
    )


def unet_config_to_diffusers(config: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """``UNetConfig`` → kwargs for ``UNet2DConditionModel(**d)``. ``attention_head_dim`` carries heads
    per level (diffusers' naming quirk). ``sample_size`` (latent side, 64 for SD v1) is what
    diffusers pipelines use for their default image size; it is not a property of the weights."""
    if config.channel_mult[0] != 1:
        raise ValueError(f"channel_mult={config.channel_mult!r} is not supported by diffusers' UNet2DConditionModel "
                         "(its conv_in has block_out_channels[0] outputs); allowed: channel_mult[0] == 1")
    attention = [level in config.attention_levels for level in range(len(config.channel_mult))]
    heads = [config.heads(ch)[0] for ch in config.level_channels]
    out = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": config.level_channels,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": [_DOWN[a] for a in attention],
        "up_block_types": [_UP[a] for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": heads[0] if config.num_heads else heads,
        "cross_attention_dim": config.context_dim,
        "transformer_layers_per_block": config.transformer_depth,
        "use_linear_projection": config.use_linear_projection,
        "num_class_embeds": config.num_classes,
        "norm_num_groups": config.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if sample_size is not None:
        out["sample_size"] = sample_size
    return out


def _indices(keys: list[str], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``{prefix}.N.…``."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for key in keys if (m := pattern.match(key))})


def infer_unet_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> UNetConfig:
    """``UNetConfig`` from the key names and shapes of an original-layout U-Net state dict (the
    ``model.diffusion_model.`` prefix is stripped if present; meta tensors are fine).

    Heads and norm groups are not in the weights: by SD convention context_dim 1024 (OpenCLIP ViT-H,
    SD v2) means ``head_dim=64`` and anything else (768: CLIP ViT-L, SD v1) ``num_heads=8``;
    ``norm_groups`` is 32. Pass ``overrides`` (e.g. ``num_heads=4`` or ``norm_groups=16``) to change them.
    """
    sd = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in state_dict.items()}
    keys = list(sd)
    needed = ["time_embed.0.weight", "input_blocks.0.0.weight", "middle_block.1.proj_in.weight", "out.2.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not an SD U-Net state dict: no {missing}; found {len(keys)} keys such as {keys[:3]}")
    if "label_emb.0.0.weight" in sd:
        raise ValueError("label_emb.0.0 (an SDXL-style vector embedding) is not supported; allowed: label_emb.weight")
    blocks = _indices(keys, "input_blocks")
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    n = downs[0] - 1 if downs else len(blocks) - 1
    levels = len(downs) + 1
    layout_ok = blocks == list(range(levels * (n + 1))) and downs == [(lv + 1) * (n + 1) for lv in range(levels - 1)]
    if n < 1 or not layout_ok:
        raise ValueError(f"not an SD U-Net layout: input_blocks {blocks}, downsamplers at {downs}")
    mc = sd["input_blocks.0.0.weight"].shape[0]
    first = [1 + level * (n + 1) for level in range(levels)]
    attn = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    config = {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "model_channels": mc,
        "channel_mult": tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first),
        "num_res_blocks": n,
        "attention_levels": tuple(lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in sd),
        "context_dim": attn.shape[1],
        "transformer_depth": len(_indices(keys, "middle_block.1.transformer_blocks")),
        "use_linear_projection": sd["middle_block.1.proj_in.weight"].ndim == 2,
        "num_classes": sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None,
        "num_heads": None if attn.shape[1] == 1024 else 8,
        "head_dim": 64 if attn.shape[1] == 1024 else None,
    }
    if "num_heads" in overrides:
        config["head_dim"] = None
    if "head_dim" in overrides:
        config["num_heads"] = None
    return UNetConfig(**(config | overrides))
