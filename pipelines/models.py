"""The networks of one text-to-image model, built from any checkpoint format and saved back."""

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
from ldm.modules.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Models:
    """U-Net, autoencoder, text encoder, tokenizer and schedule of one model, in eval mode."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: ClipTokenizer
    schedule: ScheduleConfig
    sample_size: int  # default latent side

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, source: str = "checkpoint", use_ema: bool = True) -> Models:
        config = checkpoint.config
        try:
            unet = UNet(config_from_dict(UNetConfig, config["unet"], source, "unet."))
            vae = AutoencoderKL(config_from_dict(AutoencoderConfig, config["vae"], source, "vae."))
            text = TextEncoder(config_from_dict(TextEncoderConfig, config["text_encoder"], source, "text_encoder."))
            schedule = config_from_dict(ScheduleConfig, config.get("schedule", {}), source, "schedule.")
        except KeyError as err:
            raise ConfigError(f"{source}: missing key {err.args[0]!r}") from None
        unet_weights = checkpoint.ema if (use_ema and checkpoint.ema is not None) else checkpoint.weights["unet"]
        for name, module, weights in (("unet", unet, unet_weights), ("vae", vae, checkpoint.weights["vae"]),
                                      ("text_encoder", text, checkpoint.weights["text_encoder"])):
            _load_strict(module, weights, f"{source} ({name})")
        tokenizer = ClipTokenizer(**config.get("tokenizer", {}))
        return cls(unet.eval(), vae.eval(), text.eval(), tokenizer, schedule, int(config.get("sample_size", 64)))

    def to_checkpoint(self) -> Checkpoint:
        config = {
            "unet": config_to_dict(self.unet.config),
            "vae": config_to_dict(self.vae.config),
            "text_encoder": config_to_dict(self.text_encoder.config),
            "schedule": config_to_dict(self.schedule),
            "tokenizer": {"max_length": self.tokenizer.max_length, "pad_token_id": self.tokenizer.pad_token_id},
            "sample_size": self.sample_size,
        }
        weights = {"unet": self.unet.state_dict(), "vae": self.vae.state_dict(), "text_encoder": self.text_encoder.state_dict()}
        return Checkpoint(config, weights)

    def save(self, path: str | Path, to: str = "folder") -> None:
        """Save as our folder (default), a diffusers folder ("diffusers") or an SD single file ("sd")."""
        export_checkpoint(self.to_checkpoint(), path, to)


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
        raise CheckpointError(f"{source}: {k} has shape {tuple(weights[k].shape)}; the config expects {tuple(expected[k].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
