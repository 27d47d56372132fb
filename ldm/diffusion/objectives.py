"""Training objectives: the denoising loss for ε, v or x0 prediction, and condition dropout."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.samplers import randn_like
from ldm.diffusion.schedule import NoiseSchedule, normalize_prediction_type, prediction_from
from ldm.validation import check_float, check_int


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, eq. 9), for the loss in the given
    prediction space: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v, min(SNR, γ) for x0."""
    check_float("min_snr_gamma", gamma, 0.0, low_open=True)
    kind = normalize_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if kind == "epsilon":
        return clipped / snr
    if kind == "v":
        return clipped / (snr + 1)
    return clipped


def condition_dropout_mask(batch: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Which of ``batch`` samples lose their condition (True: dropped), each with probability ``p``: one uniform
    draw per sample on the generator's device (the CPU without one), dropped where it is below ``p``."""
    check_float("p", p, 0.0, 1.0)
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch, generator=generator, device=device) < p


def drop_conditions(cond: Tensor, null_cond: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample's condition by ``null_cond`` with probability ``p`` (classifier-free
    guidance training, Ho & Salimans 2022). ``null_cond`` has one row or as many as ``cond``."""
    drop = condition_dropout_mask(cond.shape[0], p, generator).to(cond.device)
    mask = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
    return torch.where(mask, null_cond.to(cond.dtype).expand_as(cond), cond)


def draw_timesteps(batch: int, num_train_timesteps: int, bias_portion: float = 0.0, bias_begin: int = 0,
                   generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """``batch`` training timesteps, uniform on [0, T) except the first round(bias_portion · batch), which are
    uniform on [bias_begin, T)."""
    check_float("timestep_bias_portion", bias_portion, 0.0, 1.0)
    check_int("timestep_bias_begin", bias_begin, 0, num_train_timesteps - 1)
    t = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device)
    late = round(bias_portion * batch)
    if late:
        t[:late] = torch.randint(bias_begin, num_train_timesteps, (late,), generator=generator, device=device)
    return t


def diffusion_loss(
    model: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    timestep_bias_portion: float = 0.0,
    timestep_bias_begin: int = 0,
    **model_kwargs: object,
) -> Tensor:
    """The simple loss ‖f(x_t, t) - target‖² (Ho et al. 2020, eq. 14) at uniformly drawn t.

    The target is ε, v = √ᾱ ε - √(1-ᾱ) x_0 (Salimans & Ho 2022) or x_0; optional Min-SNR-γ
    weighting, and offset noise (a per-channel constant added to ε, Guttenberg 2023).
    ``timestep_bias_portion`` of the batch draws t from [``timestep_bias_begin``, T) instead (as diffusers'
    SDXL script biases timesteps): what only the prompt can say, such as where an object goes, is learned
    at the noisiest steps, where x_t no longer shows it.
    ``model_kwargs`` (e.g. the condition) are passed to ``model(x_t, t, **model_kwargs)``.
    """
    check_float("offset_noise", offset_noise, 0.0)
    batch = x0.shape[0]
    device = generator.device if generator is not None else x0.device
    t = draw_timesteps(batch, schedule.num_train_timesteps, timestep_bias_portion, timestep_bias_begin,
                       generator, device).to(x0.device)
    noise = randn_like(x0, generator)
    if offset_noise > 0:
        channel_shift = randn_like(x0[(...,) + (slice(0, 1),) * (x0.ndim - 2)], generator)
        noise = noise + offset_noise * channel_shift
    alpha_bar = schedule.alpha_bar_at(t)
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t.float(), **model_kwargs)
    target = prediction_from(x0, noise, alpha_bar, prediction_type)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        weight = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction_type)
        per_sample = per_sample * weight.to(per_sample)
    return per_sample.mean()
