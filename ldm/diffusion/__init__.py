"""The DDPM core: schedules, training objectives, the denoiser, samplers and guidance."""

from ldm.diffusion.denoiser import Denoiser, as_denoiser
from ldm.diffusion.guidance import ClassifierFreeGuidance, ClassifierGuidance
from ldm.diffusion.objectives import condition_dropout_mask, diffusion_loss, drop_conditions, min_snr_weight
from ldm.diffusion.samplers import SAMPLERS, initial_state, sample
from ldm.diffusion.schedule import NoiseSchedule, make_betas
from ldm.diffusion.timesteps import make_timesteps, strength_timesteps

__all__ = [
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
    "sample",
    "strength_timesteps",
]
