"""What every sampler shares: the loop over a descending σ grid, seeded noise and the ancestral split.

Samplers work in the variance-exploding form x = x_0 + σ ε (Karras et al. 2022); the DPM-Solver family
steps in λ = -log σ, the log signal-to-noise ratio (half of it) of the VP process (Lu et al. 2022, §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

# callback(step_index, σ, x after the step (VE), x̂_0), as the samplers report steps
StepCallback = Callable[[int, float, Tensor, Tensor], None]
DenoiserFn = Callable[[Tensor, float], Tensor]


def randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Unit Gaussian noise shaped like ``x``, drawn on the generator's device (CPU seeds everywhere); from a list
    of generators, one per row of ``x`` (as diffusers' randn_tensor)."""
    if isinstance(generator, list):
        return torch.cat([randn_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def sigma_steps(sigmas: Tensor, progress: bool) -> Iterable[tuple[int, tuple[float, float]]]:
    """(i, (σ_i, σ_{i+1})) as Python floats, behind a progress bar."""
    s = sigmas.tolist()
    return enumerate(tqdm(list(zip(s[:-1], s[1:])), disable=not progress, leave=False))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_up, σ_down) with σ_down² + σ_up² = σ_next²: a step to σ_next split into a deterministic step to
    σ_down and fresh noise of std σ_up; η = 1 is the DDPM posterior's std (Song et al. 2021, eq. 16), as k-diffusion."""
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2), 0.0) / sigma**2))
    return sigma_up, math.sqrt(sigma_next**2 - sigma_up**2)


def log_step(sigma: float, sigma_next: float) -> float:
    """h = λ_next - λ with λ = -log σ (Lu et al. 2022, eq. 3): inf for the step to σ = 0."""
    return math.log(sigma) - math.log(sigma_next) if sigma_next > 0 else math.inf
