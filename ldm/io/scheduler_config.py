"""Our ScheduleConfig to and from a diffusers scheduler_config.json."""

from __future__ import annotations

from typing import Any

from ldm.diffusion.schedule import ScheduleConfig
from ldm.io.files import CheckpointError

_TO_DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_FROM_DIFFUSERS_BETAS = {v: k for k, v in _TO_DIFFUSERS_BETAS.items()}
_TO_DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def schedule_from_diffusers(cfg: dict[str, Any], source: str = "scheduler_config.json") -> ScheduleConfig:
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{source}: trained_betas are not supported; allowed: a named beta_schedule")
    kind = cfg.get("beta_schedule", "linear")
    if kind not in _FROM_DIFFUSERS_BETAS:
        allowed = ", ".join(_FROM_DIFFUSERS_BETAS)
        raise CheckpointError(f"{source}: beta_schedule={kind!r} is not supported; allowed: {allowed}")
    return ScheduleConfig(
        beta_schedule=_FROM_DIFFUSERS_BETAS[kind],
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=None if kind == "squaredcos_cap_v2" else float(cfg.get("beta_start", 0.0001)),
        beta_end=None if kind == "squaredcos_cap_v2" else float(cfg.get("beta_end", 0.02)),
        zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        steps_offset=int(cfg.get("steps_offset", 0)),
        timestep_spacing=cfg.get("timestep_spacing"),
    )


def schedule_to_diffusers(config: ScheduleConfig) -> dict[str, Any]:
    """A DDIMScheduler config, as Stable Diffusion folders carry (the sampler is chosen at call time)."""
    cfg: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "beta_schedule": _TO_DIFFUSERS_BETAS[config.beta_schedule],
        "num_train_timesteps": config.num_train_timesteps,
        "prediction_type": _TO_DIFFUSERS_PREDICTION[config.prediction_type],
        "steps_offset": config.steps_offset,
        "rescale_betas_zero_snr": config.zero_terminal_snr,
        "set_alpha_to_one": False,
        "clip_sample": False,
    }
    if config.timestep_spacing is not None:
        cfg["timestep_spacing"] = config.timestep_spacing
    if config.beta_start is not None:
        cfg["beta_start"] = config.beta_start
    if config.beta_end is not None:
        cfg["beta_end"] = config.beta_end
    return cfg
