"""Key and config conversions between open_clip's text tower and transformers' ``CLIPTextModel``.

diffusers stores SD v2's text encoder as a ``CLIPTextModel`` with one layer fewer than the
open_clip tower: open_clip's penultimate resblock output followed by ``ln_final`` equals that
model's ``last_hidden_state``. All functions are pure: state dicts and config dicts in and out.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from ldm.conditioning.text import TextEncoderConfig, hf_text_kwargs
from ldm.validation import check_choice

StateDict = dict[str, Tensor]
HF = "text_model."  # the prefix SD v1 files and diffusers folders use for CLIPTextModel keys
HEAD_DIM = 64  # CLIP ViT-L/14 (768/12) and OpenCLIP ViT-H/14 and bigG (1024/16, 1280/20)

_TOP = {  # open_clip -> transformers, outside the resblocks
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_BLOCK = {  # open_clip -> transformers, inside resblock N / encoder layer N
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # also in_proj_weight
_HF_BLOCK = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openclip_to_hf(sd: StateDict, layers: int, drop_last: bool = True) -> StateDict:
    """open_clip text keys -> ``CLIPTextModel`` keys (``text_model.`` prefix, as diffusers saves).

    With ``drop_last`` (SD v2, layer="penultimate") resblock ``layers - 1`` is left out, giving
    a ``layers - 1`` layer model; ``in_proj`` is split into q/k/v. ``text_projection`` and
    ``logit_scale`` are not part of ``CLIPTextModel`` and are dropped.
    """
    found = _count_blocks(sd, _OC_BLOCK)
    if found != layers:
        raise ValueError(f"layers={layers!r} but the state dict has {found} resblocks")
    out = {HF + _TOP[key]: value for key, value in sd.items() if key in _TOP}
    for key, value in sd.items():
        match = _OC_BLOCK.match(key)
        if not match or (drop_last and int(match[1]) == layers - 1):
            continue
        index, name, kind = match.groups()
        prefix = f"{HF}encoder.layers.{index}."
        if name == "attn.in_proj":
            for proj, part in zip(_QKV, value.chunk(3, dim=0)):  # rows [q; k; v]
                out[f"{prefix}self_attn.{proj}.{kind}"] = part.clone()
        else:
            out[f"{prefix}{_BLOCK[name]}.{kind}"] = value
    return out


def hf_to_openclip(sd: StateDict, add_last: bool = True) -> StateDict:
    """``CLIPTextModel`` keys (with or without ``text_model.``) -> open_clip text keys.

    The last resblock diffusers dropped cannot be recovered. With ``add_last`` it is filled as an
    identity block (zero attention and MLP weights, unit layer norms): the penultimate output,
    which SD v2 uses, is unchanged, and layer="last" gives the same context. ``text_projection``
    comes from ``text_projection.weight`` (``CLIPTextModelWithProjection``) or is the identity;
    ``logit_scale`` is open_clip's initial log(1/0.07).
    """
    sd = {key.removeprefix(HF): value for key, value in sd.items()}
    inverse_top = {hf: oc for oc, hf in _TOP.items()}
    out = {inverse_top[key]: value for key, value in sd.items() if key in inverse_top}
    inverse_block = {hf: oc for oc, hf in _BLOCK.items()}
    for key, value in sd.items():
        match = _HF_BLOCK.match(key)
        if not match:
            continue
        index, name, kind = match.groups()
        if name.startswith("self_attn.") and name.removeprefix("self_attn.") in _QKV:
            continue  # concatenated below
        out[f"transformer.resblocks.{index}.{inverse_block[name]}.{kind}"] = value
    layers = _count_blocks(sd, _HF_BLOCK)
    for index in range(layers):
        for kind in ("weight", "bias"):
            parts = [sd[f"encoder.layers.{index}.self_attn.{proj}.{kind}"] for proj in _QKV]
            out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts)  # (3·width, …)
    width = out["token_embedding.weight"].shape[1]
    if add_last:
        out.update(_identity_block(out, layers))
    projection = sd.get("text_projection.weight")
    out["text_projection"] = projection.T.contiguous() if projection is not None else torch.eye(width)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def _identity_block(sd: StateDict, index: int) -> StateDict:
    """Resblock ``index`` shaped like block ``index - 1`` whose residual branches are zero."""
    prefix, source = f"transformer.resblocks.{index}.", f"transformer.resblocks.{index - 1}."
    block = {}
    for key, value in sd.items():
        if key.startswith(source):
            name = key.removeprefix(source)
            unit_norm = name.startswith("ln_") and name.endswith("weight")
            block[prefix + name] = torch.ones_like(value) if unit_norm else torch.zeros_like(value)
    return block


def _count_blocks(sd: StateDict, pattern: re.Pattern[str]) -> int:
    indices = {int(match[1]) for key in sd if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def text_config_to_hf(config: TextEncoderConfig) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of the transformers model diffusers would store for ``config``.

    kind openclip with layer="penultimate" loses its last layer (see ``openclip_to_hf``). kind
    clip keeps every layer; its ``layer`` (clip skip) is a pipeline setting there, not config.
    """
    drop = config.kind == "openclip" and config.layer == "penultimate"
    return hf_text_kwargs(config, layers=config.layers - 1 if drop else config.layers)


def text_config_from_hf(cfg: dict[str, Any], kind: str = "clip") -> TextEncoderConfig:
    """``TextEncoderConfig`` from a ``CLIPTextConfig`` dict (a diffusers ``text_encoder/config.json``).

    kind openclip is the inverse of ``text_config_to_hf``: one layer more, layer="penultimate".
    Missing entries take ``CLIPTextConfig``'s defaults.
    """
    check_choice("kind", kind, ("clip", "openclip"))
    width = int(cfg.get("hidden_size", 512))
    layers = int(cfg.get("num_hidden_layers", 12))
    return TextEncoderConfig(
        kind=kind,
        vocab_size=int(cfg.get("vocab_size", 49408)),
        width=width,
        layers=layers + 1 if kind == "openclip" else layers,
        heads=int(cfg.get("num_attention_heads", 8)),
        max_length=int(cfg.get("max_position_embeddings", 77)),
        mlp_ratio=int(cfg.get("intermediate_size", 2048)) / width,
        act=cfg.get("hidden_act", "quick_gelu"),
        layer="penultimate" if kind == "openclip" else "last",
    )


def infer_text_config(sd: StateDict, kind: str, **overrides: Any) -> TextEncoderConfig:
    """``TextEncoderConfig`` of a state dict in ``kind``'s own layout (no ``cond_stage_model`` prefix).

    Shapes give vocab, width, depth, context and MLP sizes. They cannot give the rest: heads is
    width / 64 (true of SD v1 and v2), act and layer are SD v1's (quick_gelu, last) for clip and
    SD v2's (gelu, penultimate) for openclip; pass ``overrides`` for anything else.
    """
    check_choice("kind", kind, ("clip", "openclip"))
    if kind == "clip":
        sd = {key.removeprefix(HF): value for key, value in sd.items()}
        tokens, positions = sd["embeddings.token_embedding.weight"], sd["embeddings.position_embedding.weight"]
        layers, mlp = _count_blocks(sd, _HF_BLOCK), sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        defaults = {"act": "quick_gelu", "layer": "last"}
    else:
        tokens, positions = sd["token_embedding.weight"], sd["positional_embedding"]
        layers, mlp = _count_blocks(sd, _OC_BLOCK), sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        defaults = {"act": "gelu", "layer": "penultimate"}
    vocab_size, width = tokens.shape
    values = dict(kind=kind, vocab_size=vocab_size, width=width, layers=layers, heads=width // HEAD_DIM,
                  max_length=positions.shape[0], mlp_ratio=mlp / width, **defaults)
    return TextEncoderConfig(**{**values, **overrides})
