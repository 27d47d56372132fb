"""Samplers as plain functions of a denoiser ``model(x_t, t) -> prediction``.

Every sampler takes the state ``x`` at ``timesteps[0]`` in the variance-preserving (VP)
convention x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, runs the given descending timesteps, and returns the
clean sample. Randomness comes only from the ``generator`` passed in. The network is called with
the VP input and a float32 timestep tensor of shape (B,); ``prediction_type`` says what it
predicts ('epsilon', 'v' or 'x0').
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.schedule import (
    NoiseSchedule,
    broadcast,
    normalize_prediction_type,
    predict_eps,
    predict_x0,
)
from ldm.diffusion.timesteps import make_timesteps, strength_timesteps
from ldm.validation import check_choice, check_float, check_same_shape

Model = Callable[[Tensor, Tensor], Tensor]
# callback(step_index, t, x_after_step, x0_prediction)
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Unit Gaussian noise shaped like ``x``, drawn on the generator's device (CPU seeds everywhere)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _steps(timesteps: Tensor, desc: str, progress: bool):
    return enumerate(tqdm(timesteps.tolist(), desc=desc, disable=not progress, leave=False))


def _net(model: Model, x: Tensor, t: float) -> Tensor:
    return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))


def sample_ddpm(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    variance: str = "small",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from p(x_{t'} | x_t) (Ho et al. 2020, Alg. 2) over strided steps t → t'.

    ``variance`` 'small' uses σ² = β̃ = (1-ᾱ_{t'})/(1-ᾱ_t)·β, 'large' uses σ² = β, where
    β = 1 - ᾱ_t/ᾱ_{t'} is the effective beta of the stride.
    """
    check_choice("variance", variance, ("small", "large"))
    ts = timesteps.tolist()
    for i, t in _steps(timesteps, "ddpm", progress):
        ab = schedule.alpha_bar_at(t)
        ab_prev = schedule.alpha_bar_at(ts[i + 1]) if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - ab / ab_prev
        x0 = predict_x0(_net(model, x, t), x, ab, prediction_type)
        # posterior mean μ̃(x_t, x_0), Ho et al. 2020 eq. 7
        x_next = (ab_prev.sqrt() * beta / (1 - ab)).item() * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)).item() * x
        if t > 0:
            var = ((1 - ab_prev) / (1 - ab) * beta).clamp(min=1e-20) if variance == "small" else beta
            x_next = x_next + var.sqrt().item() * randn_like(x, generator)
        x = x_next
        if callback is not None:
            callback(i, torch.tensor(t), x, x0)
    return x


def sample_ddim(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    final_alpha_bar: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); η=0 is deterministic, η=1 matches DDPM's variance.

    After the last step ᾱ is ``final_alpha_bar``, by default ᾱ_0 as in Stable Diffusion's
    configuration (``set_alpha_to_one=False``).
    """
    check_float("eta", eta, 0.0)
    final = schedule.alpha_bar[0] if final_alpha_bar is None else torch.tensor(final_alpha_bar, dtype=torch.float64)
    ts = timesteps.tolist()
    for i, t in _steps(timesteps, "ddim", progress):
        ab = schedule.alpha_bar_at(t)
        ab_prev = schedule.alpha_bar_at(ts[i + 1]) if i + 1 < len(ts) else final
        pred = _net(model, x, t)
        x0 = predict_x0(pred, x, ab, prediction_type)
        eps = predict_eps(pred, x, ab, prediction_type)
        # clamp: a final_alpha_bar below ᾱ_t would make the variance negative (its root NaN even at η=0)
        std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt().item() * x0 + (1 - ab_prev - std**2).sqrt().item() * eps
        if eta > 0:
            x = x + std.item() * randn_like(x, generator)
        if callback is not None:
            callback(i, torch.tensor(t), x, x0)
    return x


def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022, Alg. 2), ending at σ = 0.

    With α_t = 1/√(1+σ_t²), s_t = σ_t α_t and λ_t = log(α_t/s_t), each step is
    x ← (s_next/s) x - α_next (e^{-h} - 1) D, with D the current x̂_0 on the first step and
    x̂_0 + (x̂_0 - x̂_0^prev)/(2r) after it (r = h_prev/h); the last step (to σ=0) returns x̂_0.
    """
    sigmas = torch.cat([schedule.sigma_at(timesteps), torch.zeros(1, dtype=torch.float64)])
    lambdas = -sigmas.log()  # λ = log(α/s) = -log σ
    x0_prev = None
    for i, t in _steps(timesteps, "dpmpp_2m", progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = predict_x0(_net(model, x, t), x, 1 / (1 + sigma**2), prediction_type)
        if sigma_next == 0:
            x_next = x0
        else:
            h = lambdas[i + 1] - lambdas[i]
            d = x0
            if x0_prev is not None:
                r = (lambdas[i] - lambdas[i - 1]) / h
                d = x0 + (x0 - x0_prev) / (2 * r.item())
            alpha_next = 1 / (1 + sigma_next**2).sqrt()
            ratio = (sigma_next / sigma) * ((1 + sigma**2) / (1 + sigma_next**2)).sqrt()  # s_next / s
            x_next = ratio.item() * x - (alpha_next * torch.expm1(-h)).item() * d
        x, x0_prev = x_next, x0
        if callback is not None:
            callback(i, torch.tensor(t), x, x0)
    return x


def _x0_from_ve(pred: Tensor, x: Tensor, sigma: float, prediction_type: str) -> Tensor:
    """x̂_0 from a network output, for a sample x = x_0 + σ ε in the variance-exploding form."""
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        return x - sigma * pred
    if kind == "v":
        return pred * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return pred


def _euler(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    prediction_type: str,
    generator: torch.Generator | None,
    callback: Callback | None,
    progress: bool,
    ancestral: bool,
) -> Tensor:
    sigmas = torch.cat([schedule.sigma_at(timesteps), torch.zeros(1, dtype=torch.float64)]).tolist()
    x = x * math.sqrt(sigmas[0] ** 2 + 1)  # VP → VE: x = x_0 + σ ε
    for i, t in _steps(timesteps, "euler_a" if ancestral else "euler", progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = _net(model, x / math.sqrt(sigma**2 + 1), t)
        x0 = _x0_from_ve(pred, x, sigma, prediction_type)
        d = (x - x0) / sigma  # dx/dσ of the probability-flow ODE (Karras et al. 2022, eq. 4)
        sigma_up = 0.0
        if ancestral:  # split the step into a deterministic part and fresh noise (k-diffusion)
            sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_next = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + d * (sigma_next - sigma)
        if ancestral:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, torch.tensor(t), x, x0)
    return x


def sample_euler(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 without churn)."""
    return _euler(model, x, schedule, timesteps, prediction_type, generator, callback, progress, False)


def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral: an Euler step to σ_down, then fresh noise of std σ_up (k-diffusion)."""
    return _euler(model, x, schedule, timesteps, prediction_type, generator, callback, progress, True)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
}
# Each sampler's default spacing and timestep grid, as in the matching diffusers scheduler:
# the Euler samplers take fractional timesteps, DPM-Solver lays out N+1 points and drops t≈0.
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "euler_a": "linspace"}
GRID = {"euler": {"continuous": True}, "euler_a": {"continuous": True}, "dpmpp_2m": {"exclude_final": True}}
# Spacings whose first step is the last training step; there the Euler samplers start pure noise
# at x = σ_max ε in the VE form, as k-diffusion and diffusers do (elsewhere at the exact √(σ²+1) ε).
_SIGMA_MAX_SPACINGS = ("linspace", "trailing")
_VE_SAMPLERS = ("euler", "euler_a")


def initial_state(
    sampler: str,
    noise: Tensor,
    schedule: NoiseSchedule,
    t_start: float,
    x0: Tensor | None = None,
    spacing: str | None = None,
) -> Tensor:
    """The VP state at ``t_start`` that ``sampler`` starts from.

    With ``x0`` (image-to-image): the forward process q(x_t | x_0) with this ``noise``.
    Without: pure noise — unit variance, except for the Euler samplers on a spacing that starts
    at the last training step (default for them), which start at σ_max ε in the VE form, i.e.
    √(1-ᾱ) ε here, as diffusers' Euler schedulers do.
    """
    check_choice("sampler", sampler, SAMPLERS)
    spacing = spacing or DEFAULT_SPACING[sampler]
    t = torch.full((noise.shape[0],), float(t_start), dtype=torch.float64)
    if x0 is not None:
        check_same_shape("x0", x0.shape, noise.shape)
        return schedule.q_sample(x0, t, noise)
    if sampler in _VE_SAMPLERS and spacing in _SIGMA_MAX_SPACINGS:
        return noise * broadcast((1 - schedule.alpha_bar_at(t)).sqrt(), noise)
    return noise


def sample(
    sampler: str,
    model: Model,
    noise: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    prediction_type: str = "epsilon",
    x0: Tensor | None = None,
    strength: float = 1.0,
    timestep_spacing: str | None = None,
    steps_offset: int = 0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    **options: float | str,
) -> Tensor:
    """Run ``sampler`` for ``num_steps`` from ``noise`` (or from ``x0`` noised to ``strength``).

    ``options`` go to the sampler (``eta`` for DDIM, ``variance`` for DDPM).
    """
    check_choice("sampler", sampler, SAMPLERS)
    spacing = timestep_spacing or DEFAULT_SPACING[sampler]
    timesteps = make_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset, **GRID.get(sampler, {}))
    if x0 is not None:
        timesteps = strength_timesteps(timesteps, strength)
    elif strength != 1.0:
        raise ValueError(f"strength={strength!r} needs an x0 to start from; allowed without x0: 1.0")
    x = initial_state(sampler, noise, schedule, timesteps[0].item(), x0, spacing)
    return SAMPLERS[sampler](
        model,
        x,
        schedule,
        timesteps,
        prediction_type=prediction_type,
        generator=generator,
        callback=callback,
        progress=progress,
        **options,
    )
