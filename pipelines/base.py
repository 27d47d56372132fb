"""What every pipeline shares: loading, device/dtype, prompt encoding, seeded noise, sampling
with guidance, and turning latents into images."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from autoencoder import tiled_decode
from ldm.conditioning.spatial import as_condition_batch
from ldm.devices import resolve_device
from ldm.diffusion import SAMPLERS, ClassifierFreeGuidance, ClassifierGuidance, Denoiser, NoiseSchedule
from ldm.diffusion.denoiser import DenoiserLike
from ldm.diffusion.samplers import Callback, sample
from ldm.validation import check_choice, check_float, check_int
from pipelines.models import Models, load_models

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEMO_MODELS = ("demo", "demo-sr", "demo-semantic", "demo-classifier", "demo-clip")  # demo-clip: a CLIPModel folder


@dataclasses.dataclass
class PipelineOutput:
    """``images``: a list of PIL images, a float array (B,H,W,3) in [0,1], a tensor (B,3,H,W) in
    [0,1], or latents (B,C,h,w), by ``output_type``; ``seed``: the seed of the initial noise (drawn at
    random when none was given), so that a result can be made again."""

    images: Any
    seed: int | None = None


def draw_seed() -> int:
    """A fresh random seed in [0, 2**63), from the operating system: no global RNG is read or reseeded."""
    return secrets.randbelow(2**63)


def resolve_source(source: str | Path) -> Path:
    """A demo name ("demo", "demo-sr", ...) → its folder shipped in the package; else the path."""
    if str(source) in DEMO_MODELS:
        path = Path(str(resources.files("pipelines") / "weights" / str(source)))
        if not path.is_dir():
            raise FileNotFoundError(f"model={source!r}: the demo weights are not installed at {path}")
        return path
    return Path(source)


class Pipeline:
    """Holds the models; subclasses implement ``__call__``."""

    def __init__(self, models: Models, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.models = models
        self.schedule = NoiseSchedule.from_config(models.schedule)
        self.device = resolve_device(device or "cpu")  # "auto": the best available device
        self.dtype = dtype or torch.float32
        self.to(self.device, self.dtype)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **options: Any):
        """Load from a demo name, our folder, a diffusers folder or an SD single file."""
        return cls(load_models(resolve_source(source), **options), device, dtype)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None):
        """Move to ``device``; ``dtype`` applies to U-Net and text encoder. The VAE stays float32
        under float16 (its decoder overflows in fp16) and follows bfloat16."""
        self.device, self.dtype = resolve_device(device), dtype or self.dtype
        m = self.models
        m.unet.to(self.device, self.dtype)
        if m.text_encoder is not None:
            m.text_encoder.to(self.device, self.dtype)
        if m.classifier is not None:
            m.classifier.to(self.device, torch.float32)  # its gradient guides sampling: kept in float32
        m.vae.to(self.device, torch.float32 if self.dtype == torch.float16 else self.dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Context (B, 77, D) for each prompt (an empty prompt is the unconditional one); a model
        without a text encoder takes a zero context (B, 1, D) and only empty prompts."""
        m = self.models
        if m.text_encoder is None:
            given = [p for p in prompts if p]
            if given:
                raise ValueError(f"prompt={given[0]!r} is not allowed: this model has no text encoder; allowed: ''")
            return torch.zeros(len(prompts), 1, m.unet.config.context_dim, device=self.device, dtype=self.dtype)
        return m.text_encoder(m.tokenizer(prompts).to(self.device))

    def latent_shape(self, batch: int, height: int | None, width: int | None,
                     channels: int | None = None) -> tuple[int, ...]:
        f = self.models.vae.downsample_factor
        native = self.models.sample_size * f
        height = native if height is None else height
        width = native if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: a positive multiple of {f} "
                                 f"(the autoencoder's downsampling factor)")
        return (batch, channels or self.models.vae.config.latent_channels, height // f, width // f)

    def initial_noise(self, shape: tuple[int, ...], seed: int | None,
                      latents: Tensor | None) -> tuple[Tensor, torch.Generator]:
        """Unit-variance noise (B,C,h,w) and the generator that stochastic samplers continue with.

        With ``seed``, one CPU generator seeded with it draws the whole batch in one call (images
        in prompt-major order: prompt i, copy j is row i·n + j), so a seed gives the same images
        on every device. ``latents`` (unit variance, as in diffusers) replace that draw. Without ``seed``
        one is drawn (:func:`draw_seed`).
        """
        generator = torch.Generator().manual_seed(int(seed if seed is not None else draw_seed()))
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {tuple(shape)}")
            return latents.to(self.device, torch.float32), generator
        return torch.randn(shape, generator=generator).to(self.device), generator

    def run_sampler(self, denoiser: DenoiserLike, noise: Tensor, sampler: str, steps: int, generator: torch.Generator,
                    *, x0: Tensor | None = None, strength: float = 1.0, eta: float = 0.0, progress: bool = True,
                    callback: Callback | None = None) -> Tensor:
        check_choice("sampler", sampler, SAMPLERS)
        check_int("num_inference_steps", steps, 1, self.schedule.num_train_timesteps)
        options = {"eta": check_float("eta", eta, 0.0)} if sampler == "ddim" else {}
        cfg = self.models.schedule
        return sample(sampler, denoiser, noise, self.schedule, steps, prediction_type=cfg.prediction_type, x0=x0,
                      strength=strength, steps_offset=cfg.steps_offset, timestep_spacing=cfg.timestep_spacing,
                      generator=generator, callback=callback, progress=progress, **options)

    def guided(self, context: Tensor, uncond: Tensor, scale: float, rescale: float = 0.0,
               concat: Tensor | None = None) -> DenoiserLike:
        """The denoiser: classifier-free guidance of the U-Net over the text (one batched
        forward), with a concat condition (if any) fed to both branches; the plain conditional
        U-Net when ``scale`` is 1 (the guided result equals it). The U-Net runs in the pipeline's
        dtype; the sampler sees float32."""
        check_float("guidance_scale", scale, 0.0)
        unet = self.models.unet

        def net(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            x = x.to(self.dtype)
            if "concat" in cond:
                x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)  # (B, C + C_cond, h, w)
            return unet(x, t, cond["context"]).float()

        cond = {"context": context} if concat is None else {"context": context, "concat": concat}
        prediction_type = self.models.schedule.prediction_type
        if scale == 1.0 and rescale == 0.0:
            return Denoiser(lambda x, t: net(x, t, cond), self.schedule, prediction_type)
        denoiser = Denoiser(net, self.schedule, prediction_type)
        return ClassifierFreeGuidance(denoiser, cond, {**cond, "context": uncond}, scale, rescale)

    @torch.no_grad()
    def decode(self, latents: Tensor, output_type: str, tile: int | None = None) -> PipelineOutput:
        """Latents → images of ``output_type``; ``tile`` (latent pixels) decodes in overlapping tiles."""
        check_choice("output_type", output_type, OUTPUT_TYPES)
        if output_type == "latent":
            return PipelineOutput(latents)
        vae = self.models.vae
        z = (latents / vae.config.scale_factor).to(next(vae.parameters()).dtype)
        image = tiled_decode(vae, z, tile, tile // 4) if tile else vae.decode(z)
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return PipelineOutput(image.cpu())
        array = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return PipelineOutput(array)
        return PipelineOutput([Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array])

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        negatives: list[str],
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        sampler: str,
        height: int | None,
        width: int | None,
        seed: int | None,
        latents: Tensor | None,
        output_type: str,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        tile: int | None = None,
        progress: bool = True,
        callback: Callback | None = None,
        concat: Tensor | None = None,
        init_latents: Tensor | None = None,
        strength: float = 1.0,
        class_labels: Tensor | None = None,
        classifier_scale: float = 0.0,
    ) -> PipelineOutput:
        """The shared loop: context for P prompts × n images, a concat condition (1 or P·n rows),
        optional start latents (image-to-image at ``strength``) and classifier guidance."""
        n = check_int("num_images_per_prompt", num_images_per_prompt, 1)
        if len(negatives) not in (1, len(prompts)):
            raise ValueError(f"negative_prompt has {len(negatives)} entries; "
                             f"allowed: 1 or {len(prompts)} (one per prompt)")
        negatives = negatives * (len(prompts) if len(negatives) == 1 else 1)
        batch = len(prompts) * n
        shape = self.latent_shape(batch, height, width)
        context = self.encode_prompts(prompts).repeat_interleave(n, dim=0)  # (P·n, L, D)
        uncond = self.encode_prompts(negatives).repeat_interleave(n, dim=0)
        if concat is not None:
            concat = as_condition_batch(concat.to(self.device), batch)
        denoiser = self.guided(context, uncond, guidance_scale, guidance_rescale, concat)
        if class_labels is not None:
            labels = class_labels.repeat_interleave(n).to(self.device)  # (P·n,)
            denoiser = self.classifier_guided(denoiser, labels, classifier_scale)
        if seed is None:
            seed = draw_seed()
            logger.info("seed: %d (drawn; pass seed=%d to make these images again)", seed, seed)
        noise, generator = self.initial_noise(shape, seed, latents)
        x0 = None if init_latents is None else init_latents.to(self.device).expand(shape)
        result = self.run_sampler(denoiser, noise, sampler, num_inference_steps, generator, x0=x0, strength=strength,
                                  eta=eta, progress=progress, callback=callback)
        return dataclasses.replace(self.decode(result, output_type, tile), seed=seed)

    def classifier_guided(self, denoiser: DenoiserLike, labels: Tensor, scale: float) -> DenoiserLike:
        classifier = self.models.classifier
        if classifier is None:
            raise ValueError("class_label needs a noise-aware classifier; "
                             "this model has none (see ldm train-classifier)")
        check_float("classifier_scale", scale, 0.0)
        num = classifier.config.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= num:
            raise ValueError(f"class_label={int(labels.max())} is not allowed; allowed: 0..{num - 1}")
        return ClassifierGuidance(denoiser, lambda x, t: classifier(x.float(), t), labels, scale)
