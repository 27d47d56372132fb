"""The DDPM core: schedules, training objectives, the denoiser, samplers and guidance."""

from ldm.diffusion.denoiser import Denoiser, as_denoiser
from ldm.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from ldm.diffusion.objectives import condition_dropout_mask, diffusion_loss, drop_conditions, min_snr_weight
from ldm.diffusion.samplers import A1111_NAMES, SAMPLERS, initial_state, resolve_sampler, sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas
from ldm.diffusion.timesteps import make_timesteps, strength_timesteps

__all__ = [
    "A1111_NAMES",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "Denoiser",
    "NoiseSchedule",
    "as_denoiser",
    "condition_dropout_mask",
    "diffusion_loss",
    "drop_conditions",
    "initial_state",
    "make_betas",
    "make_timesteps",
    "min_snr_weight",
    "resolve_sampler",
    "sample",
    "strength_timesteps",
]
