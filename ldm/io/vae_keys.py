"""Key and config mapping between the original (CompVis / SD) KL-VAE layout and diffusers'.

Pure functions of plain dicts: no model classes are imported, so ``ldm`` stays independent
of ``autoencoder``. State dicts are *without* the ``first_stage_model.`` prefix. Configs on
our side are plain dicts of ``autoencoder.AutoencoderConfig`` fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ldm.validation import check_choice

# (original, diffusers) module paths. Placeholders: {c} encoder|decoder, {i}/{j} indices,
# {u} a decoder level, which counts from the fine end in the original (up.0 runs last) and from
# the coarse end in diffusers (up_blocks.0 runs first), {r} a ResNet layer, {a} q|k|v.
_MODULE_PAIRS = (
    ("{c}.conv_in", "{c}.conv_in"),
    ("{c}.conv_out", "{c}.conv_out"),
    ("{c}.norm_out", "{c}.conv_norm_out"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
    ("encoder.down.{i}.block.{j}.{r}", "encoder.down_blocks.{i}.resnets.{j}.{r}"),
    ("encoder.down.{i}.block.{j}.nin_shortcut", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv"),
    ("decoder.up.{u}.block.{j}.{r}", "decoder.up_blocks.{u}.resnets.{j}.{r}"),
    ("decoder.up.{u}.block.{j}.nin_shortcut", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut"),
    ("decoder.up.{u}.upsample.conv", "decoder.up_blocks.{u}.upsamplers.0.conv"),
    ("{c}.mid.block_1.{r}", "{c}.mid_block.resnets.0.{r}"),
    ("{c}.mid.block_2.{r}", "{c}.mid_block.resnets.1.{r}"),
    ("{c}.mid.attn_1.norm", "{c}.mid_block.attentions.0.group_norm"),
    ("{c}.mid.attn_1.{a}", "{c}.mid_block.attentions.0.to_{a}"),
    ("{c}.mid.attn_1.proj_out", "{c}.mid_block.attentions.0.to_out.0"),
)
_PLACEHOLDERS = {
    "c": "encoder|decoder",
    "i": r"\d+",
    "j": r"\d+",
    "u": r"\d+",
    "r": "norm1|conv1|norm2|conv2",
    "a": "q|k|v",
}
# Attention projections: 1x1 conv weights (C,C,1,1) in the original, Linear (C,C) in diffusers.
_ATTN_PROJ = re.compile(r"(en|de)coder\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
# Names older diffusers checkpoints used for the mid attention (still found on the Hub).
_LEGACY_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_DIFFUSERS_DEFAULTS = {  # diffusers.AutoencoderKL.__init__ defaults, for sparse config.json files
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
_CONFIG_FIELDS = (
    "in_channels",
    "out_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "latent_channels",
    "norm_groups",
    "scale_factor",
)
DEFAULT_NORM_GROUPS = 32  # not stored in the weights; every SD VAE uses 32
DEFAULT_SCALE_FACTOR = 0.18215  # not stored in the weights; SD v1/v2 (SDXL's VAE uses 0.13025)


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, name, ...
    return re.compile(
        "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for k, p in enumerate(parts))
    )


_RULES = [(_compile(orig), orig, _compile(diff), diff) for orig, diff in _MODULE_PAIRS]


def _convert(sd: Mapping[str, Tensor], to_diffusers: bool) -> dict[str, Tensor]:
    """Rename every key with the first matching rule; flip decoder level indices."""
    matched: list[tuple[str, str, dict[str, str]]] = []  # (source key, target template + suffix, groups)
    unknown = []
    for key in sd:
        module, _, param = key.rpartition(".")
        for orig_re, orig_t, diff_re, diff_t in _RULES:
            source_re, target_t = (orig_re, diff_t) if to_diffusers else (diff_re, orig_t)
            m = source_re.fullmatch(module)
            if m:
                matched.append((key, f"{target_t}.{param}", m.groupdict()))
                break
        else:
            unknown.append(key)
    if unknown:
        layout = "original (CompVis)" if to_diffusers else "diffusers"
        raise ValueError(f"{len(unknown)} key(s) are not part of a {layout} SD VAE: {unknown[:8]}")
    n_up = 1 + max((int(g["u"]) for _, _, g in matched if "u" in g), default=-1)
    out = {}
    for key, target, groups in matched:
        if "u" in groups:
            groups = {**groups, "u": str(n_up - 1 - int(groups["u"]))}
        new_key = target.format(**groups)
        out[new_key] = _reshape_attention(key if to_diffusers else new_key, sd[key], to_diffusers)
    return out


def _reshape_attention(original_key: str, t: Tensor, to_diffusers: bool) -> Tensor:
    """(C,C,1,1) conv ↔ (C,C) linear for the mid-attention projections; other tensors unchanged."""
    if not _ATTN_PROJ.fullmatch(original_key):
        return t
    if to_diffusers:
        return t[:, :, 0, 0] if t.ndim == 4 else t
    return t[:, :, None, None] if t.ndim == 2 else t


def vae_original_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CompVis/SD VAE state dict (no ``first_stage_model.`` prefix) → diffusers ``AutoencoderKL`` keys."""
    return _convert(sd, to_diffusers=True)


def vae_diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict → CompVis/SD layout; the inverse of the above.

    Also accepts the legacy diffusers attention names (``query``/``key``/``value``/``proj_attn``).
    """
    legacy = re.compile(r"(mid_block\.attentions\.0\.)(" + "|".join(_LEGACY_DIFFUSERS_ATTN) + r")\.")
    sd = {legacy.sub(lambda m: m[1] + _LEGACY_DIFFUSERS_ATTN[m[2]] + ".", k): v for k, v in sd.items()}
    return _convert(sd, to_diffusers=False)


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` config (config.json) → dict of ``AutoencoderConfig`` fields."""
    cfg = {**_DIFFUSERS_DEFAULTS, **cfg}
    widths = [int(w) for w in cfg["block_out_channels"]]
    n = len(widths)
    check_choice("act_fn", cfg["act_fn"], ["silu"])
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(name, [block] * n))
        if types != [block] * n:
            raise ValueError(f"{name}={types!r} is not supported; allowed: {[block] * n!r}")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        check_choice(flag, cfg.get(flag, True), [True])
    if cfg.get("shift_factor") not in (None, 0, 0.0):
        raise ValueError(f"shift_factor={cfg['shift_factor']!r} is not supported; allowed: None")
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels={widths!r}: every width must be a multiple of the first")
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "base_channels": base,
        "channel_mult": tuple(w // base for w in widths),
        "num_res_blocks": cfg["layers_per_block"],
        "latent_channels": cfg["latent_channels"],
        "norm_groups": cfg["norm_num_groups"],
        "scale_factor": float(cfg["scaling_factor"]),
    }


def vae_config_to_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Dict of ``AutoencoderConfig`` fields → keyword arguments of diffusers ``AutoencoderKL``."""
    missing = [f for f in _CONFIG_FIELDS if f not in cfg]
    if missing:
        raise ValueError(f"VAE config lacks field(s) {missing}; expected: {', '.join(_CONFIG_FIELDS)}")
    mult = list(cfg["channel_mult"])
    if mult[0] != 1:
        raise ValueError(f"channel_mult={tuple(mult)!r}: diffusers needs channel_mult[0] == 1")
    n = len(mult)
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg["base_channels"] * m for m in mult],
        "layers_per_block": cfg["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": cfg["latent_channels"],
        "norm_num_groups": cfg["norm_groups"],
        "scaling_factor": cfg["scale_factor"],
    }


def infer_vae_config(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """``AutoencoderConfig`` fields read off an original-layout VAE state dict (keys and shapes).

    ``norm_groups`` and ``scale_factor`` are not stored in the weights; the SD values are returned.
    """
    _require(sd, "encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight", "quant_conv.weight")
    base, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    blocks = _indices(sd, r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")
    if not levels or levels != list(range(len(levels))) or blocks != list(range(len(blocks))):
        raise ValueError(
            f"not an SD VAE state dict: encoder levels {levels}, level-0 ResNet blocks {blocks}; "
            "expected keys 'encoder.down.{i}.block.{j}.conv1.weight' numbered from 0"
        )
    widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    latent = sd["post_quant_conv.weight"].shape[0]
    if sd["quant_conv.weight"].shape[0] != 2 * latent:
        raise ValueError(
            f"quant_conv has {sd['quant_conv.weight'].shape[0]} outputs and post_quant_conv {latent}: "
            "expected 2·latent and latent"
        )
    if any(w % base for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of conv_in's {base} channels")
    up_levels = _indices(sd, r"decoder\.up\.(\d+)\.block\.0\.conv1\.weight")
    if len(up_levels) != len(levels):
        raise ValueError(f"encoder has {len(levels)} levels but decoder has {len(up_levels)}")
    return {
        "in_channels": int(in_channels),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "base_channels": int(base),
        "channel_mult": tuple(int(w) // int(base) for w in widths),
        "num_res_blocks": len(blocks),
        "latent_channels": int(latent),
        "norm_groups": DEFAULT_NORM_GROUPS,
        "scale_factor": DEFAULT_SCALE_FACTOR,
    }


def _require(sd: Mapping[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in sd]
    if not missing:
        return
    prefixed = any(k.startswith("first_stage_model.") for k in sd)
    hint = " (strip the 'first_stage_model.' prefix first)" if prefixed else ""
    raise ValueError(f"not an SD VAE state dict{hint}: missing {missing}; found {len(sd)} keys, e.g. {sorted(sd)[:5]}")


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in sd if (m := regex.fullmatch(k))})
