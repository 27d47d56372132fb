"""Multistep samplers: each step reuses the x̂_0 (or dx/dσ) of earlier steps, one network call per step.

Plain functions of a denoiser over a descending σ grid in the VE form, as in ldm.diffusion.samplers (which
lists them in SAMPLERS); each matches the diffusers scheduler named in its docstring.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.steps import DenoiserFn, StepCallback, log_step, randn_like, sigma_steps
from ldm.validation import check_int


def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form (Lu et al. 2022b, DPM-Solver++; diffusers' "sde-dpmsolver++").

    With h = λ_next - λ (λ = -log σ) each step is x ← e^{-2h} x + (1 - e^{-2h}) D + σ_next √(1 - e^{-2h}) z,
    D as in ``sample_dpmpp_2m`` (x̂_0 on the first step, x̂_0 + (x̂_0 - x̂_0^prev)/(2r) after it); the last
    step (to σ = 0) returns x̂_0.
    """
    x0_prev, h_prev = None, 0.0
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = log_step(sigma, sigma_next)
            d = x0 if x0_prev is None else x0 + (x0 - x0_prev) / (2 * h_prev / h)
            decay = math.exp(-2 * h)  # (σ_next/σ)·e^{-h}
            x = decay * x + (1 - decay) * d + sigma_next * math.sqrt(-math.expm1(-2 * h)) * randn_like(x, generator)
            h_prev = h
        x0_prev = x0
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """∫ ℓ_j(σ) dσ from σ_i to σ_{i+1}, ℓ_j the Lagrange polynomial through σ_i, …, σ_{i-order+1} that is 1 at
    σ_{i-j} (integrated exactly; diffusers and k-diffusion use scipy's quad)."""
    nodes = [sigmas[i - k] for k in range(order)]
    others = [s for k, s in enumerate(nodes) if k != j]
    basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    basis = basis / math.prod(nodes[j] - s for s in others)
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def sample_lms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in σ: dx/dσ = (x - x̂_0)/σ (Karras et al.
    2022, eq. 4) extrapolated by the Lagrange polynomial through the last ``order`` steps (k-diffusion; diffusers'
    LMSDiscreteScheduler, order 4, lower orders while the history fills)."""
    check_int("order", order, 1, 4)
    grid, derivatives = sigmas.tolist(), []
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        derivatives = [(x - x0) / sigma] + derivatives[: order - 1]  # newest first
        current = len(derivatives)
        x = x + sum(lms_coefficient(grid, i, j, current) * d for j, d in enumerate(derivatives))
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def unipc_rhs(h: float, order: int) -> list[float]:
    """b_k = k!·(-h)·φ_{k+1}(-h) / B(-h), k = 1..p: the right-hand side of UniPC's order conditions on x̂_0
    (Zhao et al. 2023, §3), with φ_1(z) = (e^z - 1)/z, φ_{k+1}(z) = (φ_k(z) - 1/k!)/z and B(h) = e^h - 1
    ('bh2'), by diffusers' recursion."""
    hh = -h  # data prediction integrates e^{-h}
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, rhs = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        rhs.append(h_phi_k * factorial / h_phi_1)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rhs


def unipc_step(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, Tensor]],
    x0_next: Tensor | None = None,
) -> Tensor:
    """One UniP predictor step (``x0_next`` None) or UniC corrector step of order p = len(history), from x at σ
    to σ_next (Zhao et al. 2023, §3, in the VE form): x_next = (σ_next/σ) x - B(-h) (m_0 + Σ_k ρ_k D_k) with
    B(-h) = e^{-h} - 1, D_k = (m_k - m_0)/r_k and r_k = (λ_k - λ)/h over the earlier steps k; the corrector adds
    the term of x̂_0 at σ_next (``x0_next``) minus m_0, with ρ from all p order conditions. ``history`` holds
    (λ, x̂_0) of the last p steps, newest last (m_0)."""
    order = len(history)
    lambda_0, m0 = history[-1]
    h = log_step(sigma, sigma_next)
    older = history[-2::-1]  # newest first
    ratios = [(lam - lambda_0) / h for lam, _ in older]
    diffs = [(m - m0) / r for (_, m), r in zip(older, ratios)]
    rhs = torch.tensor(unipc_rhs(h, order), dtype=torch.float64)
    powers = torch.tensor([[r**k for r in ratios + [1.0]] for k in range(order)], dtype=torch.float64)  # R_p
    if x0_next is None:  # predictor: ρ from the first p-1 conditions (1/2 at order 2)
        rhos = [0.5] if order == 2 else torch.linalg.solve(powers[:-1, :-1], rhs[:-1]).tolist()
    else:  # corrector: ρ from all p conditions, the last for the new x̂_0 (1/2 at order 1)
        rhos = [0.5] if order == 1 else torch.linalg.solve(powers, rhs).tolist()
        diffs = diffs + [x0_next - m0]
    residual = sum((rho * d for rho, d in zip(rhos, diffs)), torch.zeros_like(m0))
    return (sigma_next / sigma) * x - math.expm1(-h) * (m0 + residual)


def sample_unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """UniPC (Zhao et al. 2023): a UniP-p predictor step after each network call, and a UniC corrector that
    re-does the previous step with the new x̂_0 before it (no extra call). On x̂_0 ('predict_x0') with
    B(h) = e^h - 1 ('bh2'); the order warms up from 1 and drops to 1 for the last step (diffusers'
    UniPCMultistepScheduler defaults: solver_order 2, lower_order_final)."""
    check_int("order", order, 1, 3)
    n, history = len(sigmas) - 1, []
    previous = None  # (x, σ, order) of the last predictor step
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        if previous is not None:
            x_prev, sigma_prev, p = previous
            x = unipc_step(x_prev, sigma_prev, sigma, history[-p:], x0)
        history = (history + [(-math.log(sigma), x0)])[-order:]
        p = min(order, n - i, i + 1)
        previous = (x, sigma, p)
        x = unipc_step(x, sigma, sigma_next, history[-p:])
        if callback is not None:
            callback(i, sigma, x, x0)
    return x
