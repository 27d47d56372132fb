"""Which training timesteps a sampler visits, which noise levels in place of them, and where image-to-image starts.

The spacings follow Lin et al. 2023, Table 2 ("Common diffusion noise schedules and sample
steps are flawed"), with the conventions of the diffusers schedulers so that the same names
give the same steps. The σ spacings (Karras, exponential) replace a grid's noise levels, as
diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` do.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ldm.validation import check_choice, check_float, check_int

# leading:  t = k·⌊T/N⌋ + offset (SD's DDIM/PNDM default);  trailing: t = round(T - k·T/N) - 1;
# linspace: N evenly spaced t in [0, T-1] (Euler's and DPM-Solver's default).
SPACINGS = ("leading", "linspace", "trailing")
# karras: σ^{1/ρ} evenly spaced, ρ = 7 (Karras et al. 2022, eq. 5);  exponential: log σ evenly spaced.
SIGMA_SPACINGS = ("karras", "exponential")


def make_timesteps(
    num_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    continuous: bool = False,
    exclude_final: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Descending timesteps (``dtype``, float32 by default; shape (num_steps,)) for a sampler of ``num_steps`` steps.

    ``continuous`` keeps fractional linspace timesteps (the Euler samplers interpolate σ between
    training steps); otherwise they are rounded. ``exclude_final`` lays out N+1 points of the
    leading/linspace grid and drops the smallest, for solvers whose last step goes to σ = 0
    without evaluating the network there (DPM-Solver, as diffusers lays it out). float64 keeps fractional
    timesteps as diffusers holds them (numpy float64) where σ is interpolated at them to its float32 rounding.
    """
    check_int("num_train_timesteps", num_train_timesteps, 2)
    check_int("num_steps", num_steps, 1, num_train_timesteps)
    check_choice("timestep_spacing", spacing, SPACINGS)
    check_int("steps_offset", steps_offset, 0, num_train_timesteps - 1)
    n, T = num_steps, num_train_timesteps
    points = n + 1 if exclude_final else n
    if spacing == "leading":
        steps = (np.arange(points) * (T // points)).round()[::-1][:n] + steps_offset
        if steps[0] > T - 1:
            raise ValueError(f"steps_offset={steps_offset} with num_steps={n} passes the last timestep {T - 1}")
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        steps = np.linspace(0, T - 1, points)[::-1][:n]
        steps = steps if continuous else steps.round()
    return torch.from_numpy(steps.astype(np.float64).copy()).to(dtype)


def spaced_sigmas(kind: str, sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """``num_steps`` descending noise levels from ``sigma_max`` to ``sigma_min`` (float64) in a σ spacing of
    SIGMA_SPACINGS: 'karras' (Karras et al. 2022, eq. 5) or 'exponential' (k-diffusion's get_sigmas_exponential)."""
    check_choice("sigma_spacing", kind, SIGMA_SPACINGS)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if kind == "karras":
        low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (high + ramp * (low - high)) ** rho
    return torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> Tensor:
    """Descending timesteps (float32) of an LCM sampler: ``num_steps`` of the ``original_steps`` timesteps
    k·⌊T/N'⌋ - 1 (k = 1..N') the model was distilled on, skipping evenly from the last (Luo et al. 2023;
    diffusers' LCMScheduler, ``original_inference_steps``)."""
    check_int("original_inference_steps", original_steps, 1, num_train_timesteps)
    check_int("num_steps", num_steps, 1, original_steps)
    origin = (np.arange(1, original_steps + 1) * (num_train_timesteps // original_steps) - 1)[::-1]
    index = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[index].astype(np.float32).copy())


def strength_timesteps(timesteps: Tensor, strength: float) -> Tensor:
    """The tail of ``timesteps`` that image-to-image runs at ``strength`` ∈ (0, 1].

    strength 1 keeps every step (start from pure noise); smaller strengths skip the noisiest
    ``(1 - strength)`` share, as SDEdit (Meng et al. 2022) and diffusers do.
    """
    check_float("strength", strength, 0.0, 1.0, low_open=True)
    n = len(timesteps)
    kept = min(int(n * strength), n)
    if kept == 0:
        raise ValueError(
            f"strength={strength!r} with {n} steps leaves no denoising step; "
            f"allowed: strength >= {1 / n:g} for {n} steps"
        )
    return timesteps[n - kept :]
