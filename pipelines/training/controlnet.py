"""``ldm train-controlnet``: a ControlNet (Zhang, Rao & Agrawala 2023) trained on a frozen base model.

The ControlNet starts as a copy of the base U-Net's encoder (``ControlNet.from_unet``: its zero convs and the hint
embedding's last conv at zero, so at step 0 the base model is unchanged) and learns
min E ‖ε − ε_θ(z_t, t, c_text, c_hint)‖² with the U-Net, the autoencoder and the text encoder frozen
(their weights stay bitwise the same). The hint (``controlnet.hint``) is the sample's semantic label map rendered
as an RGB image at the image's size: class k → a fixed colour (:data:`PALETTE`: background black, circle red,
square green, triangle blue — for the shapes domain the map one-hot in 3 channels). Captions are dropped to "" with
probability ``objective.cond_dropout`` (train-controlnet's default 0.5, as the paper's 50% prompt dropout), so the
ControlNet learns to read the hint alone.

The run writes the ControlNet as a diffusers ``ControlNetModel`` folder ``model/`` (config.json +
diffusion_pytorch_model.safetensors, loaded by ``ControlNetModel.from_pretrained`` and our ``read_controlnet``)
and ``model/controlnet.json`` (the settings and the base model's path, for resuming). Checkpoints hold the same.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.config import ConfigError, config_from_dict
from ldm.diffusion import diffusion_loss
from ldm.io import CheckpointError
from ldm.io.controlnet_keys import read_controlnet, write_controlnet_diffusers
from ldm.modules.controlnet import ControlNet
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.loop import batch_field, encode_latents, unwrap
from pipelines.models import Models
from pipelines.training.diffusion import DiffusionTask
from pipelines.training.settings import base_model_name, write_settings
from pipelines.training.settings import read_settings as read_settings_file

logger = logging.getLogger(__name__)

SETTINGS, FORMAT = "controlnet.json", "ldm-controlnet"
DEFAULTS = {"objective.cond_dropout": 0.5}  # train-controlnet's own defaults (the file or --set may still change them)
HINTS = ("semantic",)
# semantic class → RGB in [0, 1]: 0 background, 1 circle, 2 square, 3 triangle (ldm.data.shapes)
PALETTE = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
SD_HINT_WIDTHS = (16, 32, 96, 256)


@dataclasses.dataclass
class ControlNetSettings:
    """The ``controlnet:`` section of a train-controlnet config."""

    hint: str = "semantic"  # what the hint image is: the sample's semantic map in PALETTE's colours
    # the hint embedding's conv widths; empty: SD's (16, 32, 96, 256) cut to log2(VAE factor) + 1 entries
    hint_block_channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.hint not in HINTS:
            raise ValueError(f"hint={self.hint!r} is not allowed; allowed: {HINTS}")
        bad = [c for c in self.hint_block_channels if isinstance(c, bool) or not isinstance(c, int) or c < 1]
        if bad or len(self.hint_block_channels) > 8:
            raise ValueError(f"hint_block_channels={self.hint_block_channels!r} is not allowed; allowed: up to 8 "
                             "positive integers, or [] for SD's widths")
        self.hint_block_channels = tuple(self.hint_block_channels)


def check_controlnet(config: TrainConfig, source: str) -> ControlNetSettings:
    """Validate a train-controlnet config before anything is built."""
    if not config.model.init_from:
        raise ConfigError(f"{source}: train-controlnet needs model.init_from: our folder, a diffusers folder or an "
                          "SD file (the frozen base model)")
    if config.model.train_text_encoder or config.model.train_vae:
        raise ConfigError(f"{source}: train-controlnet trains the ControlNet only; allowed: "
                          "model.train_text_encoder: false and model.train_vae: false")
    settings = config_from_dict(ControlNetSettings, config.controlnet or {}, source, "controlnet.")
    if settings.hint == "semantic" and config.data.kind != "shapes":
        raise ConfigError(f"{source}: controlnet.hint='semantic' needs data.kind: shapes (its samples carry a "
                          f"semantic map); got data.kind={config.data.kind!r}")
    return settings


def render_hint(semantic: Tensor) -> Tensor:
    """(B, H, W) class indices → (B, 3, H, W) RGB in [0, 1], class k in ``PALETTE[k]``."""
    if semantic.min() < 0 or semantic.max() >= len(PALETTE):
        raise ValueError(f"semantic classes {int(semantic.min())}..{int(semantic.max())}; "
                         f"allowed: 0..{len(PALETTE) - 1}")
    return PALETTE.to(semantic.device)[semantic.long()].permute(0, 3, 1, 2).contiguous()


def hint_widths(settings: ControlNetSettings, factor: int) -> tuple[int, ...]:
    """The hint embedding's widths: the settings', else SD's cut so that its stride is the VAE's ``factor``."""
    if settings.hint_block_channels:
        widths = settings.hint_block_channels
    else:
        n = factor.bit_length()  # log2(factor) + 1
        if factor < 1 or factor & (factor - 1) or n > 8:
            raise ConfigError(f"the autoencoder's factor {factor} is not a power of two up to 128; set "
                              "controlnet.hint_block_channels")
        widths = (SD_HINT_WIDTHS + (256,) * 8)[:n]
    if 2 ** (len(widths) - 1) != factor:
        raise ConfigError(f"controlnet.hint_block_channels={list(widths)} has stride {2 ** (len(widths) - 1)}; "
                          f"allowed: log2({factor}) + 1 = {factor.bit_length()} widths (the autoencoder's factor)")
    return widths


class ControlNetTask(DiffusionTask):
    """Trains a ControlNet on ``models``' frozen U-Net; everything of ``models`` is frozen."""

    def __init__(self, config: TrainConfig, models: Models, settings: ControlNetSettings,
                 base_model: str | None) -> None:
        super().__init__(config, models)  # model.train_text_encoder/train_vae are false: both frozen
        self.settings, self.base_model = settings, base_model
        models.unet.requires_grad_(False).eval()
        widths = hint_widths(settings, models.vae.downsample_factor)
        self.controlnet = ControlNet.from_unet(models.unet, hint_block_channels=widths).train()
        self.controlnet.requires_grad_(True)
        self.controlnet.enable_gradient_checkpointing(config.gradient_checkpointing)
        logger.info("controlnet: hint %r, hint widths %s, %d trainable parameters", settings.hint, list(widths),
                    sum(p.numel() for p in self.controlnet.parameters()))
        if config.ema.enabled:
            logger.info("EMA is not kept for the ControlNet")

    def groups(self) -> list[list[nn.Module]]:
        return [[self.controlnet]]

    def lr_scale(self, module: nn.Module) -> float:
        return 1.0

    def prepare(self, accelerator: Accelerator) -> None:
        m, self.device = self.models, accelerator.device
        self.controlnet = accelerator.prepare(self.controlnet)
        m.unet.to(self.device)
        m.vae.to(self.device)
        if m.text_encoder is not None:
            m.text_encoder.to(self.device)

    def hint(self, batch: dict[str, Any]) -> Tensor:
        semantic = batch_field(batch, "semantic", "controlnet.hint 'semantic'")
        return render_hint(semantic.to(self.device))

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        latents = encode_latents(self.models.vae, batch["image"].to(self.device), self.config.objective.latents,
                                 generator, self.cache, batch.get("index"))
        cond = self.conditioning(batch, latents, generator)
        hint = self.hint(batch)

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            x = torch.cat([x_t, cond["concat"]], dim=1) if "concat" in cond else x_t
            down, mid = self.controlnet(x, hint, t, cond["context"], y=cond.get("y"))
            return self.models.unet(x, t, cond["context"], cond.get("y"), down_residuals=down, mid_residual=mid)

        o = self.config.objective
        return diffusion_loss(model, latents, self.schedule, prediction_type=self.models.schedule.prediction_type,
                              generator=generator, min_snr_gamma=o.min_snr_gamma, offset_noise=o.offset_noise,
                              timestep_bias_portion=o.timestep_bias_portion, timestep_bias_begin=o.timestep_bias_begin)

    def ema_target(self) -> None:
        return None

    def write_model(self, path: Path, ema: EMA | None) -> None:
        save_controlnet(unwrap(self.controlnet), Path(path), self.settings, self.base_model)

    def load_model(self, path: Path) -> None:
        settings, _ = read_settings(path)
        if settings != self.settings:
            raise CheckpointError(f"{path}: the ControlNet was trained with {settings}; this run uses {self.settings}")
        loaded = read_controlnet(path)
        net = unwrap(self.controlnet)
        if loaded.control_config != net.control_config:
            raise CheckpointError(f"{path}: ControlNet config {loaded.control_config}; this run trains "
                                  f"{net.control_config}")
        net.load_state_dict(loaded.state_dict())


def save_controlnet(net: ControlNet, folder: Path, settings: ControlNetSettings, base_model: str | None) -> None:
    """A diffusers ``ControlNetModel`` folder and ``controlnet.json`` (settings, base model) in ``folder``."""
    write_controlnet_diffusers(net, folder)
    write_settings(folder / SETTINGS, FORMAT, "controlnet", settings, base_model)


def read_settings(folder: str | Path) -> tuple[ControlNetSettings, str | None]:
    """The settings and the base model path of a folder ``ldm train-controlnet`` wrote."""
    return read_settings_file(Path(folder) / SETTINGS, FORMAT, "controlnet", ControlNetSettings,
                              "not a folder ldm train-controlnet wrote")


def controlnet_task(config: TrainConfig, models: Models, source: str) -> ControlNetTask:
    settings = check_controlnet(config, source)
    return ControlNetTask(config, models, settings, base_model_name(config.model.init_from))


__all__ = ["PALETTE", "ControlNetSettings", "ControlNetTask", "check_controlnet", "controlnet_task",
           "read_settings", "render_hint", "save_controlnet"]
