"""What every pipeline shares: loading, device/dtype, prompt encoding, seeded noise, sampling
with guidance, and turning latents into images."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldm.conditioning.prompts import encode_prompt_pair, encode_prompts, pad_to_same_chunks
from ldm.conditioning.spatial import as_condition_batch
from ldm.devices import resolve_device
from ldm.diffusion import ClassifierFreeGuidance, ClassifierGuidance, Denoiser, NoiseSchedule
from ldm.diffusion.denoiser import DenoiserLike
from ldm.diffusion.inpainting import KnownRegion, keep_known
from ldm.diffusion.samplers import Callback, sample
from ldm.modules.attention import cached_context_projections
from ldm.modules.unet import reusing_deep_features
from ldm.validation import check_choice, check_float, check_int
from pipelines.lora import LoraMixin
from pipelines.memory import MemorySwitches
from pipelines.models import Models, load_models
from pipelines.options import OUTPUT_TYPES, Conditioning, SamplingOptions
from pipelines.prompt_cache import PromptCache, encoder_stamp
from pipelines.speed import WarmUpTimer, apply_fast_path, compile_unet
from pipelines.textual_inversion import TextualInversionMixin

logger = logging.getLogger(__name__)

DEMO_MODELS = ("demo", "demo-sr", "demo-semantic", "demo-classifier", "demo-clip")  # demo-clip: a CLIPModel folder
DEMO_CONTROLNETS = ("demo-controlnet",)  # diffusers ControlNetModel folders for ControlNetPipeline(controlnet=...)


@dataclasses.dataclass
class PipelineOutput:
    """``images``: a list of PIL images, a float array (B,H,W,3) in [0,1], a tensor (B,3,H,W) in
    [0,1], or latents (B,C,h,w), by ``output_type``; ``seed``: the seed of the initial noise (drawn at
    random when none was given; a generator's initial seed, one per generator of a list), so that a result can be
    made again."""

    images: Any
    seed: int | list[int] | None = None


def draw_seed() -> int:
    """A fresh random seed in [0, 2**63), from the operating system: no global RNG is read or reseeded."""
    return secrets.randbelow(2**63)


def randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]) -> Tensor:
    """Unit Gaussian noise on the generator's device: from one generator in one draw, or row by row from a list of
    them (one per row, as diffusers' randn_tensor draws)."""
    if not isinstance(generator, list):
        return torch.randn(shape, generator=generator, device=generator.device)
    if len(generator) != shape[0]:
        raise ValueError(f"generator is a list of {len(generator)}; allowed: one generator per image ({shape[0]})")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device).cpu() for g in generator])


def generator_seeds(generator: torch.Generator | list[torch.Generator]) -> int | list[int]:
    """The initial seed of a generator, or of each in a list (what a result reports as its seed)."""
    if isinstance(generator, list):
        return [g.initial_seed() for g in generator]
    return generator.initial_seed()


def _normal(value: Any) -> Any:
    """An inference-mode tensor as an ordinary one (a copy), which callers may change in place or differentiate;
    anything else as it is."""
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value


def resolve_source(source: str | Path) -> Path:
    """A demo name ("demo", "demo-sr", "demo-controlnet", ...) → its folder shipped in the package; else the path."""
    if str(source) in DEMO_MODELS + DEMO_CONTROLNETS:
        path = Path(str(resources.files("pipelines") / "weights" / str(source)))
        if not path.is_dir():
            raise FileNotFoundError(f"model={source!r}: the demo weights are not installed at {path}")
        return path
    return Path(source)


class Pipeline(MemorySwitches, TextualInversionMixin, LoraMixin):
    """Holds the models; a subclass's ``__call__`` builds its :class:`Conditioning` and
    :class:`SamplingOptions` and calls :meth:`generate`.

    ``max_pixels`` bounds the output pixels of one call (images × height × width), checked before sampling;
    raise it (``pipe.max_pixels = N``, ``ldm … --max-pixels N``) when the machine has the memory."""

    max_pixels: int = 4 * 1024 * 1024  # e.g. four 1024×1024 images

    def __init__(self, models: Models, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.models = models
        self.schedule = NoiseSchedule.from_config(models.schedule)
        self.device = resolve_device(device or "cpu")  # "auto": the best available device
        self.dtype = dtype or torch.float32
        self.to(self.device, self.dtype)
        self.set_fast_path(True)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, torch_dtype: torch.dtype | None = None,
                        fast: bool = True, compile: bool = False, **options: Any):
        """Load from a demo name, our folder, a diffusers folder or an SD single file; ``torch_dtype`` is
        diffusers' name for ``dtype``. ``fast``: the exact fast path (see :meth:`set_fast_path`); ``compile``:
        ``torch.compile`` the U-Net (see :meth:`compile`)."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} differ; allowed: one of them")
        dtype = dtype or torch_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} is not allowed; allowed: torch.float32, torch.float16, torch.bfloat16")
        pipe = cls(load_models(resolve_source(source), **options), device, dtype)  # the fast path on
        if fast is not True:
            pipe.set_fast_path(fast)
        if compile:
            pipe.compile()
        return pipe

    fast: bool = True
    _warm_up: WarmUpTimer | None = None
    _deep_cache: tuple[int, int, int] | None = None

    @property
    def _prompt_cache(self) -> PromptCache:
        if "_prompts" not in self.__dict__:
            self.__dict__["_prompts"] = PromptCache()
        return self.__dict__["_prompts"]

    def set_fast_path(self, enabled: bool = True) -> None:
        """The exact fast path (on by default; see pipelines.speed): prompt embeddings kept across calls, the text
        context's cross-attention keys and values computed once per call, sampling and decoding under
        ``torch.inference_mode``, the autoencoder in channels-last memory format. Off: the plain path, for
        measuring it."""
        if not isinstance(enabled, bool):
            raise ValueError(f"fast={enabled!r} is not allowed; allowed: True or False")
        self.fast = enabled
        apply_fast_path(self.models, enabled)

    def enable_deep_cache(self, interval: int = 6, depth: int = 1, first: int = 7) -> None:
        """Approximate sampling, opt-in (DeepCache, Ma et al. 2024): the U-Net runs in full every ``interval``
        model calls and in between only its first ``depth + 1`` input and last ``depth + 1`` output blocks on the
        deep features of the last full call; the first ``first`` calls run in full (they set the layout). The
        defaults, on the demo's 25 steps: 2.2x faster for one image, attributes 0.973 against 0.984
        (docs/performance.md)."""
        check_int("interval", interval, 1, 1000)
        check_int("depth", depth, 0, len(self.models.unet.input_blocks) - 2)
        self._deep_cache = (interval, depth, check_int("first", first, 0))

    def disable_deep_cache(self) -> None:
        """Every model call in full again (the default)."""
        self._deep_cache = None

    def compile(self) -> None:
        """``torch.compile`` the U-Net: its first call for each latent shape compiles (the warm-up, logged), later
        ones run compiled; PyTorch's on-disk cache spares later processes most of it. Without a working compiler
        a one-line warning, and sampling runs uncompiled."""
        if compile_unet(self.models.unet, self.device):
            self._warm_up = WarmUpTimer()

    def save_pretrained(self, path: str | Path, to: str = "diffusers") -> None:
        """Write the models as a diffusers folder (``to="sd"``: a single file, ``"folder"``: ours)."""
        self.models.save(path, to=to)

    # diffusers' component names, for scripts written against its pipelines
    unet = property(lambda self: self.models.unet, doc="the U-Net")
    vae = property(lambda self: self.models.vae, doc="the autoencoder")
    text_encoder = property(lambda self: self.models.text_encoder, doc="the text encoder (None without one)")
    tokenizer = property(lambda self: self.models.tokenizer, doc="the tokenizer (None without a text encoder)")
    scheduler = property(lambda self: self.schedule, doc="the noise schedule the samplers step through "
                         "(samplers are chosen per call: sampler=, see `ldm samplers`)")

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
    def encode_prompts(self, prompts: list[str], negatives: list[str] | None = None,
                       clip_skip: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Contexts (B, 77·k, D) of ``prompts`` and of ``negatives`` (an empty prompt is the unconditional one):
        prompts longer than 75 tokens in chunks of 75, ``(word:1.3)`` weighting, ``BREAK``, as the WebUIs do; both
        padded to the same k (see ldm.conditioning.prompts). A model without a text encoder takes a zero context
        (B, 1, D) and only empty prompts."""
        m = self.models
        if m.text_encoder is None:
            given = [p for p in prompts + (negatives or []) if p]
            if given:
                raise ValueError(f"prompt={given[0]!r} is not allowed: this model has no text encoder; allowed: ''")
            zeros = torch.zeros(len(prompts), 1, m.unet.config.context_dim, device=self.device, dtype=self.dtype)
            return zeros, None if negatives is None else zeros[: len(negatives)]
        if negatives is None:
            def encode() -> tuple[Tensor, Tensor | None]:
                return encode_prompts(m.text_encoder, m.tokenizer, prompts, clip_skip), None
        else:
            def encode() -> tuple[Tensor, Tensor | None]:
                return encode_prompt_pair(m.text_encoder, m.tokenizer, prompts, negatives, clip_skip)
        if not self.fast:
            return encode()
        state = self.__dict__.get("_lora_state")
        hooks = tuple(id(h) for h in state.handles) if state is not None else ()
        key = (tuple(prompts), None if negatives is None else tuple(negatives), clip_skip, id(m.text_encoder),
               id(m.tokenizer), tuple((t, tuple(ids)) for t, ids in getattr(m.tokenizer, "added_tokens", {}).items()),
               encoder_stamp(m.text_encoder, hooks), self.device, self.dtype)
        return self._prompt_cache.get(key, encode)

    def contexts(self, conditioning: Conditioning) -> tuple[Tensor, Tensor]:
        """The conditional and unconditional text contexts (P, 77·k, D), from text or the given embeddings."""
        c = conditioning
        if c.prompt_embeds is None and c.negative_prompt_embeds is None:
            return self.encode_prompts(c.prompts, c.negatives, c.clip_skip)
        cond = c.prompt_embeds if c.prompt_embeds is not None else self.encode_prompts(c.prompts, None, c.clip_skip)[0]
        uncond = c.negative_prompt_embeds
        if uncond is None:
            uncond = self.encode_prompts(c.negatives, None, c.clip_skip)[0]
        cond, uncond = cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)
        if cond.shape[0] != uncond.shape[0] and uncond.shape[0] == 1:
            uncond = uncond.expand(cond.shape[0], -1, -1)
        if self.models.text_encoder is not None and cond.shape[1] != uncond.shape[1]:
            empty = self.encode_prompts([""], None, c.clip_skip)[0]
            cond, uncond = pad_to_same_chunks(cond, uncond, empty)
        width = self.models.unet.config.context_dim
        if cond.shape[-1] != width or cond.shape[0] != uncond.shape[0] or cond.shape[1:] != uncond.shape[1:]:
            raise ValueError(f"prompt_embeds {tuple(cond.shape)} and negative_prompt_embeds {tuple(uncond.shape)} do "
                             f"not fit; allowed: equal batch and (tokens, {width}) shapes")
        return cond, uncond

    def latent_shape(self, batch: int, height: int | None, width: int | None,
                     channels: int | None = None) -> tuple[int, ...]:
        """The latent shape (B,C,h,w) of images ``height``×``width`` (None: the model's native size), checked
        against the autoencoder's downsampling factor."""
        f = self.models.vae.downsample_factor
        native = self.models.sample_size * f
        height = native if height is None else height
        width = native if width is None else width
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: a positive multiple of {f} "
                                 f"(the autoencoder's downsampling factor)")
        pixels = batch * height * width
        if pixels > self.max_pixels:
            raise ValueError(f"{batch} image(s) of {width}x{height} are {pixels} output pixels; allowed: at most "
                             f"max_pixels={self.max_pixels} (set pipe.max_pixels / --max-pixels higher if the "
                             f"machine has the memory{self.memory_hint})")
        return (batch, channels or self.models.vae.config.latent_channels, height // f, width // f)

    memory_hint = ""  # what a pipeline knows of its memory per pixel, for the max_pixels error

    def initial_noise(self, shape: tuple[int, ...], seed: int | None, latents: Tensor | None,
                      generator: torch.Generator | list[torch.Generator] | None = None,
                      ) -> tuple[Tensor, torch.Generator | list[torch.Generator]]:
        """Unit-variance noise (B,C,h,w) and the generator(s) that stochastic samplers continue with.

        With ``seed``, one CPU generator seeded with it draws the whole batch in one call (images
        in prompt-major order: prompt i, copy j is row i·n + j), so a seed gives the same images
        on every device. A ``generator`` draws instead (a list: one image each, as in diffusers).
        ``latents`` (unit variance, as in diffusers) replace that draw. Without either one is drawn.
        """
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed if seed is not None else draw_seed()))
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents has shape {tuple(latents.shape)}; expected {tuple(shape)}")
            return latents.to(self.device, torch.float32), generator
        return randn(shape, generator).to(self.device), generator

    @torch.no_grad()
    def generate(self, conditioning: Conditioning, options: SamplingOptions) -> PipelineOutput:
        """The shared path: prepare the conditioning → build the denoiser → initial noise → sample → decode.
        The output carries the seed of the initial noise (drawn when ``options.seed`` is None)."""
        batch = len(conditioning.prompts) * options.num_images_per_prompt
        shape = self.latent_shape(batch, options.height, options.width)
        cond, uncond = self.prepare(conditioning, options.num_images_per_prompt)
        denoiser = self.denoiser(cond, uncond, conditioning, options)
        seed = self.resolve_seed(options.seed) if options.generator is None else generator_seeds(options.generator)
        noise, generator = self.initial_noise(shape, seed if options.generator is None else None, options.latents,
                                              options.generator)
        grad_free = self.fast and conditioning.class_labels is None  # classifier guidance differentiates
        with torch.inference_mode(grad_free):  # no autograd bookkeeping at all
            latents = self.sample(denoiser, noise, generator, conditioning, options)
        latents = _normal(latents)
        if conditioning.keep is not None:  # exact where kept, also for a sampler that ends above σ = 0 (DDIM)
            latents = keep_known(latents, *(t.to(self.device) for t in conditioning.keep))
        if not bool(torch.isfinite(latents).all()):  # would decode to a black image
            raise FloatingPointError(f"sampling gave non-finite latents (seed {seed}, guidance_scale "
                                     f"{options.guidance_scale:g}, sampler {options.sampler!r}); the model's weights "
                                     "or a float16 overflow are the usual causes: try dtype float32")
        with torch.inference_mode(self.fast):
            out = self.decode(latents, options.output_type, options.tile)
        return dataclasses.replace(out, images=_normal(out.images), seed=seed)

    def prepare(self, conditioning: Conditioning, n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The U-Net's conditional and unconditional inputs for P prompts × n images: the text context
        (P·n, L, D) of the prompts and of the negatives, and the concat condition (if any) in both."""
        context, uncond_context = self.contexts(conditioning)
        cond = {"context": context.repeat_interleave(n, dim=0)}
        uncond = {"context": uncond_context.repeat_interleave(n, dim=0)}
        if conditioning.concat is not None:
            batch = len(conditioning.prompts) * n
            cond["concat"] = uncond["concat"] = as_condition_batch(conditioning.concat.to(self.device), batch)
        return cond, uncond

    def denoiser(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], conditioning: Conditioning,
                 options: SamplingOptions) -> DenoiserLike:
        """Classifier-free guidance over ``cond``/``uncond``, under classifier guidance when the
        conditioning has class labels (one per prompt), holding the known region when it has ``keep``."""
        interval = options.guidance_interval or self.models.sampling.guidance_interval
        denoiser = self.guided(cond, uncond, options.guidance_scale, options.guidance_rescale, interval)
        if conditioning.class_labels is not None:
            labels = conditioning.class_labels.repeat_interleave(options.num_images_per_prompt).to(self.device)
            denoiser = self.classifier_guided(denoiser, labels, conditioning.classifier_scale)
        if conditioning.keep is not None:
            known, mask = (t.to(self.device) for t in conditioning.keep)
            denoiser = KnownRegion(denoiser, known, mask)
        return denoiser

    def guided(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float,
               rescale: float = 0.0, interval: tuple[float, float | None] | None = None) -> DenoiserLike:
        """Classifier-free guidance of the U-Net (one batched forward) between ``cond`` and ``uncond``
        (``context`` and optional ``concat``, channel-concatenated with x); the plain conditional U-Net
        when ``scale`` is 1 (the guided result equals it). The U-Net runs in the pipeline's dtype; the
        sampler sees float32."""
        unet = self.models.unet

        def net(x: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
            x = x.to(self.dtype)
            if "concat" in inputs:
                x = torch.cat([x, inputs["concat"].to(x.dtype)], dim=1)  # (B, C + C_cond, h, w)
            return unet(x, t, inputs["context"]).float()

        prediction_type = self.models.schedule.prediction_type
        if scale == 1.0 and rescale == 0.0:
            return Denoiser(lambda x, t: net(x, t, cond), self.schedule, prediction_type)
        return ClassifierFreeGuidance(Denoiser(net, self.schedule, prediction_type), cond, uncond, scale, rescale,
                                      interval=interval)

    def classifier_guided(self, denoiser: DenoiserLike, labels: Tensor, scale: float) -> DenoiserLike:
        """``denoiser`` steered toward ``labels`` (one per image) by the model's noise-aware classifier."""
        classifier = self.models.classifier
        if classifier is None:
            raise ValueError("class_label needs a noise-aware classifier; "
                             "this model has none (see ldm train-classifier)")
        check_float("classifier_scale", scale, 0.0)
        num = classifier.config.num_classes
        if int(labels.min()) < 0 or int(labels.max()) >= num:
            raise ValueError(f"class_label={int(labels.max())} is not allowed; allowed: 0..{num - 1}")
        return ClassifierGuidance(denoiser, lambda x, t: classifier(x.float(), t), labels, scale)

    @staticmethod
    def resolve_seed(seed: int | None) -> int:
        """``seed``, or a freshly drawn one (logged, so that the images can be made again)."""
        if seed is None:
            seed = draw_seed()
            logger.info("seed: %d (drawn; pass seed=%d to make these images again)", seed, seed)
        return seed

    def sample(self, denoiser: DenoiserLike, noise: Tensor, generator: torch.Generator, conditioning: Conditioning,
               options: SamplingOptions) -> Tensor:
        """Run the sampler from ``noise`` (or, image-to-image, from the conditioning's start latents
        at its strength) to the final latents."""
        steps = check_int("num_inference_steps", options.num_inference_steps, 1, self.schedule.num_train_timesteps)
        start = conditioning.init_latents
        x0 = None if start is None else start.to(self.device).expand(noise.shape)
        extra = {"eta": options.eta} if options.sampler == "ddim" else {}
        cfg = self.models.schedule
        started = None if self._warm_up is None else self._warm_up.start(tuple(noise.shape))
        cache = cached_context_projections(*self.sampling_modules()) if self.fast else contextlib.nullcontext()
        reuse = contextlib.nullcontext() if self._deep_cache is None else reusing_deep_features(self.models.unet,
                                                                                                 *self._deep_cache)
        with cache, reuse:
            latents = sample(options.sampler, denoiser, noise, self.schedule, steps,
                             prediction_type=cfg.prediction_type, x0=x0, strength=conditioning.strength,
                             steps_offset=cfg.steps_offset, timestep_spacing=cfg.timestep_spacing,
                             sigma_spacing=options.sigma_spacing,
                             generator=generator, callback=self.step_callback(options), progress=options.progress,
                             **extra)
        if self._warm_up is not None:
            self._warm_up.stop(tuple(noise.shape), started)
        return latents

    def sampling_modules(self) -> list[nn.Module]:
        """The networks a sampling step runs with the text context (their cross-attention caches its keys and
        values for the call)."""
        return [self.models.unet]

    def step_callback(self, options: SamplingOptions) -> Callback | None:
        """``options.callback`` and diffusers' ``callback_on_step_end(pipe, i, t, {"latents": x_t})`` as one."""
        on_end = options.callback_on_step_end
        if on_end is None:
            return options.callback

        def both(i: int, t: Tensor, x_t: Tensor, x0: Tensor) -> None:
            if options.callback is not None:
                options.callback(i, t, x_t, x0)
            on_end(self, i, t, {"latents": x_t})
        return both

    @torch.no_grad()
    def decode(self, latents: Tensor, output_type: str, tile: int | None = None) -> PipelineOutput:
        """Latents → images of ``output_type``; ``tile`` (latent pixels) decodes in overlapping tiles (default: the
        pipeline's, see ``enable_vae_tiling``)."""
        check_choice("output_type", output_type, OUTPUT_TYPES)
        if output_type == "latent":
            return PipelineOutput(latents)
        vae = self.models.vae
        z = (latents / vae.config.scale_factor).to(next(vae.parameters()).dtype)
        image = self.decode_latents(z, tile)
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return PipelineOutput(image.cpu())
        array = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return PipelineOutput(array)
        return PipelineOutput([Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array])
