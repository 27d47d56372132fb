"""Samplers as plain functions of a denoiser ``denoiser(x, sigma) -> x̂_0`` over a σ grid (k-diffusion style).

Every sampler takes the state x = x_0 + σ_0 ε at ``sigmas[0]`` in the variance-exploding form
(Karras et al. 2022), steps through the descending ``sigmas`` and returns the state at
``sigmas[-1]`` (0, or DDIM's final σ). It knows nothing of networks, prediction types or
guidance (see ldm.diffusion.denoiser); randomness comes only from the ``generator`` passed in.
``sample`` lays out the timestep grid of the matching diffusers scheduler (or its Karras /
exponential σ, ``sigma_spacing``), makes the denoiser and converts between the VP form
x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and this one. The first-order samplers and DPM-Solver++(2M) live here;
the other multistep ones in samplers_multistep, the single-step ones in samplers_singlestep.
A1111's sampler names ("DPM++ 2M Karras", …) resolve to (sampler, σ spacing): ``resolve_sampler``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.denoiser import ConsistencyBoundary, DenoiserLike, as_denoiser, on_grid
from ldm.diffusion.samplers_multistep import sample_dpmpp_2m_sde, sample_lms, sample_unipc
from ldm.diffusion.samplers_singlestep import log_midpoint, sample_dpmpp_sde, sample_heun, sample_lcm
from ldm.diffusion.schedule import NoiseSchedule, posterior_mean
from ldm.diffusion.steps import DenoiserFn, StepCallback, ancestral_step, randn_like, sigma_steps  # noqa: F401 (re-exported)
from ldm.diffusion.timesteps import (
    SIGMA_SPACINGS,
    lcm_timesteps,
    make_timesteps,
    spaced_sigmas,
    strength_timesteps,
)
from ldm.validation import check_choice, check_float, check_same_shape

# What ``sample`` takes: a network (x_t, t) -> prediction, or a denoiser (see as_denoiser)
Model = Callable[[Tensor, Tensor], Tensor]
# callback(step_index, t, x_t after the step (VP), x̂_0), as ``sample`` reports steps
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


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
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
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
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
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
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
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
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
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
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "heun": sample_heun,
    "lms": sample_lms,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}
# Each sampler's default spacing and timestep grid, as in the matching diffusers scheduler: the ODE samplers
# in σ take fractional timesteps, the DPM-Solver family lays out N+1 points and drops t≈0. LCM lays out its
# own grid (lcm_timesteps); its scheduler's "leading" is unused.
DEFAULT_SPACING = {
    "ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace", "euler_a": "linspace",
    "dpmpp_2m_sde": "linspace", "dpmpp_sde": "linspace", "heun": "linspace", "lms": "linspace", "unipc": "linspace",
    "lcm": "leading",
}
_CONTINUOUS = ("euler", "euler_a", "dpmpp_sde", "heun", "lms")
_DPM_FAMILY = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
GRID = {**{name: {"continuous": True} for name in _CONTINUOUS},
        **{name: {"exclude_final": True} for name in _DPM_FAMILY}}
# Spacings whose first step is the last training step; there the σ-space samplers start pure noise at
# x = σ_max ε in the VE form, as k-diffusion and diffusers do (elsewhere at the exact √(σ²+1) ε).
_SIGMA_MAX_SPACINGS = ("linspace", "trailing")
_VE_SAMPLERS = _CONTINUOUS
# The samplers whose diffusers scheduler has use_karras_sigmas / use_exponential_sigmas (EulerAncestral has
# not; ours spaces it as Euler). The DPM-Solver family spans σ(0)..σ(T-1) and calls the network at integer
# timesteps (t(σ) rounded for Karras, truncated by diffusers' int64 cast for exponential); the others span their
# timestep grid's σ and call it at the fractional t(σ) (NoiseSchedule.sigma_to_t).
SIGMA_SPACING_SAMPLERS = _CONTINUOUS + _DPM_FAMILY
# LCMScheduler's configuration: the distillation's timestep count and its boundary-condition time scale
LCM_ORIGINAL_STEPS, LCM_TIMESTEP_SCALING = 50, 10.0

# A1111 (AUTOMATIC1111 WebUI) sampler names → (sampler, σ spacing); matched ignoring case
A1111_NAMES: dict[str, tuple[str, str | None]] = {
    "Euler": ("euler", None), "Euler a": ("euler_a", None), "Heun": ("heun", None), "LMS": ("lms", None),
    "LMS Karras": ("lms", "karras"), "DPM++ 2M": ("dpmpp_2m", None), "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", None), "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ SDE": ("dpmpp_sde", None), "DPM++ SDE Karras": ("dpmpp_sde", "karras"), "DDIM": ("ddim", None),
    "UniPC": ("unipc", None), "LCM": ("lcm", None), "DDPM": ("ddpm", None),
}
_A1111_LOWER = {name.lower(): value for name, value in A1111_NAMES.items()}


def resolve_sampler(name: str) -> tuple[str, dict[str, str]]:
    """(sampler, options) for a name of SAMPLERS or an A1111 name: "DPM++ 2M Karras" → ("dpmpp_2m",
    {"sigma_spacing": "karras"}), "euler" → ("euler", {})."""
    if isinstance(name, str) and name in SAMPLERS:
        return name, {}
    sampler, spacing = _A1111_LOWER.get(name.lower(), (None, None)) if isinstance(name, str) else (None, None)
    if sampler is None:
        ours, theirs = ", ".join(map(repr, SAMPLERS)), ", ".join(map(repr, A1111_NAMES))
        raise ValueError(f"sampler={name!r} is not supported; allowed: {ours}, or an A1111 name: {theirs}")
    return sampler, {} if spacing is None else {"sigma_spacing": spacing}


def canonical_sampler(name: str, sigma_spacing: str | None = None) -> tuple[str, str | None]:
    """(sampler of SAMPLERS, σ spacing or None) for ``name`` (ours or A1111's) and an explicit ``sigma_spacing``
    ('karras' | 'exponential' | None), checked: the two must agree, and the sampler must take a σ spacing."""
    sampler, options = resolve_sampler(name)
    implied = options.get("sigma_spacing")
    if sigma_spacing is not None and implied is not None and sigma_spacing != implied:
        raise ValueError(f"sigma_spacing={sigma_spacing!r} contradicts sampler={name!r}, which implies {implied!r}")
    spacing = implied if sigma_spacing is None else sigma_spacing
    if spacing is not None:
        check_choice("sigma_spacing", spacing, SIGMA_SPACINGS)
        if sampler not in SIGMA_SPACING_SAMPLERS:
            allowed = ", ".join(map(repr, SIGMA_SPACING_SAMPLERS))
            raise ValueError(f"sigma_spacing={spacing!r} is not supported by sampler {sampler!r}; "
                             f"allowed with: {allowed}")
    return sampler, spacing


def a1111_name(sampler: str, sigma_spacing: str | None = None) -> str:
    """The A1111 name of (sampler, σ spacing), e.g. ("dpmpp_2m", "karras") → "DPM++ 2M Karras"; ours where A1111
    has none."""
    names = {value: name for name, value in A1111_NAMES.items()}
    return names.get((sampler, sigma_spacing), sampler if sigma_spacing is None else f"{sampler} {sigma_spacing}")


def sampler_sigmas(sampler: str, schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """σ(t) at each timestep (float64), then where the last step lands: σ = 0, except for DDIM, which
    ends at ᾱ_0 (σ at t = 0), as Stable Diffusion's configuration does (``set_alpha_to_one=False``)."""
    final = schedule.sigmas[:1] if sampler == "ddim" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([schedule.sigma_at(timesteps), final])


def sampler_grid(
    sampler: str,
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str | None = None,
    steps_offset: int = 0,
    sigma_spacing: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(timesteps (N,) float32, σ (N+1,) float64) that ``sampler`` visits in ``num_steps`` steps, as the matching
    diffusers scheduler lays them out: σ(t) on its timestep grid, or with ``sigma_spacing`` the Karras /
    exponential σ between the ends of SIGMA_SPACING_SAMPLERS' range and the timesteps the network sees there.
    DPM++ SDE's are diffusers' own float32 σ (``sde_grid``)."""
    sampler, sigma_spacing = canonical_sampler(sampler, sigma_spacing)
    if sampler == "lcm":
        timesteps = lcm_timesteps(num_steps, schedule.num_train_timesteps, LCM_ORIGINAL_STEPS)
    else:
        spacing = spacing or DEFAULT_SPACING[sampler]
        grid = GRID.get(sampler, {})
        timesteps = make_timesteps(num_steps, schedule.num_train_timesteps, spacing, steps_offset,
                                   dtype=torch.float64, **grid)
    if sampler == "dpmpp_sde":
        return sde_grid(schedule, timesteps, sigma_spacing)
    timesteps = timesteps.float()
    sigmas = sampler_sigmas(sampler, schedule, timesteps)
    if sigma_spacing is None:
        return timesteps, sigmas
    low, high = schedule.sigmas[[0, -1]] if sampler in _DPM_FAMILY else sigmas[[-2, 0]]
    spaced = spaced_sigmas(sigma_spacing, low.item(), high.item(), num_steps)
    t = schedule.sigma_to_t(spaced)
    if sampler in _DPM_FAMILY:
        t = t.round() if sigma_spacing == "karras" else t.trunc()
    return t.float(), torch.cat([spaced, sigmas[-1:]])


# ---- DPM++ SDE on diffusers' float32 σ ----
# Its noise is a Brownian tree over [σ_min, σ_max] of the grid, queried at each step's σ, log-midpoint σ_mid and
# σ_next; torchsde resolves queries to 1e-6 and the increments are only ½-Hölder in the query points, so a seed
# gives diffusers' noise only on diffusers' σ to the bit. DPMSolverSDEScheduler computes them from a float32 ᾱ
# (SD's: up to 1.3e-5 relative from our float64 σ, which moved 20-step images by up to 4.4e-3), so for this
# sampler the grid is laid out as its set_timesteps does, float32 rounding included; the sampler (log_midpoint)
# then steps in float32 as its step() does.


def sde_grid(schedule: NoiseSchedule, timesteps: Tensor, sigma_spacing: str | None = None) -> tuple[Tensor, Tensor]:
    """(timesteps (N,) float32, σ (N+1,) float64 holding float32 values) of DPM++ SDE on the float64 ``timesteps``
    of its spacing, as DPMSolverSDEScheduler.set_timesteps computes them: σ interpolated linearly (np.interp) in
    the float32 table ``schedule.sigmas_float32()``; with ``sigma_spacing`` the Karras / exponential σ between
    the ends of those (in float64, numpy) and the network's timesteps t(σ) on the float32 log σ table; then σ
    cast to float32, and σ = 0 appended."""
    table = schedule.sigmas_float32().numpy()
    t = timesteps.double().numpy()
    sigmas = np.interp(t, np.arange(len(table)), table)
    if sigma_spacing is not None:
        high, low, n = sigmas[0].item(), sigmas[-1].item(), len(sigmas)
        if sigma_spacing == "karras":  # diffusers' _convert_to_karras, ρ = 7
            rho = 7.0
            high_inv, low_inv = high ** (1 / rho), low ** (1 / rho)
            sigmas = (high_inv + np.linspace(0, 1, n) * (low_inv - high_inv)) ** rho
        else:  # _convert_to_exponential
            sigmas = np.exp(np.linspace(math.log(high), math.log(low), n))
        t = _sigma_to_t_float32(sigmas, np.log(table))
    sigmas32 = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(t).float(), torch.from_numpy(sigmas32).double()


def sde_midpoints(schedule: NoiseSchedule, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_mid, t_mid) float64 at each DPM++ SDE step between positive σ of ``sigmas``: σ_mid as the sampler
    queries it (``log_midpoint``, float32) and the network's timestep there as diffusers'
    _second_order_timesteps computes it: the log-midpoint in float64, t(σ) on the float32 log σ table. diffusers
    takes that midpoint from its σ before their float32 cast, which the grid no longer holds: from the float32 σ
    these t are within 2e-5 of its (1.4e-5 measured; the grid's own σ and t are exact)."""
    s = sigmas.tolist()
    pairs = [(a, b) for a, b in zip(s[:-1], s[1:]) if b > 0]
    if not pairs:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    mid_sigmas = torch.tensor([log_midpoint(a, b)[1] for a, b in pairs], dtype=torch.float64)
    lam = -np.log(np.array([a for a, _ in pairs] + [pairs[-1][1]]))
    mid = np.exp(-(lam[:-1] + np.diff(lam) * 0.5))
    return mid_sigmas, torch.from_numpy(_sigma_to_t_float32(mid, np.log(schedule.sigmas_float32().numpy())))


def _sigma_to_t_float32(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """t(σ) (float64) as diffusers' _sigma_to_t: log σ interpolated between training steps of the float32 table
    ``log_sigmas`` (NoiseSchedule.sigma_to_t on its float32 σ, in diffusers' arithmetic)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def start_state(
    sampler: str, noise: Tensor, sigma: float, x0: Tensor | None = None, spacing: str | None = None
) -> Tensor:
    """The VE state x at σ = ``sigma`` that ``sampler`` starts from.

    With ``x0`` (image-to-image): x_0 + σ ε, the forward process with this ``noise``. Without: pure noise,
    √(σ²+1) ε (unit variance in the VP form), except for the σ-space samplers on a spacing that starts at the
    last training step (their default), which start at σ ε, as diffusers' schedulers of them do.
    """
    check_choice("sampler", sampler, SAMPLERS)
    if x0 is not None:
        check_same_shape("x0", x0.shape, noise.shape)
        return x0 + sigma * noise
    at_sigma_max = sampler in _VE_SAMPLERS and (spacing or DEFAULT_SPACING[sampler]) in _SIGMA_MAX_SPACINGS
    return noise * (sigma if at_sigma_max else math.sqrt(sigma**2 + 1))


def initial_state(
    sampler: str,
    noise: Tensor,
    schedule: NoiseSchedule,
    t_start: float,
    x0: Tensor | None = None,
    spacing: str | None = None,
) -> Tensor:
    """The VP state at ``t_start`` that ``sampler`` starts from: ``start_state`` at σ(t_start), divided by √(σ²+1).

    With ``x0`` (image-to-image): the forward process q(x_t | x_0) with this ``noise``. Without: unit-variance
    noise, or √(1-ᾱ) ε for the σ-space samplers on their default spacings (σ_max ε in the VE form).
    """
    sigma = schedule.sigma_at(float(t_start)).item()
    return start_state(sampler, noise, sigma, x0, spacing) / math.sqrt(sigma**2 + 1)


def grid_denoiser(
    sampler: str, denoiser: DenoiserLike, sigmas: Tensor, timesteps: Tensor, schedule: NoiseSchedule | None = None
) -> DenoiserLike:
    """``denoiser`` as ``sampler`` calls it on this grid: at the grid's timesteps (``on_grid``); for DPM++ SDE with
    ``schedule`` also at its log-midpoints, at diffusers' timesteps there (``sde_midpoints``; without it, at the
    denoiser's own ``schedule.sigma_to_t``); for LCM inside its consistency boundary condition
    (ConsistencyBoundary at LCM_TIMESTEP_SCALING)."""
    if sampler == "dpmpp_sde" and schedule is not None:
        mid_sigmas, mid_t = sde_midpoints(schedule, sigmas)
        sigmas = torch.cat([sigmas[: len(timesteps)].double(), mid_sigmas])
        timesteps = torch.cat([timesteps.double(), mid_t])
    bound = on_grid(denoiser, sigmas, timesteps)
    return ConsistencyBoundary(bound, LCM_TIMESTEP_SCALING) if sampler == "lcm" else bound


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
    sigma_spacing: str | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    **options: float | str,
) -> Tensor:
    """Run ``sampler`` for ``num_steps`` from ``noise`` (or from ``x0`` noised to ``strength``); returns VP x_0.

    ``sampler`` is a name of SAMPLERS or an A1111 name ("DPM++ 2M Karras"); ``sigma_spacing`` ('karras' |
    'exponential') replaces the grid's σ as diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` do.
    ``model`` is a network (x_t, t) -> prediction of ``prediction_type``, or a denoiser (a
    :class:`~ldm.diffusion.denoiser.Denoiser`, or guidance over one or over a bare network; see
    ``as_denoiser``). ``options`` go to the sampler (``eta`` for DDIM, ``variance`` for DDPM, ``order`` for LMS
    and UniPC, ``noise_seed`` and ``noise_sigma_max`` for DPM++ SDE).
    """
    sampler, sigma_spacing = canonical_sampler(sampler, sigma_spacing)
    denoiser = as_denoiser(model, schedule, prediction_type)
    spacing = timestep_spacing or DEFAULT_SPACING[sampler]
    timesteps, sigmas = sampler_grid(sampler, schedule, num_steps, spacing, steps_offset, sigma_spacing)
    if sampler == "dpmpp_sde":  # its Brownian tree spans the whole grid, as diffusers', also for image-to-image
        options = {"noise_sigma_max": sigmas.max().item(), **options}
    if x0 is not None:
        timesteps = strength_timesteps(timesteps, strength)
        sigmas = sigmas[-len(timesteps) - 1 :]
    elif strength != 1.0:
        raise ValueError(f"strength={strength!r} needs an x0 to start from; allowed without x0: 1.0")
    x = start_state(sampler, noise, sigmas[0].item(), x0, spacing)
    report = _report_timesteps(callback, timesteps, sigmas)
    denoiser = grid_denoiser(sampler, denoiser, sigmas, timesteps, schedule)
    x = SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, callback=report, progress=progress, **options)
    return x / math.sqrt(sigmas[-1].item() ** 2 + 1)  # VE → VP (only DDIM ends above σ = 0)
