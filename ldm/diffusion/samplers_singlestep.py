"""Single-step samplers: each step starts afresh from the current state (Heun and DPM++ SDE call the network
twice per step; LCM once, re-noising in between).

Plain functions of a denoiser over a descending σ grid in the VE form, as in ldm.diffusion.samplers (which
lists them in SAMPLERS); each matches the diffusers scheduler named in its docstring.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.steps import DenoiserFn, StepCallback, ancestral_step, randn_like, sigma_steps


def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1): an Euler step to
    σ_next, then the mean of dx/dσ at both ends; the last step (to σ = 0) is Euler's (diffusers'
    HeunDiscreteScheduler)."""
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        d = (x - x0) / sigma  # dx/dσ (Karras et al. 2022, eq. 4)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


class BrownianNoise:
    """Unit noise for a step σ → σ' from one Brownian motion W on [σ_min, σ_max]: (W(σ) - W(σ'))/√(σ - σ').

    Steps that split an interval draw consistent noise (a Brownian bridge), so the noise does not depend on
    how the grid is refined. W is torchsde's BrownianInterval (a Brownian tree; Kidger et al. 2021) seeded
    with ``seed`` (a list: one tree per row of x), set up as k-diffusion's and diffusers' BrownianTreeNoiseSampler,
    so a seed gives their noise.
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seed: int | list[int]) -> None:
        import torchsde  # only this sampler needs it

        self.batched = isinstance(seed, list)
        size = x.shape[1:] if self.batched else x.shape
        self.trees = [torchsde.BrownianInterval(t0=sigma_min, t1=sigma_max, size=size, dtype=x.dtype, device=x.device,
                                                entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                      for s in (seed if self.batched else [seed])]

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        w = torch.stack([tree(sigma_next, sigma) for tree in self.trees])
        return (w if self.batched else w[0]).neg() / math.sqrt(sigma - sigma_next)


def draw_seed(generator: torch.Generator | list[torch.Generator] | None) -> int | list[int]:
    """A 63-bit seed from ``generator`` (one per generator of a list; from torch's global generator without one,
    as diffusers does)."""
    if isinstance(generator, list):
        return [draw_seed(g) for g in generator]
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device).item())


def sde_half_step(x: Tensor, x0: Tensor, sigma: float, sigma_to: float, noise: BrownianNoise) -> Tensor:
    """An ancestral DPM-Solver++(1) step from σ to ``sigma_to`` with x̂_0 = ``x0``: the exponential-integrator step
    x0 + (σ_down/σ)(x - x0) to σ_down, then Brownian noise of std σ_up (``ancestral_step`` at η = 1)."""
    sigma_up, sigma_down = ancestral_step(sigma, sigma_to)
    return x0 + (sigma_down / sigma) * (x - x0) + noise(sigma, sigma_to) * sigma_up


def log_midpoint(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """(σ, σ_mid, σ_next) with σ_mid halfway in λ = -log σ, each as e^{-λ} in float32: the points where k-diffusion
    and diffusers (on float32 σ) query the Brownian tree, which resolves queries to 1e-6, so its noise depends
    on these exact floats."""
    lam = torch.tensor([sigma, sigma_next], dtype=torch.float32).log().neg()
    lam_mid = lam[0] + (lam[1] - lam[0]) * 0.5
    return lam[0].neg().exp().item(), lam_mid.neg().exp().item(), lam[1].neg().exp().item()


def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_seed: int | list[int] | None = None,
    noise_sigma_max: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2S) with ancestral noise (Lu et al. 2022b, Alg. 1 at r = 1/2, stochastic as k-diffusion's
    sample_dpmpp_sde; diffusers' DPMSolverSDEScheduler): a noisy half step to the midpoint σ_mid = √(σ σ_next) in
    λ = -log σ, a network call there, and the full noisy step from x with that x̂_0; the last step (to σ = 0) is
    Euler's.

    The noise is Brownian (``BrownianNoise``) over the grid's σ range (up to ``noise_sigma_max`` where given:
    diffusers' spans its whole grid, also when image-to-image starts lower), seeded with ``noise_seed``
    (diffusers' ``noise_sampler_seed``; a list: one per row), or with a seed drawn from ``generator`` (one per
    generator of a list). Steps are taken in float32 (``log_midpoint``), so on diffusers' float32 σ
    (ldm.diffusion.samplers.sde_grid) the tree is queried where its scheduler queries it.
    """
    seed = draw_seed(generator) if noise_seed is None else noise_seed
    positive = sigmas[sigmas > 0].float()
    top = positive.max().item() if noise_sigma_max is None else noise_sigma_max
    noise = BrownianNoise(x, positive.min().item(), top, seed)
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            sigma_from, sigma_mid, sigma_to = log_midpoint(sigma, sigma_next)
            x_mid = sde_half_step(x, x0, sigma_from, sigma_mid, noise)
            x = sde_half_step(x, denoiser(x_mid, sigma_mid), sigma_from, sigma_to, noise)
        if callback is not None:
            callback(i, sigma, x, x0)
    return x


def sample_lcm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, LCM): jump to the denoiser's
    x̂_0, then re-noise it to σ_next with fresh noise; the last step returns x̂_0. The denoiser is the consistency
    function (``sample`` wraps it in LCM's boundary condition, ldm.diffusion.denoiser.ConsistencyBoundary)."""
    for i, (sigma, sigma_next) in sigma_steps(sigmas, progress):
        x0 = denoiser(x, sigma)
        x = x0 + sigma_next * randn_like(x0, generator) if sigma_next > 0 else x0
        if callback is not None:
            callback(i, sigma, x, x0)
    return x
