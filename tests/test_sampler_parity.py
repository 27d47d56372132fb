"""Our samplers against diffusers' schedulers on the SD v1.5 scheduler config.

The same deterministic model function and initial noise go through both; diffusers' loop is
the one its pipelines run (init_noise_sigma, scale_model_input, step)."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ldm.diffusion import NoiseSchedule, make_timesteps, sample
from ldm.diffusion.samplers import DEFAULT_SPACING

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


def run_diffusers(name: str, steps: int, noise: torch.Tensor, prediction: str, seed: int) -> torch.Tensor:
    scheduler = SCHEDULERS[name].from_config({**SD15, "prediction_type": PREDICTION[prediction]})
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def run_ours(name: str, steps: int, noise: torch.Tensor, prediction: str, seed: int) -> torch.Tensor:
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    generator = torch.Generator().manual_seed(seed)
    return sample(name, model_fn, noise, schedule, steps, prediction_type=prediction, steps_offset=1, generator=generator)


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


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "ddpm", "euler_a"])
@pytest.mark.parametrize("steps", [1, 10, 25, 50, 999])
def test_default_timesteps_match_diffusers(name: str, steps: int) -> None:
    scheduler = SCHEDULERS[name].from_config(SD15)
    scheduler.set_timesteps(steps)
    ours = make_timesteps(steps, 1000, DEFAULT_SPACING[name], steps_offset=1)
    torch.testing.assert_close(ours, scheduler.timesteps.float(), rtol=0, atol=0)


def test_stochastic_samplers_use_the_noise() -> None:
    """Different per-step noise must give different DDPM / Euler-ancestral samples."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("ddpm", "euler_a"):
        a = run_ours(name, 10, noise, "epsilon", seed=1)
        b = run_ours(name, 10, noise, "epsilon", seed=2)
        assert (a - b).abs().max() > 1e-2
