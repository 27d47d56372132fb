"""ldm-toolkit: the diffusion core (schedules, objectives, samplers, guidance) and networks."""

__version__ = "0.1.0"
