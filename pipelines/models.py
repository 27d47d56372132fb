"""The networks of one model, built from any checkpoint format and saved back."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.conditioning.text import TextEncoder, TextEncoderConfig
from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.config import ConfigError, config_from_dict, config_to_dict
from ldm.diffusion.schedule import ScheduleConfig
from ldm.io import Checkpoint, CheckpointError, export_checkpoint, read_checkpoint
from ldm.modules.classifier import ClassifierConfig, NoiseAwareClassifier
from ldm.modules.unet import UNet, UNetConfig
from ldm.validation import check_choice, check_int

logger = logging.getLogger(__name__)
CONCAT_KINDS = ("image", "semantic")


@dataclasses.dataclass
class Models:
    """U-Net, autoencoder and schedule of one model, with what conditions it: a text encoder and
    tokenizer, a concat condition ({"kind": "image"} or {"kind": "semantic", "num_classes": K}),
    and a noise-aware classifier on its latents. Modules are in eval mode."""

    unet: UNet
    vae: AutoencoderKL
    schedule: ScheduleConfig
    sample_size: int  # default latent side
    text_encoder: TextEncoder | None = None
    tokenizer: ClipTokenizer | None = None
    concat: dict[str, Any] | None = None
    classifier: NoiseAwareClassifier | None = None
    class_names: list[str] | None = None  # the classifier's labels, by index

    def __post_init__(self) -> None:
        if self.concat is not None:
            if not isinstance(self.concat, dict):
                raise ValueError(f"concat={self.concat!r} is not allowed; "
                                 "allowed: a mapping with kind (and num_classes)")
            check_choice("concat.kind", self.concat.get("kind"), CONCAT_KINDS)
            if self.concat["kind"] == "semantic":
                check_int("concat.num_classes", self.concat.get("num_classes"), 1)
        if (self.text_encoder is None) != (self.tokenizer is None):
            raise ValueError("text_encoder and tokenizer come together; got only one of them")

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, source: str = "checkpoint", use_ema: bool = True) -> Models:
        config, weights = checkpoint.config, dict(checkpoint.weights)
        if "unet" not in weights:
            raise CheckpointError(f"{source}: holds an autoencoder only (no U-Net); use it as model.autoencoder_from")
        if use_ema and checkpoint.ema is not None:
            weights["unet"] = checkpoint.ema
        modules = {name: _build(name, config, source) for name in weights}
        for name, module in modules.items():
            _load_strict(module, weights[name], f"{source} ({name})")
        tokenizer = ClipTokenizer(**config.get("tokenizer", {})) if "text_encoder" in modules else None
        return cls(
            unet=modules["unet"].eval(), vae=modules["vae"].eval(),
            schedule=config_from_dict(ScheduleConfig, config.get("schedule", {}), source, "schedule."),
            sample_size=int(config.get("sample_size", 64)),
            text_encoder=modules["text_encoder"].eval() if "text_encoder" in modules else None, tokenizer=tokenizer,
            concat=config.get("concat"),
            classifier=modules["classifier"].eval() if "classifier" in modules else None,
            class_names=config.get("class_names"),
        )

    def to_checkpoint(self) -> Checkpoint:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "classifier": self.classifier}
        modules = {name: module for name, module in modules.items() if module is not None}
        config: dict[str, Any] = {name: config_to_dict(module.config) for name, module in modules.items()}
        config.update(schedule=config_to_dict(self.schedule), sample_size=self.sample_size)
        if self.tokenizer is not None:
            config["tokenizer"] = {"max_length": self.tokenizer.max_length, "pad_token_id": self.tokenizer.pad_token_id}
        if self.concat is not None:
            config["concat"] = dict(self.concat)
        if self.class_names is not None:
            config["class_names"] = list(self.class_names)
        return Checkpoint(config, {name: module.state_dict() for name, module in modules.items()})

    def save(self, path: str | Path, to: str = "folder") -> None:
        """Save as our folder (default), a diffusers folder ("diffusers") or an SD single file ("sd")."""
        export_checkpoint(self.to_checkpoint(), path, to)


_BUILDERS = {
    "unet": (UNet, UNetConfig),
    "vae": (AutoencoderKL, AutoencoderConfig),
    "text_encoder": (TextEncoder, TextEncoderConfig),
    "classifier": (NoiseAwareClassifier, ClassifierConfig),
}


def _build(name: str, config: dict[str, Any], source: str) -> nn.Module:
    if name not in config:
        raise ConfigError(f"{source}: missing key {name!r} (weights for it are present)")
    module_cls, config_cls = _BUILDERS[name]
    return module_cls(config_from_dict(config_cls, config[name], source, f"{name}."))


def load_models(source: str | Path, **options: Any) -> Models:
    """Build the models from our folder, a diffusers folder or an SD single file."""
    use_ema = options.pop("use_ema", True)
    checkpoint = read_checkpoint(source, use_ema=use_ema, **options)
    return Models.from_checkpoint(checkpoint, str(source), use_ema=use_ema)


def _load_strict(module: nn.Module, weights: dict, source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the configured model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    wrong = [k for k in expected if tuple(expected[k].shape) != tuple(weights[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: {k} has shape {tuple(weights[k].shape)}; "
                              f"the config expects {tuple(expected[k].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
