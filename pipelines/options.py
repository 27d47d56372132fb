"""What a pipeline call is made of: the conditioning (what the images show) and the sampling options
(how they are drawn), each checked once, where it is built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.guidance import check_interval
from ldm.diffusion.samplers import Callback, canonical_sampler
from ldm.validation import check_choice, check_float, check_int

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_IMAGES = 256  # per prompt and call: one batch; more is a loop over calls


def as_prompt_list(prompt: str | list[str] | None, name: str = "prompt") -> list[str]:
    """One prompt or a list of them; None is the empty (unconditional) prompt."""
    prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}={prompt!r} is not allowed; allowed: a string or a non-empty list of strings")
    return prompts


@dataclasses.dataclass
class SamplingOptions:
    """How to sample, whatever the conditioning: the options every pipeline shares.

    ``height``/``width`` of None are the model's native size; ``seed`` None draws one (reported with the
    result), unless ``generator`` (one, or one per image, as in diffusers) draws the noise; ``latents`` (unit
    variance, (B,C,h,w)) replace the seeded noise; ``eta`` applies to ``ddim``; ``tile`` (latent pixels) decodes
    in overlapping tiles. The range of ``num_inference_steps`` depends on the model's schedule and is checked when
    sampling; the size on the autoencoder's factor and is checked when the latent shape is made.
    ``callback_on_step_end(pipe, step, timestep, {"latents": x_t})`` is called after each step (diffusers'
    convention; what it returns is not used).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"  # a name of SAMPLERS or an A1111 name ("DPM++ 2M Karras"), stored canonical
    sigma_spacing: str | None = None  # "karras" | "exponential" | None (the sampler's timestep grid)
    num_images_per_prompt: int = 1
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: Tensor | None = None
    output_type: str = "pil"
    eta: float = 0.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float | None] | None = None  # None: the model's default (see SamplingDefaults)
    tile: int | None = None
    progress: bool = True
    callback: Callback | None = None
    callback_on_step_end: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        check_int("num_images_per_prompt", self.num_images_per_prompt, 1, MAX_IMAGES)
        self.sampler, self.sigma_spacing = canonical_sampler(self.sampler, self.sigma_spacing)
        check_float("guidance_scale", self.guidance_scale, 0.0)
        check_float("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        check_interval(self.guidance_interval)
        if self.sampler == "ddim":  # the other samplers take no eta
            self.eta = check_float("eta", self.eta, 0.0)
        check_choice("output_type", self.output_type, OUTPUT_TYPES)
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_SEED)
        if self.generator is not None:
            self._check_generator()

    def _check_generator(self) -> None:
        gens = self.generator if isinstance(self.generator, list) else [self.generator]
        if self.seed is not None:
            raise ValueError("seed and generator are both given; allowed: one of them")
        if not gens or not all(isinstance(g, torch.Generator) for g in gens):
            raise ValueError(f"generator={self.generator!r} is not allowed; allowed: a torch.Generator or a list "
                             "of them, one per image")


@dataclasses.dataclass
class Conditioning:
    """What the images are conditioned on; each pipeline sets the fields its method uses.

    ``prompts``: P prompts (each gives ``num_images_per_prompt`` images); ``negatives``: the
    unconditional branch of classifier-free guidance, one or one per prompt (stored one per prompt);
    ``concat``: a spatial condition on the latent grid, concatenated with the latents at every step
    (1 or P·n rows); ``init_latents``: image-to-image start latents, noised to ``strength``;
    ``class_labels``: one class per prompt, steered toward by a classifier at ``classifier_scale``; ``keep``:
    (latents (1 or P·n, C, h, w), mask (1 or P·n, 1, h, w), 1 = generate): inpainting by a model without a mask
    input, whose x̂_0 is held to the latents where the mask is 0. ``clip_skip``: the text encoder's layer, counted as
    the WebUIs do (1 = last, 2 = penultimate; None = the model's own); ``prompt_embeds`` (P, 77·k, D) /
    ``negative_prompt_embeds`` replace the encoding of ``prompts`` / ``negatives`` (diffusers' names).
    """

    prompts: list[str]
    negatives: list[str]
    concat: Tensor | None = None
    init_latents: Tensor | None = None
    strength: float = 1.0
    class_labels: Tensor | None = None
    classifier_scale: float = 0.0
    keep: tuple[Tensor, Tensor] | None = None  # (latents, mask): keep the latents where the mask is 0 (KnownRegion)
    clip_skip: int | None = None
    prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.negatives) not in (1, len(self.prompts)):
            raise ValueError(f"negative_prompt has {len(self.negatives)} entries; "
                             f"allowed: 1 or {len(self.prompts)} (one per prompt)")
        self.negatives = self.negatives * (len(self.prompts) if len(self.negatives) == 1 else 1)

    @classmethod
    def from_prompts(cls, prompt: str | list[str] | None, negative_prompt: str | list[str] | None = None,
                     **method: object) -> Conditioning:
        """From a user's ``prompt`` and ``negative_prompt`` (a string or a list; None is empty), or their
        ``prompt_embeds`` / ``negative_prompt_embeds`` in ``method`` (then a prompt given too is an error)."""
        embeds, negative_embeds = method.get("prompt_embeds"), method.get("negative_prompt_embeds")
        for name, text, tensor in (("prompt", prompt, embeds), ("negative_prompt", negative_prompt, negative_embeds)):
            if tensor is None:
                continue
            if text is not None:
                raise ValueError(f"{name} and {name}_embeds are both given; allowed: one of them")
            if not isinstance(tensor, Tensor) or tensor.ndim != 3:
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise ValueError(f"{name}_embeds is {shape}; allowed: a tensor (batch, tokens, width)")
        prompts = as_prompt_list(prompt) if embeds is None else [""] * embeds.shape[0]
        negatives = as_prompt_list(negative_prompt, "negative_prompt")
        if negative_embeds is not None:
            negatives = [""] * negative_embeds.shape[0]
        return cls(prompts, negatives, **method)
