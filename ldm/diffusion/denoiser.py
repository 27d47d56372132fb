"""The denoiser: a network trained in the VP convention, asked for x̂_0 and ε̂ at a noise level σ.

Samplers work in the variance-exploding (VE) form x = x_0 + σ ε (Karras et al. 2022, §2), as
k-diffusion does. A network trained on x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. 2020, eq. 4) sees
the same sample as x_t = x / √(σ²+1) at the timestep t with σ(t) = σ, since σ_t² = (1-ᾱ_t)/ᾱ_t.
This module is the one place that turns the network's ε / v / x_0 output into x̂_0 and ε̂.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, broadcast, normalize_prediction_type

# net(x_t (B, ...), t (B,) float32, *cond) -> ε, v or x_0 of the VP sample x_t
Network = Callable[..., Tensor]
# one noise level, or one per sample (B,)
Sigma = float | Tensor


class DenoiserLike(Protocol):
    """What samplers and guidance call: x̂_0 alone, or (x̂_0, ε̂), for x = x_0 + σ ε."""

    def __call__(self, x: Tensor, sigma: Sigma) -> Tensor: ...

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]: ...


class Denoiser:
    """D(x; σ) ≈ E[x_0 | x_0 + σ ε = x] from ``net`` (Karras et al. 2022, eq. 7, with c_in = 1/√(σ²+1)).

    ``prediction_type`` says what ``net`` predicts: 'epsilon', 'v' (Salimans & Ho 2022) or 'x0'
    (diffusers' 'v_prediction' and 'sample' are accepted too). Extra arguments of a call go to ``net``
    after (x_t, t), so one Denoiser serves a conditional network under guidance.
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        self.net, self.schedule = net, schedule
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.grid: tuple[Tensor, Tensor] | None = None  # (σ_i, t_i) of a sampler's grid; see on_grid

    def on_grid(self, sigmas: Tensor, timesteps: Tensor) -> Denoiser:
        """A copy that calls the network at ``timesteps[i]`` for σ = ``sigmas[i]`` and at the log-σ interpolated
        ``schedule.sigma_to_t`` for any other σ: the timesteps diffusers' schedulers feed the network, which for
        Karras / exponential σ (rounded by the DPM-Solver family) and DPM++ SDE's midpoints are not the inverse of
        ``sigma_at`` that ``timestep`` is without a grid."""
        bound = copy.copy(self)
        n = min(len(sigmas), len(timesteps))
        bound.grid = (torch.as_tensor(sigmas[:n], dtype=torch.float64), torch.as_tensor(timesteps[:n]).double())
        return bound

    def timestep(self, sigma: Sigma) -> Tensor:
        """t(σ) (float64): the inverse of ``schedule.sigma_at`` (linear in σ between training steps), or on a
        grid (``on_grid``) the grid's own timesteps."""
        if self.grid is not None:
            return self._grid_timestep(sigma)
        sigmas = self.schedule.sigmas  # (T,), increasing in t
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=sigmas.device)
        low = (torch.searchsorted(sigmas, sigma.reshape(-1), right=True) - 1).clamp(0, sigmas.numel() - 2)
        w = (sigma.reshape(-1) - sigmas[low]) / (sigmas[low + 1] - sigmas[low])
        return (low + w).clamp(0, sigmas.numel() - 1).reshape(sigma.shape)

    def _grid_timestep(self, sigma: Sigma) -> Tensor:
        grid_sigmas, grid_t = self.grid
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=grid_sigmas.device)
        flat = sigma.reshape(-1)
        hit = flat[:, None] == grid_sigmas[None, :]  # (n, G): which grid σ each σ is
        t = torch.where(hit.any(dim=1), grid_t[hit.int().argmax(dim=1)], self.schedule.sigma_to_t(flat))
        return t.reshape(sigma.shape)

    def network_input(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        """The VP sample x_t = x / √(σ²+1) and its timestep t(σ), shape (B,) float32, as the network takes them."""
        c_in = broadcast(1 / (1 + _sigma64(sigma) ** 2).sqrt(), x)
        t = self.timestep(sigma).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        return x * c_in, t

    def output(self, x: Tensor, sigma: Sigma, *cond: Any) -> Tensor:
        """The network's own output (ε, v or x_0) for the VE sample x at σ."""
        x_t, t = self.network_input(x, sigma)
        return self.net(x_t, t, *cond)

    def from_output(self, x: Tensor, sigma: Sigma, out: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) from a network output at the VE sample x = x_0 + σ ε."""
        s = _sigma64(sigma)
        if self.prediction_type == "epsilon":
            return x - broadcast(s, x) * out, out
        if self.prediction_type == "x0":
            return out, (x - out) / broadcast(s, x)
        # v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022, §4) with √ᾱ = 1/√(σ²+1), √(1-ᾱ) = σ/√(σ²+1)
        sqrt_ab, sqrt_one_minus_ab = broadcast(1 / (1 + s**2).sqrt(), x), broadcast(s / (1 + s**2).sqrt(), x)
        x_t = sqrt_ab * x
        return sqrt_ab * x_t - sqrt_one_minus_ab * out, sqrt_ab * out + sqrt_one_minus_ab * x_t

    def denoise(self, x: Tensor, sigma: Sigma, *cond: Any) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) for the VE sample x at σ: one network call."""
        return self.from_output(x, sigma, self.output(x, sigma, *cond))

    def __call__(self, x: Tensor, sigma: Sigma, *cond: Any) -> Tensor:
        return self.denoise(x, sigma, *cond)[0]


class ConsistencyBoundary:
    """A consistency model's output f(x, t) = c_skip(t) x_t + c_out(t) x̂_0 (Song et al. 2023, §3) with LCM's
    scalings c_skip = σ_d² / ((s t)² + σ_d²), c_out = s t / √((s t)² + σ_d²), σ_d = 0.5 and s =
    ``timestep_scaling`` over the network's timestep t (Luo et al. 2023; diffusers' LCMScheduler). x_t is the VP
    sample, so f → x_t as t → 0. Wraps any denoiser that has ``network_input`` (a Denoiser or guidance)."""

    def __init__(self, denoiser: Any, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> None:
        self.denoiser, self.timestep_scaling, self.sigma_data = denoiser, timestep_scaling, sigma_data

    def network_input(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        return self.denoiser.network_input(x, sigma)

    def denoise(self, x: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
        x0, _ = self.denoiser.denoise(x, sigma)
        x_t, t = self.network_input(x, sigma)
        scaled = t.double() * self.timestep_scaling  # (B,)
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2).sqrt()
        f = broadcast(c_skip, x) * x_t + broadcast(c_out, x) * x0
        return f, (x - f) / broadcast(_sigma64(sigma), x)

    def __call__(self, x: Tensor, sigma: Sigma) -> Tensor:
        return self.denoise(x, sigma)[0]


def on_grid(denoiser: Any, sigmas: Tensor, timesteps: Tensor) -> Any:
    """``denoiser.on_grid(sigmas, timesteps)`` where it has one (a Denoiser, guidance over one), else ``denoiser``."""
    bind = getattr(denoiser, "on_grid", None)
    return bind(sigmas, timesteps) if callable(bind) else denoiser


def as_denoiser(model: Any, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> DenoiserLike:
    """``model`` as a denoiser over σ.

    A :class:`Denoiser` (or guidance over one) is returned as is: it knows its schedule and
    prediction type. Guidance still wrapping a bare network is bound to ``schedule`` and
    ``prediction_type`` (its ``bind``); a bare network ``net(x_t, t)`` is wrapped in a Denoiser.
    """
    prediction_type = normalize_prediction_type(prediction_type)
    if isinstance(model, Denoiser):
        return model
    bind = getattr(model, "bind", None)
    return bind(schedule, prediction_type) if callable(bind) else Denoiser(model, schedule, prediction_type)


def _sigma64(sigma: Sigma) -> Tensor:
    return torch.as_tensor(sigma, dtype=torch.float64)
