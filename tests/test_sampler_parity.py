"""Our samplers against diffusers' schedulers on the SD v1.5 scheduler config.

The same deterministic model function and initial noise go through both; diffusers' loop is
the one its pipelines run (init_noise_sigma, scale_model_input, step)."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ldm.diffusion import SAMPLERS, Denoiser, NoiseSchedule, initial_state, make_timesteps, sample
from ldm.diffusion.samplers import DEFAULT_SPACING, GRID, sampler_sigmas

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}
PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, deterministic stand-in for a network: depends on x, on t, and mixes pixels."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * torch.tanh(0.6 * x + torch.sin(t / 97.0)) + 0.15 * x.roll(1, dims=-1) - 0.05 * torch.cos(t / 300.0)


def run_diffusers(
    name: str, steps: int, noise: torch.Tensor, prediction: str, seed: int, spacing: str | None = None
) -> torch.Tensor:
    spacing_cfg = {"timestep_spacing": spacing} if spacing else {}
    scheduler = SCHEDULERS[name].from_config({**SD15, "prediction_type": PREDICTION[prediction], **spacing_cfg})
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def run_ours(
    name: str, steps: int, noise: torch.Tensor, prediction: str, seed: int, spacing: str | None = None
) -> torch.Tensor:
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    generator = torch.Generator().manual_seed(seed)
    return sample(name, model_fn, noise, schedule, steps, prediction_type=prediction, steps_offset=1,
                  timestep_spacing=spacing, generator=generator)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.std()).item()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "ddpm", "euler_a"])
def test_final_sample_matches_diffusers(name: str, steps: int, prediction: str) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    reference = run_diffusers(name, steps, noise, prediction, seed=7)
    ours = run_ours(name, steps, noise, prediction, seed=7)
    assert torch.isfinite(reference).all()
    assert relative_error(ours, reference) <= 1e-5


# diffusers' DDIM steps from t to t - ⌊T/N⌋ whatever the spacing, so on a linspace grid it leaves
# the grid; ours steps to the next grid timestep (the same thing on leading and trailing grids).
SPACING_CASES = [
    (n, s) for n in SCHEDULERS for s in ("leading", "linspace", "trailing") if (n, s) != ("ddim", "linspace")
]


@pytest.mark.parametrize(("name", "spacing"), SPACING_CASES)
def test_every_spacing_matches_diffusers(name: str, spacing: str) -> None:
    """A diffusers scheduler config imposes one spacing on every scheduler made from it."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for prediction in ("epsilon", "v"):
        reference = run_diffusers(name, 20, noise, prediction, seed=5, spacing=spacing)
        assert relative_error(run_ours(name, 20, noise, prediction, seed=5, spacing=spacing), reference) <= 1e-5


@pytest.mark.parametrize("spacing", [None, "leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "ddpm", "euler_a"])
@pytest.mark.parametrize("steps", [1, 10, 25, 50, 999])
def test_timesteps_match_diffusers(name: str, steps: int, spacing: str | None) -> None:
    scheduler = SCHEDULERS[name].from_config({**SD15, **({"timestep_spacing": spacing} if spacing else {})})
    scheduler.set_timesteps(steps)
    spacing = spacing or DEFAULT_SPACING[name]
    if scheduler.timesteps.max() > 999:  # diffusers' DPM-Solver "leading" grid at 999 steps reaches t=1000
        with pytest.raises(ValueError, match="steps_offset=1 with num_steps=999 passes the last timestep 999"):
            make_timesteps(steps, 1000, spacing, steps_offset=1, **GRID.get(name, {}))
        return
    ours = make_timesteps(steps, 1000, spacing, steps_offset=1, **GRID.get(name, {}))
    torch.testing.assert_close(ours, scheduler.timesteps.float(), rtol=0, atol=0)


def test_stochastic_samplers_use_the_noise() -> None:
    """Different per-step noise must give different DDPM / Euler-ancestral samples."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("ddpm", "euler_a"):
        a = run_ours(name, 10, noise, "epsilon", seed=1)
        b = run_ours(name, 10, noise, "epsilon", seed=2)
        assert (a - b).abs().max() > 1e-2


def test_ddim_on_a_linspace_grid_visits_the_grid() -> None:
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    seen: list[float] = []
    sample("ddim", model_fn, torch.zeros(1, 4, 8, 8), schedule, 7, timestep_spacing="linspace",
           callback=lambda i, t, x, x0: seen.append(float(t)))
    assert seen == make_timesteps(7, 1000, "linspace").tolist() == [999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_with_eta_matches_diffusers(eta: float, prediction: str) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = DDIMScheduler.from_config({**SD15, "prediction_type": PREDICTION[prediction]})
    scheduler.set_timesteps(20)
    generator, reference = torch.Generator().manual_seed(9), noise.clone()
    for t in scheduler.timesteps:
        out = model_fn(reference, t.float().expand(2))
        reference = scheduler.step(out, t, reference, eta=eta, generator=generator).prev_sample
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    ours = sample("ddim", model_fn, noise, schedule, 20, prediction_type=prediction, steps_offset=1, eta=eta,
                  generator=torch.Generator().manual_seed(9))
    assert relative_error(ours, reference) <= 1e-5


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sample_is_the_sampler_over_sigma(name: str) -> None:
    """sample() = the sampler function on a Denoiser over the σ grid, between VP and VE forms."""
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps = make_timesteps(12, 1000, DEFAULT_SPACING[name], 1, **GRID.get(name, {}))
    sigmas = sampler_sigmas(name, schedule, timesteps)
    x = initial_state(name, noise, schedule, timesteps[0].item()) * math.sqrt(sigmas[0].item() ** 2 + 1)
    direct = SAMPLERS[name](Denoiser(model_fn, schedule, "v"), x, sigmas, generator=torch.Generator().manual_seed(4))
    via = sample(name, model_fn, noise, schedule, 12, prediction_type="v", steps_offset=1,
                 generator=torch.Generator().manual_seed(4))
    assert torch.equal(direct / math.sqrt(sigmas[-1].item() ** 2 + 1), via)
