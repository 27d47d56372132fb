"""Noise schedules and the forward process of DDPM (Ho et al. 2020) in closed form.

Everything is computed in float64 and cast to the sample's dtype where it meets a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.timesteps import SPACINGS
from ldm.validation import check_choice, check_int

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v", "x0")
_PREDICTION_ALIASES = {"eps": "epsilon", "v_prediction": "v", "sample": "x0"}
_DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
# Smallest ᾱ used to turn ᾱ into σ, so a zero-terminal-SNR schedule keeps a finite σ_max
# (the value diffusers uses for the same purpose).
_MIN_ALPHA_BAR = 2.0**-24


def make_betas(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """β_1..β_T (float64 unless ``dtype``) for a named schedule.

    linear: Ho et al. 2020 (1e-4 → 0.02); scaled_linear: Stable Diffusion (√β linear,
    0.00085 → 0.012); cosine: Nichol & Dhariwal 2021 eq. 17 with s=0.008 and β ≤ 0.999.
    ``dtype=torch.float32`` builds them in float32 as diffusers' schedulers do (``betas_float32``).
    """
    check_choice("beta_schedule", kind, BETA_SCHEDULES)
    check_int("num_train_timesteps", num_train_timesteps, 2)
    if kind == "cosine":  # diffusers' betas_for_alpha_bar: in float64, then cast
        return _cosine_betas(num_train_timesteps).to(dtype)
    start, end = _DEFAULT_BETA_RANGE[kind]
    start = start if beta_start is None else beta_start
    end = end if beta_end is None else beta_end
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"beta_start={start!r}, beta_end={end!r}: need 0 < beta_start <= beta_end < 1")
    if kind == "linear":
        return torch.linspace(start, end, num_train_timesteps, dtype=dtype)
    return torch.linspace(start**0.5, end**0.5, num_train_timesteps, dtype=dtype) ** 2


def _cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_1 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule and what the network predicts, as saved with a model."""

    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float | None = None  # None: the schedule's own default (see make_betas)
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    prediction_type: str = "epsilon"
    steps_offset: int = 1  # added to "leading" timesteps, as in Stable Diffusion's scheduler config
    # One spacing for every sampler (as a diffusers scheduler config imposes); None: each
    # sampler's own default (see ldm.diffusion.samplers.DEFAULT_SPACING).
    timestep_spacing: str | None = None

    def __post_init__(self) -> None:
        check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_int("num_train_timesteps", self.num_train_timesteps, 2)
        object.__setattr__(self, "prediction_type", normalize_prediction_type(self.prediction_type))
        check_int("steps_offset", self.steps_offset, 0, self.num_train_timesteps - 1)
        if self.timestep_spacing is not None:
            check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)


class NoiseSchedule:
    """A discrete variance-preserving schedule: β_t, ᾱ_t = ∏(1-β_s), and the forward process."""

    def __init__(self, betas: Tensor, betas_float32: Tensor | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must be a 1-D tensor of values in (0, 1]; got shape {tuple(betas.shape)}")
        self.betas = betas
        # β as diffusers' schedulers hold them: built in float32 (``create``), else these β cast, as diffusers'
        # trained_betas. Only ``sigmas_float32`` uses them.
        self.betas_float32 = betas.float() if betas_float32 is None else torch.as_tensor(betas_float32).float()
        if self.betas_float32.shape != betas.shape:
            raise ValueError(f"betas_float32 has shape {tuple(self.betas_float32.shape)}; need {tuple(betas.shape)}")
        self.alpha_bar = torch.cumprod(1 - betas, dim=0)
        # σ_t = √((1-ᾱ_t)/ᾱ_t): the noise level of the equivalent variance-exploding process.
        ab = self.alpha_bar.clamp(min=_MIN_ALPHA_BAR)
        self.sigmas = ((1 - ab) / ab).sqrt()

    @classmethod
    def create(
        cls,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        betas32 = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, dtype=torch.float32)
        if zero_terminal_snr:
            betas, betas32 = rescale_zero_terminal_snr(betas), rescale_zero_terminal_snr(betas32)
        return cls(betas, betas32)

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        return cls.create(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.zero_terminal_snr,
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    def sigmas_float32(self) -> Tensor:
        """σ_t (float32, (T,)) as diffusers' schedulers compute them: ((1-ᾱ)/ᾱ)^½ in float32 from the float32
        cumprod of ``betas_float32`` (SD's: within 1.3e-5 relative of ``sigmas``). DPM++ SDE needs these exact
        floats (ldm.diffusion.samplers.sde_grid). Only an ᾱ of 0 (zero terminal SNR) is raised, to the ᾱ that
        ``sigmas`` clamps to, so σ stays finite (DPMSolverSDEScheduler has no zero-SNR option)."""
        alpha_bar = torch.cumprod(1.0 - self.betas_float32, dim=0)
        alpha_bar = torch.where(alpha_bar > 0, alpha_bar, _MIN_ALPHA_BAR)
        return ((1 - alpha_bar) / alpha_bar) ** 0.5

    def sigma_at(self, t: Tensor | float) -> Tensor:
        """σ(t) (float64), linear in t between integer timesteps, as k-diffusion and diffusers do."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - low
        return (1 - w) * self.sigmas[low] + w * self.sigmas[high]

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """t(σ) (float64) interpolating log σ between training steps, clamped to [0, T-1]: where diffusers'
        schedulers (and k-diffusion) call the network for a σ they place themselves (Karras or exponential
        spacing, DPM++ SDE's midpoints). Not the inverse of ``sigma_at``, which is linear in σ."""
        log_sigmas = self.sigmas.log()  # (T,), increasing in t
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        flat = log_sigma.reshape(-1)
        low = (torch.searchsorted(log_sigmas, flat, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
        w = ((log_sigmas[low] - flat) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (low + w).reshape(log_sigma.shape)

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        """ᾱ(t) (float64); exact at integer t, through the interpolated σ(t) in between."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        exact = self.alpha_bar[t.round().long()]
        return torch.where(t == t.round(), exact, 1 / (1 + self.sigma_at(t) ** 2))

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021)."""
        ab = self.alpha_bar_at(t)
        return ab / (1 - ab)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε  (Ho et al. 2020, eq. 4)."""
        ab = broadcast(self.alpha_bar_at(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance β̃_t of q(x_{t-1} | x_t, x_0)  (Ho et al. 2020, eqs. 6-7), integer t.

        The mean is :func:`posterior_mean` on x_t / √ᾱ_t at σ_t → σ_{t-1} (exact ᾱ; σ = ∞ where ᾱ_t = 0, the
        last step of a zero-terminal-SNR schedule, whose posterior mean is √ᾱ_{t-1} x_0), times √ᾱ_{t-1}."""
        t = torch.as_tensor(t).long()
        ab = self.alpha_bar[t]
        ab_prev = torch.where(t > 0, self.alpha_bar[(t - 1).clamp(min=0)], torch.ones_like(ab))
        positive = ab > 0
        sigma = torch.where(positive, ((1 - ab) / ab.where(positive, 1.0)).sqrt(), math.inf)
        sigma_prev = ((1 - ab_prev) / ab_prev).sqrt()
        x_ve = x_t / broadcast(ab.where(positive, 1.0).sqrt(), x_t)
        mean = broadcast(ab_prev.sqrt(), x_t) * posterior_mean(x0, x_ve, sigma, sigma_prev)
        variance = broadcast((1 - ab_prev) / (1 - ab) * self.betas[t], x_t)
        return mean, variance.expand_as(mean)


def posterior_mean(x0: Tensor, x: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Mean of q(x_{t'} | x_t, x_0) for any t' < t in the VE form (states divided by √ᾱ):
    x_0 + (σ'/σ)² (x - x_0)  (Ho et al. 2020, eq. 7). σ, σ' are floats or per-sample (B,) tensors."""
    ratio = (sigma_next / sigma) ** 2
    if isinstance(ratio, Tensor):
        ratio = broadcast(ratio, x)
    return x0 + ratio * (x - x0)


def broadcast(values: Tensor, like: Tensor) -> Tensor:
    """A per-sample (B,) or scalar float64 tensor reshaped to (B, 1, ..., 1) in ``like``'s dtype."""
    values = torch.as_tensor(values).to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def normalize_prediction_type(prediction_type: str) -> str:
    """'epsilon' | 'v' | 'x0' (diffusers' 'v_prediction' and 'sample' are accepted too)."""
    name = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    check_choice("prediction_type", name, PREDICTION_TYPES + tuple(_PREDICTION_ALIASES))
    return name


def prediction_from(x0: Tensor, eps: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """The network output of the given type that corresponds to (x_0, ε): the training target.

    Its inverse, from a network output to (x̂_0, ε̂), is ldm.diffusion.denoiser.Denoiser.from_output.
    """
    kind = normalize_prediction_type(prediction_type)
    if kind == "epsilon":
        return eps
    if kind == "x0":
        return x0
    ab = broadcast(alpha_bar, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0
