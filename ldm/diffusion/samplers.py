"""Samplers as plain functions of a denoiser ``denoiser(x, sigma) -> x̂_0`` over a σ grid (k-diffusion style).

Every sampler takes the state x = x_0 + σ_0 ε at ``sigmas[0]`` in the variance-exploding form
(Karras et al. 2022), steps through the descending ``sigmas`` and returns the state at
``sigmas[-1]`` (0, or DDIM's final σ). It knows nothing of networks, prediction types or
guidance (see ldm.diffusion.denoiser); randomness comes only from the ``generator`` passed in.
``sample`` lays out the timestep grid of the matching diffusers scheduler, makes the denoiser
and converts between the VP form x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldm.diffusion.denoiser import as_denoiser
from ldm.diffusion.schedule import NoiseSchedule, broadcast, posterior_mean
from ldm.diffusion.timesteps import make_timesteps, strength_timesteps
from ldm.validation import check_choice, check_float, check_same_shape

# What ``sample`` takes: a network (x_t, t) -> prediction, or a denoiser (see as_denoiser)
Model = Callable[[Tensor, Tensor], Tensor]
# callback(step_index, t, x_t after the step (VP), x̂_0), as ``sample`` reports steps
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
# callback(step_index, σ, x after the step (VE), x̂_0), as the samplers report steps
StepCallback = Callable[[int, float, Tensor, Tensor], None]
DenoiserFn = Callable[[Tensor, float], Tensor]


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Unit Gaussian noise shaped like ``x``, drawn on the generator's device (CPU seeds everywhere)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _steps(sigmas: Tensor, progress: bool) -> Iterable[tuple[int, tuple[float, float]]]:
    """(i, (σ_i, σ_{i+1})) as Python floats, behind a progress bar."""
    s = sigmas.tolist()
    return enumerate(tqdm(list(zip(s[:-1], s[1:])), disable=not progress, leave=False))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_up, σ_down) with σ_down² + σ_up² = σ_next²: a step to σ_next split into a deterministic step to
    σ_down and fresh noise of std σ_up; η = 1 is the DDPM posterior's std (Song et al. 2021, eq. 16), as k-diffusion."""
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2), 0.0) / sigma**2))
    return sigma_up, math.sqrt(sigma_next**2 - sigma_up**2)


def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    variance: str = "small",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral sampling from q(x_{t'} | x_t, x̂_0) (Ho et al. 2020, Alg. 2, eqs. 6-7) over strided steps.

    Divided by √ᾱ_{t'} (the VE form) the posterior mean is x̂_0 + (σ'/σ)² (x - x̂_0); its std is η = 1's
    σ_up of ``ancestral_step`` for 'small' (β̃ = (1-ᾱ_{t'})/(1-ᾱ_t)·β) and √((σ²-σ'²)(1+σ'²)/(1+σ²)) for
    'large' (β = 1 - ᾱ_t/ᾱ_{t'}, the stride's beta). The step to σ' = 0 adds no noise.
    """
    check_choice("variance", variance, ("small", "large"))
    for i, (sigma, sigma_next) in _steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        x = posterior_mean(x0, x, sigma, sigma_next)
        if sigma_next > 0:
            if variance == "small":
                std = ancestral_step(sigma, sigma_next)[0]
            else:
                std = math.sqrt((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2))
            x = x + std * randn_like(x, generator)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 without churn)."""
    for i, (sigma, sigma_next) in _steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        d = (x - x0) / sigma  # dx/dσ (Karras et al. 2022, eq. 4)
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral: an Euler step to σ_down, then fresh noise of std σ_up (k-diffusion, ``ancestral_step``)."""
    check_float("eta", eta, 0.0)
    for i, (sigma, sigma_next) in _steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        sigma_up, sigma_down = ancestral_step(sigma, sigma_next, eta)
        d = (x - x0) / sigma
        x = x + d * (sigma_down - sigma)
        if eta > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); η=0 is deterministic, η=1 matches DDPM's variance.

    Divided by √ᾱ_{t'} its step reads x' = x̂_0 + σ_down ε̂ + σ_up z with (σ_up, σ_down) of
    ``ancestral_step`` at η: the Euler ancestral step (the Euler step itself at η = 0).
    """
    return sample_euler_ancestral(denoiser, x, sigmas, eta=eta, generator=generator, callback=callback,
                                  progress=progress)


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022, Alg. 2), in the VE form of k-diffusion.

    With λ = -log σ and h = λ_next - λ each step is x ← (σ_next/σ) x - (e^{-h} - 1) D, with D the
    current x̂_0 on the first step and x̂_0 + (x̂_0 - x̂_0^prev)/(2r) after it (r = h_prev/h); the last
    step (to σ = 0) returns x̂_0.
    """
    x0_prev, h_prev = None, 0.0
    for i, (sigma, sigma_next) in _steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * h_prev / h)
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
}
# Each sampler's default spacing and timestep grid, as in the matching diffusers scheduler:
# the Euler samplers take fractional timesteps, DPM-Solver lays out N+1 points and drops t≈0.
DEFAULT_SPACING = {
    "ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "euler_a": "linspace"
}
GRID = {"euler": {"continuous": True}, "euler_a": {"continuous": True}, "dpmpp_2m": {"exclude_final": True}}
# Spacings whose first step is the last training step; there the Euler samplers start pure noise
# at x = σ_max ε in the VE form, as k-diffusion and diffusers do (elsewhere at the exact √(σ²+1) ε).
_SIGMA_MAX_SPACINGS = ("linspace", "trailing")
_VE_SAMPLERS = ("euler", "euler_a")


def sampler_sigmas(sampler: str, schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """σ(t) at each timestep (float64), then where the last step lands: σ = 0, except for DDIM, which
    ends at ᾱ_0 (σ at t = 0), as Stable Diffusion's configuration does (``set_alpha_to_one=False``)."""
    final = schedule.sigmas[:1] if sampler == "ddim" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([schedule.sigma_at(timesteps), final])


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


def _report_timesteps(callback: Callback | None, timesteps: Tensor, sigmas: Tensor) -> StepCallback | None:
    """A sampler's callback(i, σ, x, x̂_0) as ``callback(i, t, x_t, x̂_0)``: the timestep and the VP state."""
    if callback is None:
        return None
    c_in = [1 / math.sqrt(s**2 + 1) for s in sigmas.tolist()]
    return lambda i, sigma, x, x0: callback(i, timesteps[i], x * c_in[i + 1], x0)


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
    """Run ``sampler`` for ``num_steps`` from ``noise`` (or from ``x0`` noised to ``strength``); returns VP x_0.

    ``model`` is a network (x_t, t) -> prediction of ``prediction_type``, or a denoiser (a
    :class:`~ldm.diffusion.denoiser.Denoiser`, or guidance over one or over a bare network; see
    ``as_denoiser``). ``options`` go to the sampler (``eta`` for DDIM, ``variance`` for DDPM).
    """
    check_choice("sampler", sampler, SAMPLERS)
    denoiser = as_denoiser(model, schedule, prediction_type)
    spacing = timestep_spacing or DEFAULT_SPACING[sampler]
    timesteps = make_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset, **GRID.get(sampler, {}))
    if x0 is not None:
        timesteps = strength_timesteps(timesteps, strength)
    elif strength != 1.0:
        raise ValueError(f"strength={strength!r} needs an x0 to start from; allowed without x0: 1.0")
    sigmas = sampler_sigmas(sampler, schedule, timesteps)
    x = initial_state(sampler, noise, schedule, timesteps[0].item(), x0, spacing)
    x = x * math.sqrt(sigmas[0].item() ** 2 + 1)  # VP → VE: x = x_0 + σ ε
    report = _report_timesteps(callback, timesteps, sigmas)
    x = SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, callback=report, progress=progress, **options)
    return x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # VE → VP (only DDIM ends above σ = 0)
