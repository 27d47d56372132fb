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
from ldm.diffusion.guidance import check_interval
from ldm.diffusion.schedule import ScheduleConfig
from ldm.io import Checkpoint, CheckpointError, export_checkpoint, read_checkpoint
from ldm.io.checkpoint import CONFIG_FILE
from ldm.modules.classifier import ClassifierConfig, NoiseAwareClassifier
from ldm.modules.size import build_within_limit
from ldm.modules.unet import UNet, UNetConfig
from ldm.validation import check_choice, check_int

logger = logging.getLogger(__name__)
CONCAT_KINDS = ("image", "semantic")


@dataclasses.dataclass
class ConcatConfig:
    """A spatial condition concatenated to the latents: the low-resolution image ("image", super-resolution by
    ``upscale``, default the autoencoder's factor) or a one-hot label map ("semantic" of ``num_classes``)."""

    kind: str
    num_classes: int | None = None
    upscale: int | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, CONCAT_KINDS)
        if self.kind == "semantic":
            check_int("num_classes", self.num_classes, 1)
        if self.upscale is not None:
            check_int("upscale", self.upscale, 1)


@dataclasses.dataclass
class SamplingDefaults:
    """How this model samples when a call does not say: ``guidance_interval`` (σ_lo, σ_hi; σ_hi None: inf)
    limits classifier-free guidance to those noise levels (``None``: every level, as diffusers does)."""

    guidance_interval: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.guidance_interval is not None:
            check_interval(self.guidance_interval)
            self.guidance_interval = tuple(self.guidance_interval)


@dataclasses.dataclass
class TokenizerConfig:
    max_length: int = 77
    pad_token_id: int = 49407


@dataclasses.dataclass
class ModelConfig:
    """The typed form of ``model.yaml`` (and of the config read from a diffusers folder or an SD file): every
    component's config, the schedule and what conditions the model. Reading one checks every key and value and
    names the file, the key and what is allowed."""

    vae: AutoencoderConfig
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    unet: UNetConfig | None = None  # None: an autoencoder alone (ldm train-autoencoder)
    text_encoder: TextEncoderConfig | None = None
    tokenizer: TokenizerConfig | None = None
    concat: ConcatConfig | None = None
    classifier: ClassifierConfig | None = None
    class_names: tuple[str, ...] | None = None  # the classifier's labels, by index
    sample_size: int = 64  # the default latent side
    sampling: SamplingDefaults | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model.yaml") -> ModelConfig:
        return config_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, without the parts that are None."""
        return {key: value for key, value in config_to_dict(self).items() if value is not None}


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
    sampling: SamplingDefaults = dataclasses.field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        if self.concat is not None:
            if not isinstance(self.concat, dict):
                raise ValueError(f"concat={self.concat!r} is not allowed; allowed: a mapping with kind, num_classes")
            config_from_dict(ConcatConfig, self.concat, "concat", "concat.")
        if (self.text_encoder is None) != (self.tokenizer is None):
            raise ValueError("text_encoder and tokenizer come together; got only one of them")

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, source: str = "checkpoint", use_ema: bool = True) -> Models:
        config, weights = ModelConfig.from_dict(checkpoint.config, source), dict(checkpoint.weights)
        if config.unet is None or "unet" not in weights:
            raise CheckpointError(f"{source}: holds an autoencoder only (no U-Net); use it as model.autoencoder_from")
        if use_ema and checkpoint.ema is not None:
            weights["unet"] = checkpoint.ema
        modules = {name: _build(name, config, source) for name in weights}
        for name, module in modules.items():
            _load_strict(module, weights[name], f"{source} ({name})")
        text = modules.get("text_encoder")
        tokenizer = ClipTokenizer(**config_to_dict(config.tokenizer or TokenizerConfig())) if text is not None else None
        return cls(
            unet=modules["unet"].eval(), vae=modules["vae"].eval(), schedule=config.schedule,
            sample_size=config.sample_size, text_encoder=text.eval() if text is not None else None,
            tokenizer=tokenizer, concat=_plain(config.concat),
            classifier=modules["classifier"].eval() if "classifier" in modules else None,
            class_names=list(config.class_names) if config.class_names else None,
            sampling=config.sampling or SamplingDefaults(),
        )

    def config(self) -> ModelConfig:
        """The typed config of these networks (what ``model.yaml`` holds)."""
        tokenizer = self.tokenizer and TokenizerConfig(self.tokenizer.max_length, self.tokenizer.pad_token_id)
        concat = ConcatConfig(**self.concat) if self.concat is not None else None
        classifier = self.classifier.config if self.classifier is not None else None
        return ModelConfig(self.vae.config, self.schedule, self.unet.config,
                           self.text_encoder.config if self.text_encoder is not None else None, tokenizer, concat,
                           classifier, tuple(self.class_names) if self.class_names else None, self.sample_size,
                           self.sampling if self.sampling != SamplingDefaults() else None)

    def to_checkpoint(self) -> Checkpoint:
        modules = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "classifier": self.classifier}
        weights = {name: module.state_dict() for name, module in modules.items() if module is not None}
        return Checkpoint(self.config().to_dict(), weights)

    def save(self, path: str | Path, to: str = "folder") -> None:
        """Save as our folder (default), a diffusers folder ("diffusers") or an SD single file ("sd")."""
        export_checkpoint(self.to_checkpoint(), path, to)


_BUILDERS = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": TextEncoder, "classifier": NoiseAwareClassifier}


def _plain(config: ConcatConfig | None) -> dict[str, Any] | None:
    """The concat config as the dict ``Models.concat`` holds (the fields that are set)."""
    return None if config is None else {k: v for k, v in config_to_dict(config).items() if v is not None}


def _build(name: str, config: ModelConfig, source: str) -> nn.Module:
    if getattr(config, name) is None:
        raise ConfigError(f"{source}: missing key {name!r} (weights for it are present)")
    return build_within_limit(lambda: _BUILDERS[name](getattr(config, name)), f"{source} ({name})")


def load_models(source: str | Path, **options: Any) -> Models:
    """Build the models from our folder, a diffusers folder or an SD single file."""
    use_ema = options.pop("use_ema", True)
    checkpoint = read_checkpoint(source, use_ema=use_ema, **options)
    return Models.from_checkpoint(checkpoint, config_source(source), use_ema=use_ema)


def config_source(source: str | Path) -> str:
    """Where a model's config comes from, for error messages: ``model.yaml`` of our folders, else the path."""
    path = Path(source)
    return str(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else str(path)


def _load_strict(module: nn.Module, weights: dict, source: str) -> None:
    expected = module.state_dict()
    optional = set(getattr(module, "optional_keys", ()))  # unused by the model; files may leave them out
    missing = sorted(set(expected) - set(weights) - optional)
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the configured model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    wrong = [k for k in expected if k in weights and tuple(expected[k].shape) != tuple(weights[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: {k} has shape {tuple(weights[k].shape)}; "
                              f"the config expects {tuple(expected[k].shape)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()}, strict=not optional)
