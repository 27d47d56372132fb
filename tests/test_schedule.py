"""Schedules and the forward process against diffusers and closed-form Gaussian algebra."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_zero_snr

from ldm.diffusion import Denoiser, NoiseSchedule, make_betas
from ldm.diffusion.schedule import prediction_from, rescale_zero_terminal_snr


@pytest.mark.parametrize(
    ("ours", "theirs", "tol"),
    [
        (("linear", 1e-4, 0.02), ("linear", 1e-4, 0.02), 1e-8),
        (("scaled_linear", 0.00085, 0.012), ("scaled_linear", 0.00085, 0.012), 1e-8),
        (("cosine", None, None), ("squaredcos_cap_v2", 0.0001, 0.02), 1e-6),
    ],
)
def test_betas_match_diffusers(ours, theirs, tol) -> None:
    kind, start, end = theirs
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, beta_start=start, beta_end=end).betas
    betas = make_betas(ours[0], 1000, ours[1], ours[2])
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    torch.testing.assert_close(betas.float(), reference, rtol=0, atol=tol)


def test_default_beta_ranges() -> None:
    assert make_betas("linear")[[0, -1]].tolist() == pytest.approx([1e-4, 0.02])
    assert make_betas("scaled_linear")[[0, -1]].tolist() == pytest.approx([0.00085, 0.012])
    assert make_betas("cosine").max().item() <= 0.999


def test_zero_terminal_snr() -> None:
    betas = make_betas("scaled_linear")
    rescaled = rescale_zero_terminal_snr(betas)
    schedule = NoiseSchedule(rescaled)
    assert schedule.alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert schedule.alpha_bar[0].item() == pytest.approx(NoiseSchedule(betas).alpha_bar[0].item(), rel=1e-10)
    torch.testing.assert_close(rescaled, diffusers_zero_snr(betas.clone()), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(schedule.sigmas).all()


def test_q_sample_equals_repeated_single_steps() -> None:
    """√ᾱ_t x0 + √(1-ᾱ_t) ε has the law of t applications of q(x_s | x_{s-1}) = N(√(1-β_s) x, β_s)."""
    schedule = NoiseSchedule.create("linear", 200)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    t = 120
    x = x0.clone()
    for beta in schedule.betas[: t + 1]:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    closed = schedule.q_sample(x0, torch.full((x0.numel(),), t), noise)
    ab = schedule.alpha_bar[t].item()
    for draws in (x, closed):
        assert draws.mean().item() == pytest.approx(0.7 * ab**0.5, abs=5e-3)
        assert draws.var().item() == pytest.approx(1 - ab, abs=5e-3)


def test_posterior_is_bayes_rule() -> None:
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): precision-weighted Gaussian product."""
    schedule = NoiseSchedule.create("cosine", 1000)
    t = torch.tensor([1, 10, 500, 999])
    x0 = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    x_t = torch.tensor([0.1, 0.4, -0.7, 1.3], dtype=torch.float64)
    mean, var = schedule.posterior(x0, x_t, t)
    beta, ab_prev = schedule.betas[t], schedule.alpha_bar[t - 1]
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    expected_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - beta).sqrt() * x_t / beta) / precision
    torch.testing.assert_close(var, 1 / precision)
    torch.testing.assert_close(mean, expected_mean)


def test_posterior_at_t0_is_x0() -> None:
    schedule = NoiseSchedule.create()
    mean, var = schedule.posterior(torch.tensor([0.25]), torch.tensor([0.9]), torch.tensor([0]))
    assert mean.item() == pytest.approx(0.25) and var.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0", "v_prediction", "sample"])
def test_denoiser_inverts_the_training_target(kind: str) -> None:
    """The Denoiser reads the training target of (x0, ε) at x = x0 + σ ε back as (x0, ε), σ per sample."""
    schedule = NoiseSchedule.create()
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, 3, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([10.0, 999.0, 500.0, 0.0, 640.5])
    alpha_bar, sigma = schedule.alpha_bar_at(t), schedule.sigma_at(t)
    target = prediction_from(x0, eps, alpha_bar, kind)
    seen = {}

    def net(x_t: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        seen.update(x_t=x_t, t=t_in)
        return target

    x = x0 + sigma.reshape(-1, 1, 1) * eps
    x0_hat, eps_hat = Denoiser(net, schedule, kind).denoise(x, sigma)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    ab = alpha_bar.reshape(-1, 1, 1)
    torch.testing.assert_close(seen["x_t"], ab.sqrt() * x0 + (1 - ab).sqrt() * eps)  # the VP sample, eq. 4
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == t.tolist()


def test_denoiser_timestep_inverts_sigma_at() -> None:
    """t(σ(t)) = t to float32 precision: the network sees the exact timesteps the samplers lay out."""
    schedules = (NoiseSchedule.create(), NoiseSchedule.create("cosine"), NoiseSchedule.create(zero_terminal_snr=True))
    for schedule in schedules:
        denoiser = Denoiser(lambda x, t: x, schedule)
        t = torch.cat([torch.arange(1000.0), torch.linspace(0, 999, 37), torch.tensor([0.25, 998.75])])
        back = denoiser.timestep(schedule.sigma_at(t))
        torch.testing.assert_close(back.float(), t, rtol=0, atol=0)
        assert denoiser.timestep(float(schedule.sigmas[999])).item() == 999.0


def test_v_target_definition() -> None:
    """v = α_t ε - σ_t x0 with α_t = √ᾱ, σ_t = √(1-ᾱ) (Salimans & Ho 2022, §4)."""
    x0, eps, ab = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor(0.36)
    assert prediction_from(x0, eps, ab, "v").item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)


def test_sigma_interpolation_and_snr() -> None:
    schedule = NoiseSchedule.create()
    t = torch.tensor([0.0, 0.5, 41.625, 998.25, 999.0])
    expected = np.interp(t.numpy(), np.arange(1000), schedule.sigmas.numpy())
    np.testing.assert_allclose(schedule.sigma_at(t).numpy(), expected, rtol=1e-12)
    whole = torch.arange(1000)
    torch.testing.assert_close(schedule.alpha_bar_at(whole), schedule.alpha_bar)
    torch.testing.assert_close(schedule.snr(whole), schedule.alpha_bar / (1 - schedule.alpha_bar))
