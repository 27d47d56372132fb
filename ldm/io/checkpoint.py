"""The in-memory form every checkpoint format is read into and written from.

A :class:`Checkpoint` holds, per component, a state dict in the original Stable Diffusion key
layout (prefixes stripped; the text encoder in transformers' or open_clip's own keys) and a
plain config dict of that component's typed config. Our folder format is this, on disk:
``model.yaml`` beside ``unet.safetensors``, ``vae.safetensors``, ``text_encoder.safetensors``
and an optional ``ema.safetensors``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.config import ConfigError, load_yaml, save_yaml
from ldm.io.files import CheckpointError, atomic_folder, load_state_dict, save_state_dict
from ldm.modules.unet import without_legacy_keys

REQUIRED = ("vae",)  # an autoencoder alone is a valid folder (ldm train-autoencoder writes one)
COMPONENTS = ("unet", "vae", "text_encoder", "classifier")  # the last two are optional
CONFIG_FILE = "model.yaml"


@dataclasses.dataclass
class Checkpoint:
    """Weights and configs of one text-to-image model, in the canonical layout."""

    # {"unet": {...}, "vae": {...}, "schedule": {...}, optional "text_encoder", "tokenizer",
    #  "classifier", "concat": {"kind": "image" | "semantic", "num_classes": K}, "sample_size"}
    config: dict[str, Any]
    weights: dict[str, dict[str, Tensor]]  # component name -> state dict
    ema: dict[str, Tensor] | None = None  # EMA weights of the U-Net, if kept apart


def detect_format(path: str | Path) -> str:
    """'folder' (ours), 'diffusers' or 'single_file', from what is at ``path``."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return "folder"
        if (path / "model_index.json").is_file():
            return "diffusers"
        raise CheckpointError(
            f"{path}: a folder with neither {CONFIG_FILE} (ldm-toolkit) nor model_index.json (diffusers); "
            f"found: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'}"
        )
    if path.is_file():
        return "single_file"
    raise CheckpointError(f"model path {str(path)!r} does not exist")


def read_folder(path: str | Path) -> Checkpoint:
    """Read our folder format."""
    path = Path(path)
    config = load_yaml(path / CONFIG_FILE)
    missing = [name for name in REQUIRED if name not in config]
    if missing:
        raise ConfigError(f"{path / CONFIG_FILE}: missing key {missing[0]!r}; required: {', '.join(REQUIRED)}")
    weights = {name: load_state_dict(path / f"{name}.safetensors") for name in COMPONENTS if name in config}
    ema_file = path / "ema.safetensors"
    return Checkpoint(upgrade_config(config), weights, load_state_dict(ema_file) if ema_file.is_file() else None)


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored model config as this version reads it: keys older versions saved that are no longer part
    of a component's config (the U-Net's ``gradient_checkpointing``) are dropped."""
    if isinstance(config.get("unet"), dict):
        config = {**config, "unet": without_legacy_keys(config["unet"])}
    return config


def write_folder(checkpoint: Checkpoint, path: str | Path) -> None:
    """Write our folder format, the whole folder atomically (``atomic_folder``)."""
    with atomic_folder(path) as tmp:
        for name, state in checkpoint.weights.items():
            save_state_dict(state, tmp / f"{name}.safetensors")
        if checkpoint.ema is not None:
            save_state_dict(checkpoint.ema, tmp / "ema.safetensors")
        save_yaml(checkpoint.config, tmp / CONFIG_FILE)


def half_precision(checkpoint: Checkpoint) -> Checkpoint:
    """A copy with float weights in float16 and the U-Net's EMA weights (if kept apart) as the U-Net:
    the form the demo models ship in (loading casts back to each module's dtype)."""
    weights = dict(checkpoint.weights)
    if checkpoint.ema is not None and "unet" in weights:
        weights["unet"] = checkpoint.ema

    def half(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    return Checkpoint(dict(checkpoint.config), {name: half(state) for name, state in weights.items()})
