"""Guidance as small wrappers of a denoiser, each itself a denoiser over σ (composable).

A wrapper takes a :class:`~ldm.diffusion.denoiser.Denoiser` (or another wrapper). Given a bare
network instead, it stays unbound until ``bind(schedule, prediction_type)``, which ``sample``
and ``as_denoiser`` call, or until ``schedule`` is passed to it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import Denoiser, DenoiserLike, Sigma, as_denoiser, on_grid
from ldm.diffusion.schedule import NoiseSchedule, broadcast
from ldm.validation import check_float, check_same_shape

Condition = Tensor | dict[str, Tensor]


def _cat(uncond: Condition, cond: Condition) -> Condition:
    if isinstance(cond, dict):
        return {key: _cat(uncond[key], value) for key, value in cond.items()}
    return torch.cat([uncond.expand_as(cond), cond])


def _twice(sigma: Sigma) -> Sigma:
    """σ for the batch [x; x]: a per-sample σ (B,) repeated, a single σ as is."""
    return torch.cat([sigma, sigma]) if isinstance(sigma, Tensor) and sigma.ndim else sigma


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """u + s·(c - u) (Ho & Salimans 2022); with ``rescale`` φ > 0 the result's per-sample std is
    pulled toward the conditional one (Lin et al. 2023, eqs. 15-16)."""
    guided = uncond + scale * (cond - uncond)
    if rescale == 0:
        return guided
    dims = tuple(range(1, cond.ndim))
    rescaled = guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * rescaled + (1 - rescale) * guided


class Guidance:
    """A denoiser that wraps ``denoiser``; with ``schedule`` a bare network is wrapped at once (see as_denoiser)."""

    def __init__(self, denoiser: Any, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon") -> None:
        self.denoiser = denoiser if schedule is None else as_denoiser(denoiser, schedule, prediction_type)

    def bind(self, schedule: NoiseSchedule, prediction_type: str) -> Guidance:
        """This guidance over ``as_denoiser(denoiser, schedule, prediction_type)`` (a copy)."""
        bound = copy.copy(self)
        bound.denoiser = as_denoiser(self.denoiser, schedule, prediction_type)
        return bound

    def on_grid(self, sigmas: Tensor, timesteps: Tensor) -> Guidance:
        """This guidance over the wrapped denoiser on a sampler's grid (a copy; see Denoiser.on_grid)."""
        bound = copy.copy(self)
        bound.denoiser = on_grid(self.inner(), sigmas, timesteps)
        return bound

    def inner(self) -> DenoiserLike:
        if not hasattr(self.denoiser, "denoise"):
            raise TypeError(f"{type(self).__name__} wraps a bare network; wrap it in a Denoiser(net, schedule, "
                            f"prediction_type), call .bind(schedule, prediction_type) or pass it to sample()")
        return self.denoiser

    def network_input(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        """(x_t, t) of the wrapped Denoiser: the VP sample and its timestep."""
        return self.inner().network_input(x, sigma)

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, x: Tensor, sigma: Sigma) -> Tensor:
        return self.denoise(x, sigma)[0]


class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance (Ho & Salimans 2022) of a Denoiser over ``net(x_t, t, cond)``.

    One batched forward of [uncond; cond]; the two outputs are combined in the network's own output
    space (as diffusers does, guidance rescale included) and turned into (x̂_0, ε̂) once. Without
    rescale this is u + s·(c - u) of x̂_0 and of ε̂ too: both are affine in the output at fixed x, σ.

    ``interval`` (σ_lo, σ_hi) applies guidance only at noise levels σ_lo ≤ σ ≤ σ_hi and the conditional
    model alone elsewhere, with one forward (Kynkäänniemi et al. 2024 limit guidance to an interval; on the
    demo model guidance at low σ turns circles into diamonds, see docs/demo-training.md).
    """

    def __init__(
        self,
        denoiser: Denoiser | Callable[..., Tensor],
        cond: Condition,
        uncond: Condition,
        scale: float = 7.5,
        rescale: float = 0.0,
        schedule: NoiseSchedule | None = None,
        prediction_type: str = "epsilon",
        interval: tuple[float, float] | None = None,
    ) -> None:
        self.scale = check_float("guidance_scale", scale, 0.0)
        self.rescale = check_float("guidance_rescale", rescale, 0.0, 1.0)
        self.interval = check_interval(interval)
        self.cond, self.uncond = cond, uncond
        self._both: Condition | None = None  # [uncond; cond], built at the first guided step
        super().__init__(denoiser, schedule, prediction_type)

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        inner = self.inner()
        if not isinstance(inner, Denoiser):
            raise TypeError(f"ClassifierFreeGuidance wraps a Denoiser over net(x_t, t, cond); "
                            f"got {type(inner).__name__}")
        guided = self._guided(sigma, x.shape[0], x.device)
        if not guided.any():
            return inner.from_output(x, sigma, inner.output(x, sigma, self.cond))
        if self._both is None:  # the same batch at every step (and the same tensors: their projections are cached)
            self._both = _cat(self.uncond, self.cond)
        both = inner.output(torch.cat([x, x]), _twice(sigma), self._both)
        uncond, cond = both.chunk(2)  # (2B, ...) → two (B, ...)
        out = cfg_combine(uncond, cond, self.scale, self.rescale)
        if not guided.all():
            out = torch.where(guided.view(-1, *[1] * (out.ndim - 1)), out, cond)
        return inner.from_output(x, sigma, out)

    def _guided(self, sigma: Sigma, batch: int, device: torch.device) -> Tensor:
        """(B,) bool: which samples' σ lies in the guidance interval (all of them without one)."""
        if self.interval is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        sigmas = torch.as_tensor(sigma, dtype=torch.float64, device=device).flatten().expand(batch)
        return (sigmas >= self.interval[0]) & (sigmas <= self.interval[1])


def check_interval(interval: tuple[float, float | None] | None,
                   name: str = "guidance_interval") -> tuple[float, float] | None:
    """``None`` (guidance at every σ) or (σ_lo, σ_hi) with 0 ≤ σ_lo ≤ σ_hi ≤ inf (``None`` as σ_hi: inf)."""
    if interval is None:
        return None
    try:
        low, high = interval
        low, high = float(low), float("inf") if high is None else float(high)
    except (TypeError, ValueError):
        low = high = float("nan")
    if isinstance(interval, str) or not 0 <= low <= high:  # NaN fails the comparison too
        raise ValueError(f"{name}={interval!r} is not allowed; allowed: (sigma_low, sigma_high) with "
                         "0 <= sigma_low <= sigma_high (None: inf), or None")
    return low, high


def class_log_prob_grad(classifier: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """∇_x log p(y | x_t) of a noise-aware classifier returning logits (B, classes)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs[torch.arange(x.shape[0], device=x.device), labels].sum()
        return torch.autograd.grad(chosen, x_in)[0]


class ClassifierGuidance(Guidance):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 / eq. 14): ε̂ ← ε̂ - s·√(1-ᾱ_t)·∇ log p(y | x_t).

    The classifier sees the VP sample x_t = x/√(σ²+1) at t(σ), and √(1-ᾱ_t) = σ/√(σ²+1); x̂_0 moves by
    -σ times the change of ε̂ (x = x̂_0 + σ ε̂). Wraps any denoiser, so it combines with
    :class:`ClassifierFreeGuidance`.
    """

    def __init__(
        self,
        denoiser: DenoiserLike | Callable[..., Tensor],
        classifier: Callable[[Tensor, Tensor], Tensor],
        labels: Tensor,
        scale: float,
        schedule: NoiseSchedule | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        self.classifier, self.labels = classifier, labels
        self.scale = check_float("classifier_scale", scale, 0.0)
        super().__init__(denoiser, schedule, prediction_type)

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        check_same_shape("labels", tuple(self.labels.shape), (x.shape[0],))
        x0, eps = self.inner().denoise(x, sigma)
        x_t, t = self.network_input(x, sigma)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        sigma_t = broadcast(s / (1 + s**2).sqrt(), x)  # √(1-ᾱ_t), the VP noise std
        shift = self.scale * sigma_t * class_log_prob_grad(self.classifier, x_t, t, self.labels)  # ε̂ - ε̂_guided
        return x0 + broadcast(s, x) * shift, eps - shift
