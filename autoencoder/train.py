"""The autoencoder task: L1 (+ LPIPS when given) + KL + PatchGAN with the adaptive weight, two
optimizers (autoencoder and learned log-variance; discriminator), as in Rombach et al. 2022."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig, autoencoder_last_layer
from autoencoder.model import AutoencoderKL
from ldm.config import config_from_dict, config_to_dict
from ldm.io.checkpoint import Checkpoint, write_folder
from ldm.io.files import load_state_dict
from ldm.training.ema import EMA
from ldm.training.loop import unwrap


class AutoencoderTask:
    def __init__(self, vae: AutoencoderKL, loss_config: dict[str, Any], source: str = "config",
                 perceptual: nn.Module | None = None) -> None:
        self.vae = vae.train()
        config = config_from_dict(AutoencoderLossConfig, loss_config, source, "loss.")
        self.criterion = AutoencoderLoss(config, perceptual)
        self.device = torch.device("cpu")
        self.metrics: dict[str, float] = {}

    def groups(self) -> list[list[nn.Module | nn.Parameter]]:
        """The autoencoder (+ log-variance) and the discriminator; ``disc_factor: 0`` turns the GAN
        off, and then the discriminator is neither run nor trained (a plain L1 + KL autoencoder)."""
        if self.criterion.config.disc_factor == 0:
            return [[self.vae, self.criterion.logvar]]
        return [[self.vae, self.criterion.logvar], [self.criterion.discriminator]]

    def prepare(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.vae = accelerator.prepare(self.vae)
        self.criterion.to(self.device)
        self.criterion.discriminator = accelerator.prepare(self.criterion.discriminator)

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        images = batch["image"].to(self.device)
        if index == 0:
            recon, posterior = self.vae(images, sample_posterior=True, generator=generator)
            last_layer = autoencoder_last_layer(unwrap(self.vae))
            loss, logs = self.criterion.generator_loss(images, recon, posterior, step, last_layer)
            self.metrics = {"rec_loss": logs["rec_loss"], "kl_loss": logs["kl_loss"], "g_loss": logs["g_loss"]}
            return loss
        with torch.no_grad():
            recon, _ = self.vae(images, sample_posterior=True, generator=generator)
        loss, _ = self.criterion.discriminator_loss(images, recon, step)
        return loss

    def ema_target(self) -> None:
        return None

    def write_model(self, path: Path, ema: EMA | None) -> None:
        vae = unwrap(self.vae)
        extra = {"discriminator": unwrap(self.criterion.discriminator).state_dict(),
                 "loss_logvar": {"logvar": self.criterion.logvar.detach().reshape(1)}}
        write_folder(Checkpoint({"vae": config_to_dict(vae.config)}, {"vae": vae.state_dict()}), path)
        from ldm.io.files import save_state_dict

        state = {f"{k}.{n}": v for k, part in extra.items() for n, v in part.items()}
        save_state_dict(state, path / "training.safetensors")

    def load_model(self, path: Path) -> None:
        unwrap(self.vae).load_state_dict(load_state_dict(path / "vae.safetensors"))
        state = load_state_dict(path / "training.safetensors")
        disc = {k[len("discriminator."):]: v for k, v in state.items() if k.startswith("discriminator.")}
        unwrap(self.criterion.discriminator).load_state_dict(disc)
        with torch.no_grad():
            self.criterion.logvar.copy_(state["loss_logvar.logvar"].reshape(()))
