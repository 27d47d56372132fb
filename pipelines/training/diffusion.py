"""The latent diffusion task: frozen autoencoder, optional (trainable) text encoder, concat and
class conditions, ε / v / x0 objective with condition dropout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.conditioning.spatial import image_condition, semantic_condition
from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.diffusion import NoiseSchedule, condition_dropout_mask, diffusion_loss
from ldm.io.checkpoint import write_folder
from ldm.io.files import load_state_dict
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.loop import LatentCache, batch_field, encode_latents, unwrap
from pipelines.models import Models


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty (unconditional) prompt with probability ``p`` (``condition_dropout_mask``)."""
    drop = condition_dropout_mask(len(captions), p, generator)
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


class ContextCache:
    """The frozen text encoder's context per caption, computed once, one caption at a time (so a caption's
    context does not depend on the batch it first came in: a resumed run gets the same numbers)."""

    def __init__(self) -> None:
        self.contexts: dict[str, Tensor] = {}

    @torch.no_grad()
    def get(self, text_encoder: nn.Module, tokenizer: ClipTokenizer, captions: list[str],
            device: torch.device) -> Tensor:
        for caption in dict.fromkeys(c for c in captions if c not in self.contexts):
            self.contexts[caption] = text_encoder(tokenizer([caption]).to(device))[0]
        return torch.stack([self.contexts[c] for c in captions])  # (B, L, D)


class DiffusionTask:
    """Trains the U-Net (and the text encoder when ``model.train_text_encoder``) of ``models``."""

    def __init__(self, config: TrainConfig, models: Models) -> None:
        self.config, self.models = config, models
        self.schedule = NoiseSchedule.from_config(models.schedule)
        models.unet.enable_gradient_checkpointing(config.gradient_checkpointing)
        self.train_vae = config.model.train_vae
        models.vae.requires_grad_(False).eval()
        if self.train_vae:  # only the encoder and quant_conv receive gradients from the diffusion loss
            models.vae.encoder.requires_grad_(True)
            models.vae.quant_conv.requires_grad_(True)
        self.train_text = models.text_encoder is not None and config.model.train_text_encoder
        if models.text_encoder is not None:
            models.text_encoder.requires_grad_(self.train_text).train(self.train_text)
        models.unet.train()
        self.device = torch.device("cpu")
        self.cache = LatentCache() if config.cache_latents else None
        self.contexts = ContextCache() if models.text_encoder is not None and not self.train_text else None

    def groups(self) -> list[list[nn.Module]]:
        m = self.models
        return [[m.unet] + ([m.text_encoder] if self.train_text else []) + ([m.vae] if self.train_vae else [])]

    def lr_scale(self, module: nn.Module) -> float:
        """The share of ``optim.lr`` that ``module`` trains at: ``optim.text_encoder_lr_scale`` for the text encoder."""
        return self.config.optim.text_encoder_lr_scale if module is self.models.text_encoder else 1.0

    def prepare(self, accelerator: Accelerator) -> None:
        m, self.device = self.models, accelerator.device
        m.unet = accelerator.prepare(m.unet)
        if self.train_text:
            m.text_encoder = accelerator.prepare(m.text_encoder)
        elif m.text_encoder is not None:
            m.text_encoder.to(self.device)
        if self.train_vae and accelerator.num_processes > 1:
            raise ValueError("model.train_vae=True is supported in one process only; allowed with several: false")
        m.vae.to(self.device)

    def conditioning(self, batch: dict[str, Any], latents: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """U-Net inputs beside x_t: the text context (or a zero one), a concat condition, labels."""
        m, size = self.models, tuple(latents.shape[-2:])
        if m.text_encoder is not None:
            captions = drop_captions(batch["caption"], self.config.objective.cond_dropout, generator)
            if self.contexts is not None:  # a frozen encoder: each caption's context is computed once
                context = self.contexts.get(m.text_encoder, m.tokenizer, captions, self.device)
            else:
                context = m.text_encoder(m.tokenizer(captions).to(self.device))
        else:
            context = torch.zeros(latents.shape[0], 1, unwrap(m.unet).config.context_dim, device=self.device)
        out = {"context": context}
        kind = (m.concat or {}).get("kind")
        if kind == "image":
            low_res = batch_field(batch, "low_res", "model.concat kind 'image'")
            out["concat"] = image_condition(low_res.to(self.device), size)
        elif kind == "semantic":
            labels = batch_field(batch, "semantic", "model.concat kind 'semantic'")
            out["concat"] = semantic_condition(labels.to(self.device), int(m.concat["num_classes"]), size)
        if unwrap(m.unet).config.num_classes is not None:
            out["y"] = batch_field(batch, "label", "model.unet.num_classes").to(self.device)
        return out

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        latents = encode_latents(self.models.vae, batch["image"].to(self.device), self.config.objective.latents,
                                 generator, self.cache, batch.get("index"))
        cond = self.conditioning(batch, latents, generator)

        def model(x_t: Tensor, t: Tensor) -> Tensor:
            x = torch.cat([x_t, cond["concat"]], dim=1) if "concat" in cond else x_t
            return self.models.unet(x, t, cond["context"], cond.get("y"))

        o = self.config.objective
        return diffusion_loss(model, latents, self.schedule, prediction_type=self.models.schedule.prediction_type,
                              generator=generator, min_snr_gamma=o.min_snr_gamma, offset_noise=o.offset_noise,
                              timestep_bias_portion=o.timestep_bias_portion, timestep_bias_begin=o.timestep_bias_begin)

    def ema_target(self) -> nn.Module:
        return self.models.unet

    def write_model(self, path: Path, ema: EMA | None) -> None:
        m = self.models
        wrapped = m.unet, m.text_encoder, m.vae
        m.unet, m.text_encoder, m.vae = unwrap(m.unet), m.text_encoder and unwrap(m.text_encoder), unwrap(m.vae)
        try:
            checkpoint = m.to_checkpoint()
            if ema is not None:
                checkpoint.ema = ema.averaged_state_dict(m.unet)
        finally:
            m.unet, m.text_encoder, m.vae = wrapped
        write_folder(checkpoint, path)

    def load_model(self, path: Path) -> None:
        m = self.models
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(m, name)
            if module is not None:
                unwrap(module).load_state_dict(load_state_dict(path / f"{name}.safetensors"))
