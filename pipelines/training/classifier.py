"""The noise-aware classifier task: cross-entropy of p(y | x_t, t) on noised latents of a frozen
autoencoder, at timesteps drawn uniformly (Dhariwal & Nichol 2021, §4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.data.shapes import SHAPES
from ldm.diffusion import NoiseSchedule
from ldm.diffusion.samplers import randn_like
from ldm.io.checkpoint import write_folder
from ldm.io.files import load_state_dict
from ldm.training.ema import EMA
from ldm.training.loop import batch_field, encode_latents, unwrap
from pipelines.models import Models

CLASS_NAMES = list(SHAPES)  # the shapes domain's labels, by index


class ClassifierTask:
    """Trains ``models.classifier``; the written folder is the guided model plus its classifier."""

    def __init__(self, models: Models, latents: str = "sample") -> None:
        self.models, self.latents = models, latents
        self.schedule = NoiseSchedule.from_config(models.schedule)
        for module in (models.unet, models.vae, models.text_encoder):
            if module is not None:
                module.requires_grad_(False).eval()
        models.classifier.train()
        self.device = torch.device("cpu")

    def groups(self) -> list[list[nn.Module]]:
        return [[self.models.classifier]]

    def prepare(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.models.classifier = accelerator.prepare(self.models.classifier)
        self.models.vae.to(self.device)

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        latents = encode_latents(self.models.vae, batch["image"].to(self.device), self.latents, generator)
        t = torch.randint(0, self.schedule.num_train_timesteps, (latents.shape[0],), generator=generator)
        x_t = self.schedule.q_sample(latents, t, randn_like(latents, generator))
        logits = self.models.classifier(x_t, t.float().to(self.device))
        return F.cross_entropy(logits, batch_field(batch, "label", "train-classifier").to(self.device))

    def ema_target(self) -> nn.Module:
        return self.models.classifier

    def write_model(self, path: Path, ema: EMA | None) -> None:
        m = self.models
        wrapped, m.classifier = m.classifier, unwrap(m.classifier)
        try:
            checkpoint = m.to_checkpoint()
            if ema is not None:  # the classifier is saved with its averaged weights
                checkpoint.weights["classifier"] = ema.averaged_state_dict(m.classifier)
        finally:
            m.classifier = wrapped
        write_folder(checkpoint, path)

    def load_model(self, path: Path) -> None:
        unwrap(self.models.classifier).load_state_dict(load_state_dict(path / "classifier.safetensors"))
