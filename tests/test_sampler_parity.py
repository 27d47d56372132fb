"""Our samplers against diffusers' schedulers on the SD v1.5 scheduler config.

The same deterministic model function and initial noise go through both; diffusers' loop is
the one its pipelines run (init_noise_sigma, scale_model_input, step)."""

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ldm.diffusion import SAMPLERS, Denoiser, NoiseSchedule, initial_state, make_timesteps, sample
from ldm.diffusion.denoiser import ConsistencyBoundary
from ldm.diffusion.samplers import (
    A1111_NAMES,
    DEFAULT_SPACING,
    GRID,
    LCM_TIMESTEP_SCALING,
    SIGMA_SPACING_SAMPLERS,
    a1111_name,
    grid_denoiser,
    resolve_sampler,
    sampler_grid,
    sde_midpoints,
    start_state,
)

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


@pytest.mark.filterwarnings("ignore:Should have")  # DPM++ SDE: queries at σ_min below the tree's start, as diffusers'
@pytest.mark.parametrize(("name", "sigma_spacing"),
                         [(n, None) for n in SAMPLERS] + [(n, "karras") for n in SIGMA_SPACING_SAMPLERS])
def test_sample_is_the_sampler_over_sigma(name: str, sigma_spacing: str | None) -> None:
    """sample() = the sampler function on a Denoiser bound to the grid, between VP and VE forms."""
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    timesteps, sigmas = sampler_grid(name, schedule, 12, None, 1, sigma_spacing)
    x = start_state(name, noise, sigmas[0].item())
    denoiser = grid_denoiser(name, Denoiser(model_fn, schedule, "v"), sigmas, timesteps, schedule)
    direct = SAMPLERS[name](denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    via = sample(name, model_fn, noise, schedule, 12, prediction_type="v", steps_offset=1,
                 sigma_spacing=sigma_spacing, generator=torch.Generator().manual_seed(4))
    assert torch.equal(direct / math.sqrt(sigmas[-1].item() ** 2 + 1), via)


def test_initial_state_is_the_vp_form_of_the_start_state() -> None:
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    noise, x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = schedule.sigma_at(999.0).item()
    torch.testing.assert_close(initial_state("ddim", noise, schedule, 999.0), noise)
    torch.testing.assert_close(initial_state("euler", noise, schedule, 999.0), noise * sigma / math.sqrt(sigma**2 + 1))
    t = torch.tensor([600.0, 600.0])
    torch.testing.assert_close(initial_state("heun", noise, schedule, 600.0, x0), schedule.q_sample(x0, t, noise))


# ---- the samplers added after the first five: UniPC, DPM++ 2M SDE, DPM++ SDE, Heun, LMS, LCM; σ spacings ----

NEW_SCHEDULERS = {
    "unipc": (UniPCMultistepScheduler, {}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
}
SPACING_FLAG = {None: {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
SD15_SCHEDULE = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)


def make_scheduler(name: str, prediction: str = "epsilon", sigma_spacing: str | None = None, **config):
    cls, extra = NEW_SCHEDULERS[name]
    return cls.from_config({**SD15, "prediction_type": PREDICTION[prediction], **extra,
                            **SPACING_FLAG[sigma_spacing], **config})


def run_scheduler(scheduler, steps: int | None, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """diffusers' pipeline loop; the generator goes to step() where it takes one (DPM++ SDE draws its seed from
    torch's global generator, seeded here with the same seed)."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x


def run_ours_spaced(name: str, steps: int, noise: torch.Tensor, prediction: str, seed: int,
                    sigma_spacing: str | None = None, **options) -> torch.Tensor:
    return sample(name, model_fn, noise, SD15_SCHEDULE, steps, prediction_type=prediction, steps_offset=1,
                  sigma_spacing=sigma_spacing, generator=torch.Generator().manual_seed(seed), **options)


EXACT_CASES = [(n, s) for n in ("unipc", "dpmpp_2m_sde", "heun", "lms") for s in (None, "karras")]
EXACT_CASES += [("lcm", None), ("euler", "karras"), ("dpmpp_2m", "karras")]
EXACT_CASES += [(n, "exponential") for n in ("euler", "heun", "lms")]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [20, 30])
@pytest.mark.parametrize(("name", "sigma_spacing"), EXACT_CASES)
def test_new_sampler_matches_diffusers(name: str, sigma_spacing: str | None, steps: int, prediction: str) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    reference = run_scheduler(make_scheduler(name, prediction, sigma_spacing), steps, noise, seed=7)
    ours = run_ours_spaced(name, steps, noise, prediction, 7, sigma_spacing)
    assert torch.isfinite(reference).all()
    assert relative_error(ours, reference) <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_dpm_family_exponential_matches_diffusers(name: str, prediction: str) -> None:
    """diffusers casts this family's exponential t(σ) to int64, truncating: ours too. Its t(σ_max) comes out
    998.99998 from float32 log σ, so diffusers starts at t = 998 where ours (float64) has exactly 999; with that
    one timestep set to 999 the two agree."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = make_scheduler(name, prediction, "exponential")
    scheduler.set_timesteps(25)
    assert scheduler.timesteps[0] == 998 and scheduler.timesteps[-1] == 0
    timesteps, _ = sampler_grid(name, SD15_SCHEDULE, 25, sigma_spacing="exponential")
    torch.testing.assert_close(timesteps[1:], scheduler.timesteps[1:].float(), rtol=0, atol=0)
    scheduler.timesteps[0] = 999
    reference = run_scheduler(scheduler, None, noise, seed=3)
    assert relative_error(run_ours_spaced(name, 25, noise, prediction, 3, "exponential"), reference) <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("order", [1, 3])
def test_unipc_orders_match_diffusers(order: int, prediction: str) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    reference = run_scheduler(make_scheduler("unipc", prediction, solver_order=order), 20, noise, seed=0)
    assert relative_error(run_ours_spaced("unipc", 20, noise, prediction, 0, order=order), reference) <= 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("sigma_spacing", [None, "karras"])
def test_euler_ancestral_on_karras_sigmas_matches_diffusers(sigma_spacing: str | None, prediction: str) -> None:
    """diffusers' EulerAncestral has no use_karras_sigmas: its step() runs on EulerDiscrete's Karras grid."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    grid = make_scheduler("euler", prediction, sigma_spacing)
    grid.set_timesteps(25)
    scheduler = EulerAncestralDiscreteScheduler.from_config({**SD15, "prediction_type": PREDICTION[prediction]})
    scheduler.set_timesteps(25)
    scheduler.sigmas, scheduler.timesteps = grid.sigmas, grid.timesteps
    reference = run_scheduler(scheduler, None, noise, seed=6)
    assert relative_error(run_ours_spaced("euler_a", 25, noise, prediction, 6, sigma_spacing), reference) <= 1e-4


def diffusers_grid(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, σ) of a scheduler's grid, one entry per step (Heun's and DPM++ SDE's repeats and midpoints
    dropped)."""
    timesteps = scheduler.timesteps
    if isinstance(scheduler, LCMScheduler):
        ab = scheduler.alphas_cumprod[timesteps].double()
        return timesteps.float(), torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])
    sigmas = scheduler.sigmas
    if isinstance(scheduler, (HeunDiscreteScheduler, DPMSolverSDEScheduler)):
        timesteps, sigmas = timesteps[::2], torch.cat([sigmas[:-1:2], sigmas[-1:]])
    return timesteps.float(), sigmas.double()


GRID_CASES = [(n, s, k) for n in ("unipc", "dpmpp_2m_sde", "dpmpp_sde", "heun", "lms", "euler", "dpmpp_2m")
              for s in (None, "leading", "trailing") for k in (None, "karras", "exponential")] + [("lcm", None, None)]


@pytest.mark.parametrize("steps", [1, 4, 10, 25, 50])
@pytest.mark.parametrize(("name", "spacing", "sigma_spacing"), GRID_CASES)
def test_grid_matches_diffusers(name: str, spacing: str | None, sigma_spacing: str | None, steps: int) -> None:
    """Our timesteps and σ against the scheduler's own: every spacing the scheduler config imposes, Karras and
    exponential σ where it has them. σ to float32 precision (diffusers' ᾱ is a float32 cumprod), and so the
    fractional t(σ) of Karras / exponential σ to 5e-3 (its log σ table is float32). DPM++ SDE's exactly: it lays
    out diffusers' float32 σ (sde_grid), and its midpoint timesteps to 2e-5 (sde_midpoints)."""
    config = {"timestep_spacing": spacing} if spacing else {}
    scheduler = make_scheduler(name, "epsilon", sigma_spacing, **config)
    scheduler.set_timesteps(steps)
    reference_t, reference_sigmas = diffusers_grid(scheduler)
    t, sigmas = sampler_grid(name, SD15_SCHEDULE, steps, spacing, 1, sigma_spacing)
    if sigma_spacing == "exponential" and name in ("unipc", "dpmpp_2m_sde", "dpmpp_2m"):  # see the test above
        t, reference_t = t[1:], reference_t[1:]
    atol = 0 if name in ("unipc", "dpmpp_2m_sde", "dpmpp_2m", "dpmpp_sde", "lcm") or sigma_spacing is None else 5e-3
    torch.testing.assert_close(t, reference_t, rtol=0, atol=atol)
    torch.testing.assert_close(sigmas, reference_sigmas, rtol=0 if name == "dpmpp_sde" else 2e-5, atol=0)
    if name == "dpmpp_sde":
        mid_sigmas, mid_t = sde_midpoints(SD15_SCHEDULE, sigmas)
        torch.testing.assert_close(mid_t, scheduler.timesteps[1::2], rtol=0, atol=2e-5)
        lam = sigmas[:-1].float().log().neg()  # step()'s σ_mid: e^{-λ_mid}, in float32 from its float32 σ
        torch.testing.assert_close(mid_sigmas, (lam[:-1] + (lam[1:] - lam[:-1]) * 0.5).neg().exp().double(),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_lcm_boundary_condition_matches_diffusers(prediction: str) -> None:
    """LCM's c_skip / c_out: at timestep_scaling 10 they are within 1e-5 of (0, 1) at LCM's timesteps, so they
    are checked at a scaling where they are not (the sampler is the same)."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for scaling in (LCM_TIMESTEP_SCALING, 0.004):
        reference = run_scheduler(make_scheduler("lcm", prediction, timestep_scaling=scaling), 6, noise, seed=9)
        timesteps, sigmas = sampler_grid("lcm", SD15_SCHEDULE, 6)
        bound = Denoiser(model_fn, SD15_SCHEDULE, prediction).on_grid(sigmas, timesteps)
        denoiser = ConsistencyBoundary(bound, scaling)
        x = start_state("lcm", noise, sigmas[0].item())
        ours = SAMPLERS["lcm"](denoiser, x, sigmas, generator=torch.Generator().manual_seed(9))
        assert relative_error(ours, reference) <= 1e-4
    without = SAMPLERS["lcm"](Denoiser(model_fn, SD15_SCHEDULE, prediction).on_grid(sigmas, timesteps), x, sigmas,
                              generator=torch.Generator().manual_seed(9))
    assert relative_error(without, reference) > 1e-2  # the scalings matter at 0.004


# DPM++ SDE's Brownian tree resolves its queries to 1e-6 (torchsde's tol), and its increments are only
# ½-Hölder in the query points: diffusers' σ, from a float32 ᾱ cumprod, differ from our float64 σ(t) by up to
# 1.3e-5 relative, which moved its samples by ~5e-3 of their scale. So this sampler's grid is diffusers' float32
# σ (sde_grid), and on the same σ the noise is the same.

def run_dpmpp_sde_on_our_grid(steps: int, noise: torch.Tensor, prediction: str, seed: int,
                              sigma_spacing: str | None, **config) -> torch.Tensor:
    """diffusers' DPMSolverSDEScheduler.step() with its σ grid (and so its Brownian tree) replaced by ours."""
    scheduler = make_scheduler("dpmpp_sde", prediction, **config)
    scheduler.set_timesteps(steps)
    timesteps, sigmas = sampler_grid("dpmpp_sde", SD15_SCHEDULE, steps, None, 1, sigma_spacing)
    log_sigmas = np.log(SD15_SCHEDULE.sigmas_float32().numpy())
    midpoints = scheduler._second_order_timesteps(sigmas[:-1].numpy(), log_sigmas)
    sigmas32 = sigmas.float()
    scheduler.sigmas = torch.cat([sigmas32[:1], sigmas32[1:-1].repeat_interleave(2), sigmas32[-1:]])
    scheduler.timesteps = torch.cat([timesteps[:1].double(), timesteps[1:].double().repeat_interleave(2)])
    scheduler.timesteps[1::2] = torch.from_numpy(midpoints)
    return run_scheduler(scheduler, None, noise, seed)


@pytest.mark.filterwarnings("ignore:Should have")  # queries at σ_min below the tree's rounded start, as in diffusers
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [20, 25, 30])
@pytest.mark.parametrize("sigma_spacing", [None, "karras", "exponential"])
def test_dpmpp_sde_matches_diffusers_on_the_same_sigmas(sigma_spacing: str | None, steps: int, prediction: str) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    reference = run_dpmpp_sde_on_our_grid(steps, noise, prediction, 7, sigma_spacing)
    assert relative_error(run_ours_spaced("dpmpp_sde", steps, noise, prediction, 7, sigma_spacing), reference) <= 1e-4
    # diffusers' noise_sampler_seed is our noise_seed; another seed is other noise
    reference = run_dpmpp_sde_on_our_grid(steps, noise, prediction, 0, sigma_spacing, noise_sampler_seed=1234)
    ours = run_ours_spaced("dpmpp_sde", steps, noise, prediction, 0, sigma_spacing, noise_seed=1234)
    assert relative_error(ours, reference) <= 1e-4
    assert relative_error(run_ours_spaced("dpmpp_sde", steps, noise, prediction, 0, sigma_spacing), reference) > 0.1


@pytest.mark.filterwarnings("ignore:Should have")
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [20, 25])
@pytest.mark.parametrize("sigma_spacing", [None, "karras", "exponential"])
def test_dpmpp_sde_matches_diffusers_end_to_end(sigma_spacing: str | None, steps: int, prediction: str) -> None:
    """Untouched diffusers, on its own float32 σ, which ours lays out too (sde_grid): the same Brownian path."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(25))
    reference = run_scheduler(make_scheduler("dpmpp_sde", prediction, sigma_spacing), steps, noise, seed=7)
    assert relative_error(run_ours_spaced("dpmpp_sde", steps, noise, prediction, 7, sigma_spacing), reference) <= 1e-5
    assert relative_error(run_ours_spaced("dpmpp_sde", steps, noise, prediction, 8, sigma_spacing), reference) > 0.1


@pytest.mark.filterwarnings("ignore:Should have")
@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_sde", "lcm"])
def test_a_list_of_generators_draws_each_row_alone(name: str) -> None:
    """As diffusers' randn_tensor: row i's noise comes from generator i, as if it were sampled alone."""
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(name, model_fn, x, SD15_SCHEDULE, 8, generator=generator if len(seeds) > 1 else generator[0])

    batch = run(noise, [3, 11, 7])
    for row, seed in enumerate((3, 11, 7)):
        assert torch.equal(batch[row : row + 1], run(noise[row : row + 1], [seed]))
    other = run(noise, [4, 11, 7])
    assert relative_error(other[:1], batch[:1]) > 1e-2 and torch.equal(other[1:], batch[1:])


def run_scheduler_from_image(scheduler, steps: int, x0: torch.Tensor, noise: torch.Tensor, strength: float,
                             seed: int) -> torch.Tensor:
    """diffusers' image-to-image loop (StableDiffusionImg2ImgPipeline: get_timesteps, add_noise); DPM++ SDE's seed
    from torch's global generator, as in run_scheduler."""
    scheduler.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    scheduler.set_begin_index(start * scheduler.order)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    for t in timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x


# Not LMS: diffusers' LMS takes its order from the absolute step index, so after set_begin_index its first step
# weighs the one derivative it has with a 4th-order coefficient; ours (as k-diffusion) starts at order 1.
@pytest.mark.filterwarnings("ignore:Should have")
@pytest.mark.parametrize(("name", "sigma_spacing"), [("euler", "karras"), ("dpmpp_2m", "karras"), ("heun", None),
                                                     ("heun", "karras"), ("unipc", "karras"), ("dpmpp_2m_sde", None),
                                                     ("dpmpp_sde", None), ("dpmpp_sde", "karras"), ("lcm", None)])
def test_image_to_image_matches_diffusers(name: str, sigma_spacing: str | None) -> None:
    noise, x0 = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    scheduler = make_scheduler(name, "v", sigma_spacing)
    reference = run_scheduler_from_image(scheduler, 20, x0, noise, 0.6, seed=2)
    ours = sample(name, model_fn, noise, SD15_SCHEDULE, 20, prediction_type="v", x0=x0, strength=0.6,
                  steps_offset=1, sigma_spacing=sigma_spacing, generator=torch.Generator().manual_seed(2))
    assert relative_error(ours, reference) <= 1e-4


# ---- A1111 names ----

A1111_EXPECTED = {
    "Euler": ("euler", None), "Euler a": ("euler_a", None), "DPM++ 2M": ("dpmpp_2m", None),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"), "DPM++ 2M SDE": ("dpmpp_2m_sde", None),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"), "DPM++ SDE": ("dpmpp_sde", None),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras"), "Heun": ("heun", None), "LMS": ("lms", None),
    "LMS Karras": ("lms", "karras"), "DDIM": ("ddim", None), "UniPC": ("unipc", None), "LCM": ("lcm", None),
    "DDPM": ("ddpm", None),
}


@pytest.mark.filterwarnings("ignore:Should have")
@pytest.mark.parametrize("alias", list(A1111_EXPECTED))
def test_a1111_names_are_their_sampler_and_spacing(alias: str) -> None:
    sampler, spacing = A1111_EXPECTED[alias]
    assert resolve_sampler(alias) == (sampler, {} if spacing is None else {"sigma_spacing": spacing})
    assert resolve_sampler(alias.lower())[0] == resolve_sampler(alias.upper())[0] == sampler
    assert a1111_name(sampler, spacing) == alias
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    via_alias = run_ours_spaced(alias, 6, noise, "epsilon", 1)
    assert torch.equal(via_alias, run_ours_spaced(sampler, 6, noise, "epsilon", 1, spacing))
    if spacing is not None:  # and Karras is not a no-op
        assert relative_error(via_alias, run_ours_spaced(sampler, 6, noise, "epsilon", 1)) > 1e-3


def test_alias_table_is_the_expected_one() -> None:
    assert A1111_NAMES == A1111_EXPECTED
    assert resolve_sampler("unipc") == ("unipc", {})


def test_bad_sampler_names_and_spacings_are_refused() -> None:
    noise = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"sampler='DPM\+\+ 3M' is not supported; allowed: 'ddpm', 'ddim'.*'lcm', "
                                         r"or an A1111 name: 'Euler'.*'DPM\+\+ 2M Karras'"):
        sample("DPM++ 3M", model_fn, noise, SD15_SCHEDULE, 4)
    with pytest.raises(ValueError, match="sigma_spacing='exponential' contradicts sampler='DPM\\+\\+ 2M Karras'"):
        sample("DPM++ 2M Karras", model_fn, noise, SD15_SCHEDULE, 4, sigma_spacing="exponential")
    with pytest.raises(ValueError, match="sigma_spacing='karras' is not supported by sampler 'ddim'; allowed with"):
        sample("ddim", model_fn, noise, SD15_SCHEDULE, 4, sigma_spacing="karras")
    with pytest.raises(ValueError, match="sigma_spacing='polyexponential' is not supported; allowed: 'karras'"):
        sample("euler", model_fn, noise, SD15_SCHEDULE, 4, sigma_spacing="polyexponential")
    with pytest.raises(ValueError, match="num_steps=51 is out of range"):
        sample("lcm", model_fn, noise, SD15_SCHEDULE, 51)


def test_sampling_options_canonicalise_aliases() -> None:
    from pipelines.options import SamplingOptions

    options = SamplingOptions(sampler="DPM++ 2M SDE Karras")
    assert (options.sampler, options.sigma_spacing) == ("dpmpp_2m_sde", "karras")
    assert (SamplingOptions(sampler="Euler a").sampler, SamplingOptions(sampler="Euler a").sigma_spacing) == (
        "euler_a", None)
    assert SamplingOptions(sampler="lms", sigma_spacing="exponential").sigma_spacing == "exponential"
    with pytest.raises(ValueError, match="sampler='plms' is not supported; allowed: 'ddpm', 'ddim'"):
        SamplingOptions(sampler="plms")
    with pytest.raises(ValueError, match="sigma_spacing='karras' is not supported by sampler 'lcm'"):
        SamplingOptions(sampler="LCM", sigma_spacing="karras")
