"""The denoiser: a network trained in the VP convention, asked for x̂_0 and ε̂ at a noise level σ.

Samplers work in the variance-exploding (VE) form x = x_0 + σ ε (Karras et al. 2022, §2), as
k-diffusion does. A network trained on x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (Ho et al. 2020, eq. 4) sees
the same sample as x_t = x / √(σ²+1) at the timestep t with σ(t) = σ, since σ_t² = (1-ᾱ_t)/ᾱ_t.
This module is the one place that turns the network's ε / v / x_0 output into x̂_0 and ε̂.
"""

from __future__ import annotations

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

    def timestep(self, sigma: Sigma) -> Tensor:
        """t(σ) (float64): the inverse of ``schedule.sigma_at`` (linear in σ between training steps)."""
        sigmas = self.schedule.sigmas  # (T,), increasing in t
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=sigmas.device)
        low = (torch.searchsorted(sigmas, sigma.reshape(-1), right=True) - 1).clamp(0, sigmas.numel() - 2)
        w = (sigma.reshape(-1) - sigmas[low]) / (sigmas[low + 1] - sigmas[low])
        return (low + w).clamp(0, sigmas.numel() - 1).reshape(sigma.shape)

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
