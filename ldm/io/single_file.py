"""Original Stable Diffusion single files: one state dict whose keys carry component prefixes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.conditioning.text import TextEncoderConfig
from ldm.conditioning.tokenizer import pad_token_id_for
from ldm.config import config_from_dict, config_to_dict
from ldm.diffusion.schedule import ScheduleConfig
from ldm.io.checkpoint import Checkpoint, upgrade_config
from ldm.io.files import CheckpointError, load_state_dict, read_metadata, save_state_dict
from ldm.io.text_keys import hf_to_openclip, infer_text_config
from ldm.io.unet_keys import infer_unet_config
from ldm.io.vae_keys import infer_vae_config

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
EMA_PREFIX = "model_ema."
CONFIG_KEY = "ldm_toolkit.config"  # our full model config, in the safetensors metadata of files we write


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def text_kind(state: dict[str, Tensor]) -> str:
    """'clip' (SD v1, transformers keys) or 'openclip' (SD v2, open_clip keys)."""
    for kind, prefix in TEXT_PREFIXES.items():
        if any(k.startswith(prefix) for k in state):
            return kind
    raise CheckpointError("no text encoder found: expected keys under " + " or ".join(TEXT_PREFIXES.values()))


def ema_unet(state: dict[str, Tensor], unet: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The EMA copy of the U-Net in a full CompVis checkpoint, where LitEma stores
    ``model.diffusion_model.a.b`` as ``model_ema.diffusion_modelab``; None if absent."""
    names = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in unet}
    if not all(name in state for name in names.values()):
        return None
    return {k: state[name] for k, name in names.items()}


def split_single_file(state: dict[str, Tensor], source: str,
                      use_ema: bool = True) -> tuple[dict[str, dict[str, Tensor]], str]:
    """Split into {'unet', 'vae', 'text_encoder'} state dicts (prefixes stripped) and the text kind.

    With ``use_ema`` the U-Net takes the EMA weights when the file holds them (full training
    checkpoints); EMA-only (pruned) files already hold them as the model weights.
    """
    unet = strip_prefix(state, UNET_PREFIX)
    vae = strip_prefix(state, VAE_PREFIX)
    if not unet or not vae:
        found = sorted({k.split(".")[0] for k in state})[:8]
        raise CheckpointError(
            f"{source}: not a Stable Diffusion checkpoint: expected keys under {UNET_PREFIX!r} and "
            f"{VAE_PREFIX!r}; found top-level names: {', '.join(found)}"
        )
    try:
        kind = text_kind(state)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    ema = ema_unet(state, unet) if use_ema else None
    if ema is not None:
        logger.info("%s: using the EMA weights of the U-Net", source)
        unet = ema
    return {"unet": unet, "vae": vae, "text_encoder": strip_prefix(state, TEXT_PREFIXES[kind])}, kind


def join_single_file(weights: dict[str, dict[str, Tensor]], kind: str) -> dict[str, Tensor]:
    """The inverse of :func:`split_single_file` (without EMA)."""
    return {
        **add_prefix(weights["unet"], UNET_PREFIX),
        **add_prefix(weights["vae"], VAE_PREFIX),
        **add_prefix(weights["text_encoder"], TEXT_PREFIXES[kind]),
    }


def read_single_file(
    path: str | Path,
    *,
    use_ema: bool = True,
    prediction_type: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Checkpoint:
    """Read an original SD v1/v2 single file, inferring each component's config from its keys
    and shapes. What the weights cannot tell (v-prediction for SD 2.x 768-v, heads, norm groups,
    the VAE scale factor) comes from ``prediction_type`` (default epsilon) and ``overrides``
    ({component: {field: value}}) — or, in a file this toolkit wrote, from the config it stored beside the
    weights (safetensors metadata ``ldm_toolkit.config``)."""
    path = Path(path)
    overrides = overrides or {}
    weights, kind = split_single_file(load_state_dict(path), str(path), use_ema)
    stored = read_metadata(path).get(CONFIG_KEY)
    if stored is not None:
        return _stored_checkpoint(stored, weights, path, prediction_type)
    prediction_type = prediction_type or "epsilon"
    weights["text_encoder"].pop("text_model.embeddings.position_ids", None)  # a buffer older transformers saved
    try:
        unet = infer_unet_config(weights["unet"], **overrides.get("unet", {}))
        vae = {**infer_vae_config(weights["vae"]), **overrides.get("vae", {})}
        text = infer_text_config(weights["text_encoder"], kind, **overrides.get("text_encoder", {}))
        schedule = ScheduleConfig(
            **{"beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction_type,
               **overrides.get("schedule", {})}
        )
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    config = {
        "unet": config_to_dict(unet),
        "vae": vae,
        "text_encoder": config_to_dict(text),
        "schedule": config_to_dict(schedule),
        "tokenizer": {"max_length": text.max_length, "pad_token_id": pad_token_id_for(kind)},
        "sample_size": 64,
    }
    return Checkpoint(config, weights)


def _stored_checkpoint(stored: str, weights: dict[str, dict[str, Tensor]], path: Path,
                       prediction_type: str | None) -> Checkpoint:
    """The checkpoint of a file this toolkit wrote: the weights with the config stored in its metadata."""
    try:
        config = json.loads(stored)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY} is not JSON ({err})") from None
    if not isinstance(config, dict) or not {"unet", "vae", "text_encoder", "schedule"} <= set(config):
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY} lacks a unet, vae, text_encoder or schedule config")
    if prediction_type is not None:
        config["schedule"]["prediction_type"] = prediction_type
    return Checkpoint(upgrade_config(config), weights)


def write_single_file(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write the original single-file layout (safetensors), with our config in the metadata (``ldm_toolkit.config``:
    what the weights cannot tell, such as the schedule and the VAE scale factor; other tools ignore it). A
    diffusers-style SD v2 text encoder (transformers layout with GELU) is written in open_clip's layout, as SD v2
    files hold it."""
    text_cfg = config_from_dict(TextEncoderConfig, checkpoint.config.get("text_encoder", {}), str(path),
                                "text_encoder.")
    text = checkpoint.weights["text_encoder"]
    kind = text_cfg.kind
    if kind == "clip" and text_cfg.act == "gelu":
        text, kind = hf_to_openclip(text, add_last=text_cfg.layer == "last"), "openclip"
    weights = {**checkpoint.weights, "text_encoder": text}
    if checkpoint.ema is not None:
        weights["unet"] = checkpoint.ema
    config = {key: value for key, value in checkpoint.config.items() if key != "classifier"}
    if kind != text_cfg.kind:  # written in open_clip's layout: read back as such
        config = {**config, "text_encoder": {**config_to_dict(text_cfg), "kind": kind}}
    save_state_dict(join_single_file(weights, kind), path, metadata={"format": "pt", CONFIG_KEY: json.dumps(config)})
