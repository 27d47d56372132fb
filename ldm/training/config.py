"""The typed config of ``ldm train``; YAML files and ``--set key=value`` validate into it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm.config import ConfigError, config_from_dict, config_to_dict, load_yaml, parse_yaml
from ldm.io.files import write_text_atomic
from ldm.validation import check_float, check_int

MAX_IMAGE_SIZE = 2048  # training image side; SD XL trains at 1024


@dataclass
class DataConfig:
    kind: str = "shapes"  # "shapes" (ldm.data.shapes) or "folder" (images + metadata.jsonl)
    path: str | None = None  # the image-caption folder, for kind "folder"
    image_size: int = 64
    length: int = 100_000  # shapes: how many distinct samples the stream cycles through
    seed: int = 0  # shapes: the data seed (evaluation uses others)
    two_object_prob: float = 0.3
    drop_prob: float = 0.5  # shapes: chance of dropping each optional caption part
    objects: str = "any"  # shapes: "any" (one or two by two_object_prob), "one" or "two" objects per image

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "folder"):
            raise ValueError(f"kind={self.kind!r} is not supported; allowed: 'shapes', 'folder'")
        if self.objects not in ("any", "one", "two"):
            raise ValueError(f"objects={self.objects!r} is not supported; allowed: 'any', 'one', 'two'")
        if self.kind == "folder" and not self.path:
            raise ValueError("kind='folder' needs path: the folder with metadata.jsonl")
        check_int("data.image_size", self.image_size, 8, MAX_IMAGE_SIZE)  # a batch is allocated at this size
        check_int("data.length", self.length, 1, 10**12)
        check_float("data.two_object_prob", self.two_object_prob, 0.0, 1.0)
        check_float("data.drop_prob", self.drop_prob, 0.0, 1.0)


@dataclass
class ModelSpec:
    """Start from ``init_from`` (any model format or demo name), or build from the component configs. With
    ``init_from``, ``unet`` may add inputs (a larger ``in_channels``: ``widen_inputs``, with ``concat`` the condition
    they take) and ``schedule`` fields replace the loaded model's; the other component configs are not used."""

    init_from: str | None = None
    autoencoder_from: str | None = None  # take the (frozen) autoencoder of this model
    # with autoencoder_from, model.vae may hold only {scale_factor: X | "auto"}; "auto" measures 1/std of the
    # latents of the first 512 training images (as SD's 0.18215 was measured)
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] | None = field(default_factory=dict)  # None: no text conditioning
    # take the text encoder (config and weights) of this CLIP folder (ldm train-clip, transformers' CLIPModel) or
    # model folder, or demo name, e.g. "demo-clip"; model.text_encoder must then be left empty. With init_from it
    # replaces the loaded model's text encoder (of the U-Net's context width)
    text_encoder_from: str | None = None
    schedule: dict[str, Any] = field(default_factory=dict)
    concat: dict[str, Any] | None = None  # {"kind": "image"} (low-res copy) or {"kind": "semantic", "num_classes": 4}
    sample_size: int | None = None  # latent side; default image_size / VAE factor
    sampling: dict[str, Any] = field(default_factory=dict)  # the model's sampling defaults (guidance_interval)
    train_text_encoder: bool = False
    train_vae: bool = False  # let the diffusion loss train the autoencoder's encoder too (frozen by default)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay_steps: int = 0  # the last decay_steps of max_steps decay the rate linearly to 0 (warm-up, stable, decay)
    max_steps: int = 1000
    batch_size: int = 16  # per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    # the text encoder's rate as a share of lr (with model.train_text_encoder): a jointly trained encoder at the
    # U-Net's rate first shrinks the differences between its outputs, before the U-Net has learned to read them
    text_encoder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not supported; "
                             "allowed: 'no', 'fp16', 'bf16'")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; allowed: an integer >= 1")
        check_float("optim.text_encoder_lr_scale", self.text_encoder_lr_scale, 0.0)
        check_float("optim.lr", self.lr, 0.0)  # 0: no update (a run that only exports or measures)
        check_float("optim.weight_decay", self.weight_decay, 0.0)
        check_float("optim.max_grad_norm", self.max_grad_norm, 0.0)  # 0: no clipping
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={list(self.betas)!r} is not allowed; allowed: two numbers in [0, 1)")
        for beta in self.betas:
            check_float("optim.betas", beta, 0.0, 1.0, high_open=True)
        if not 0 <= self.decay_steps <= self.max_steps:
            raise ValueError(f"decay_steps={self.decay_steps!r} is out of range; "
                             f"allowed: 0..max_steps ({self.max_steps})")


@dataclass
class ObjectiveConfig:
    cond_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    latents: str = "sample"  # "sample" the autoencoder's posterior (LDM) or take its "mean"
    timestep_bias_portion: float = 0.0  # share of each batch with t drawn from [timestep_bias_begin, T)
    timestep_bias_begin: int = 0

    def __post_init__(self) -> None:
        if self.latents not in ("sample", "mean"):
            raise ValueError(f"latents={self.latents!r} is not supported; allowed: 'sample', 'mean'")
        check_float("objective.cond_dropout", self.cond_dropout, 0.0, 1.0)
        check_float("objective.timestep_bias_portion", self.timestep_bias_portion, 0.0, 1.0)
        check_int("objective.timestep_bias_begin", self.timestep_bias_begin, 0)


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True

    def __post_init__(self) -> None:
        check_float("ema.decay", self.decay, 0.0, 1.0, high_open=True)


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    output_dir: str = "runs/train"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False  # activation checkpointing of the U-Net while training (a runtime switch)
    cache_latents: bool = False  # keep each image's posterior moments in memory after its first encoding
    lpips_weights: str | None = None  # train-autoencoder: LPIPS (VGG16 + linear layers) file for the perceptual term
    param_checksums: bool = False  # write each rank's parameter checksum per step (multi-process checks)
    loss: dict[str, Any] = field(default_factory=dict)  # train-autoencoder: AutoencoderLossConfig fields
    classifier: dict[str, Any] = field(default_factory=dict)  # train-classifier: ClassifierConfig fields
    clip: dict[str, Any] = field(default_factory=dict)  # train-clip: ClipConfig fields (ldm.modules.clip)
    tracker: str | None = "tensorboard"  # Accelerate tracker for losses and sample grids; None: log.jsonl only
    sample_prompts: tuple[str, ...] = ("a red circle", "a large blue square in the top left",
                                       "a yellow triangle above a green square", "")  # grid at each checkpoint
    sample_steps: int = 20
    # every eval_every steps (at a checkpoint), the checkpoint's model draws eval_count held-out prompts of data seed
    # eval_seed (guidance 7.5, 25 dpmpp_2m steps) and the detector's adherence goes to OUTPUT_DIR/curve.jsonl
    eval_every: int = 0
    eval_count: int = 300
    eval_seed: int = 4002
    lora: dict[str, Any] | None = None  # finetune: {"rank": 4, "alpha": 4} trains LoRA adapters only
    # train-ti: {"token": "<my-thing>", "init_word": "square", "num_vectors": 1, "templates": ["a photo of {}"]}
    # (pipelines.training.textual_inversion.TextualInversionSettings)
    ti: dict[str, Any] | None = None
    # train-controlnet: {"hint": "semantic", "hint_block_channels": []}
    # (pipelines.training.controlnet.ControlNetSettings)
    controlnet: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_steps"):
            check_int(name, getattr(self, name), 1)
        check_int("eval_every", self.eval_every, 0)
        check_int("eval_count", self.eval_count, 1, 100_000)


OVERRIDES = {"output_dir": "output_dir", "max_steps": "optim.max_steps", "checkpoint_every": "checkpoint_every",
             "seed": "seed"}


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None,
                      sets: list[str] | None = None, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``path``, apply ``--set key.sub=value`` strings and the named overrides, and validate. ``defaults``
    (dotted key -> value) replace the dataclass defaults where the file does not set the key (a trainer's own
    defaults, e.g. no condition dropout for textual inversion)."""
    data = load_yaml(path)
    for dotted, value in (defaults or {}).items():
        if not _is_set(data, dotted):
            _assign(data, dotted, value, str(path))
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not allowed; allowed: KEY=VALUE, e.g. optim.lr=1e-4")
        try:
            parsed = parse_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
        _assign(data, key, parsed, str(path))
    for name, value in (overrides or {}).items():
        if value is not None:
            _assign(data, OVERRIDES[name], value, str(path))
    return config_from_dict(TrainConfig, data, str(path))


def _is_set(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _assign(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: cannot set {dotted!r}: {part!r} is not a mapping")
    node[leaf] = value


def save_train_config(config: TrainConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


__all__ = ["TrainConfig", "load_train_config", "save_train_config"]
