"""diffusers ``StableDiffusionPipeline`` folders: read into and write from a :class:`Checkpoint`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
from torch import Tensor
from transformers import CLIPTextConfig

from ldm.conditioning.text import TextEncoderConfig
from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.config import config_from_dict, config_to_dict
from ldm.diffusion.schedule import ScheduleConfig
from ldm.io.checkpoint import Checkpoint
from ldm.io.files import (
    CheckpointError,
    atomic_folder,
    load_state_dict,
    read_json_object,
    save_state_dict,
    write_text_atomic,
)
from ldm.io.scheduler_config import schedule_from_diffusers, schedule_to_diffusers
from ldm.io.text_keys import HF, openclip_to_hf, text_config_from_hf, text_config_to_hf
from ldm.io.unet_keys import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
)
from ldm.io.vae_keys import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_to_original,
    vae_original_to_diffusers,
)
from ldm.modules.unet import UNetConfig

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                      "diffusion_pytorch_model.bin")
_WEIGHT_NAMES = {
    "unet": _DIFFUSERS_WEIGHTS,
    "vae": _DIFFUSERS_WEIGHTS,
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _read_weights(folder: Path, component: str) -> dict[str, Tensor]:
    for name in _WEIGHT_NAMES[component]:
        if (folder / component / name).is_file():
            return {k: v.float() for k, v in load_state_dict(folder / component / name).items()}
    raise CheckpointError(f"{folder / component}: no weights; expected one of {', '.join(_WEIGHT_NAMES[component])}")


def read_diffusers(path: str | Path) -> Checkpoint:
    """Read a diffusers Stable Diffusion folder; the text encoder becomes kind "clip" (as stored)."""
    folder = Path(path)
    unet_cfg_json = _read_json(folder / "unet" / "config.json")
    unet_config = _convert(unet_config_from_diffusers, unet_cfg_json, folder / "unet" / "config.json")
    vae_json, text_json = folder / "vae" / "config.json", folder / "text_encoder" / "config.json"
    vae_config = _convert(vae_config_from_diffusers, _read_json(vae_json), vae_json)
    text_config = _convert(text_config_from_hf, _read_json(text_json), text_json)
    schedule = schedule_from_diffusers(_read_json(folder / "scheduler" / "scheduler_config.json"),
                                       str(folder / "scheduler"))
    tokenizer = ClipTokenizer.from_hf(folder / "tokenizer")
    text = {k if k.startswith(HF) else HF + k: v for k, v in _read_weights(folder, "text_encoder").items()}
    text.pop(HF + "embeddings.position_ids", None)  # a buffer older transformers saved
    weights = {
        "unet": unet_diffusers_to_original(_read_weights(folder, "unet"), unet_config),
        "vae": vae_diffusers_to_original(_read_weights(folder, "vae")),
        "text_encoder": text,
    }
    config = {
        "unet": config_to_dict(unet_config),
        "vae": dict(vae_config),
        "text_encoder": config_to_dict(text_config),
        "schedule": config_to_dict(schedule),
        "tokenizer": {"max_length": tokenizer.max_length, "pad_token_id": tokenizer.pad_token_id},
        "sample_size": int(unet_cfg_json.get("sample_size", 64)),
    }
    return Checkpoint(config, weights)


def _convert(fn, cfg: dict[str, Any], source: Path):
    try:
        return fn(cfg)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def write_diffusers(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write a folder ``StableDiffusionPipeline.from_pretrained`` loads (EMA weights, if kept apart,
    become the U-Net's weights, as they are the ones to sample with)."""
    config = checkpoint.config
    unet_config = config_from_dict(UNetConfig, config.get("unet", {}), str(path), "unet.")
    text_config = config_from_dict(TextEncoderConfig, config.get("text_encoder", {}), str(path), "text_encoder.")
    schedule = config_from_dict(ScheduleConfig, config.get("schedule", {}), str(path), "schedule.")
    with atomic_folder(path) as tmp:
        _write_components(checkpoint, tmp, unet_config, text_config, schedule)


def _write_components(checkpoint: Checkpoint, folder: Path, unet_config: UNetConfig,
                      text_config: TextEncoderConfig, schedule: ScheduleConfig) -> None:
    config = checkpoint.config
    unet_weights = checkpoint.ema if checkpoint.ema is not None else checkpoint.weights["unet"]
    unet_json = unet_config_to_diffusers(unet_config, config.get("sample_size"))
    _write_json(folder / "unet" / "config.json", _diffusers_config("UNet2DConditionModel", unet_json))
    save_state_dict(unet_original_to_diffusers(unet_weights, unet_config), folder / "unet" / _WEIGHT_NAMES["unet"][0])
    _write_json(folder / "vae" / "config.json",
                _diffusers_config("AutoencoderKL", vae_config_to_diffusers(config["vae"])))
    save_state_dict(vae_original_to_diffusers(checkpoint.weights["vae"]), folder / "vae" / _WEIGHT_NAMES["vae"][0])
    _write_text_encoder(folder / "text_encoder", checkpoint.weights["text_encoder"], text_config)
    _write_json(folder / "scheduler" / "scheduler_config.json",
                _diffusers_config("DDIMScheduler", schedule_to_diffusers(schedule)))
    ClipTokenizer(**config.get("tokenizer", {})).save_hf(folder / "tokenizer")
    _write_json(folder / "model_index.json", _model_index())


def _write_text_encoder(folder: Path, weights: dict[str, Tensor], config: TextEncoderConfig) -> None:
    hf = text_config_to_hf(config)
    if config.kind == "openclip":
        weights = openclip_to_hf(weights, config.layers, drop_last=config.layer == "penultimate")
    # float32, as diffusers loads the U-Net and VAE by default: transformers would otherwise take the stored dtype
    # (float16 for the demo models) and the text encoder's output would not match the U-Net's weights
    hf_config = CLIPTextConfig(**hf, dtype="float32").to_dict()
    _write_json(folder / "config.json", {**hf_config, "architectures": ["CLIPTextModel"]})
    save_state_dict({k if k.startswith(HF) else HF + k: v for k, v in weights.items()},
                    folder / _WEIGHT_NAMES["text_encoder"][0])


def _diffusers_config(class_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **cfg}


def _model_index() -> dict[str, Any]:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
