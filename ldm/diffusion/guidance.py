"""Guidance as small wrappers that turn networks into a denoiser ``model(x_t, t)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule, broadcast, predict_eps, predict_x0, prediction_from
from ldm.validation import check_float, check_same_shape

Condition = Tensor | dict[str, Tensor]


def _cat(uncond: Condition, cond: Condition) -> Condition:
    if isinstance(cond, dict):
        return {key: _cat(uncond[key], value) for key, value in cond.items()}
    return torch.cat([uncond.expand_as(cond), cond])


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """u + s·(c - u) (Ho & Salimans 2022); with ``rescale`` φ > 0 the result's per-sample std is
    pulled toward the conditional one (Lin et al. 2023, eqs. 15-16)."""
    guided = uncond + scale * (cond - uncond)
    if rescale == 0:
        return guided
    dims = tuple(range(1, cond.ndim))
    rescaled = guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * rescaled + (1 - rescale) * guided


class ClassifierFreeGuidance:
    """Classifier-free guidance of ``net(x, t, cond)``: one batched forward of [uncond; cond]."""

    def __init__(
        self,
        net: Callable[[Tensor, Tensor, Condition], Tensor],
        cond: Condition,
        uncond: Condition,
        scale: float = 7.5,
        rescale: float = 0.0,
    ) -> None:
        self.net, self.cond, self.uncond = net, cond, uncond
        self.scale = check_float("guidance_scale", scale, 0.0)
        self.rescale = check_float("guidance_rescale", rescale, 0.0, 1.0)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        both = self.net(torch.cat([x, x]), torch.cat([t, t]), _cat(self.uncond, self.cond))
        uncond, cond = both.chunk(2)  # (2B, ...) → two (B, ...)
        return cfg_combine(uncond, cond, self.scale, self.rescale)


def class_log_prob_grad(classifier: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """∇_x log p(y | x_t) of a noise-aware classifier returning logits (B, classes)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs[torch.arange(x.shape[0], device=x.device), labels].sum()
        return torch.autograd.grad(chosen, x_in)[0]


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 / eq. 14):
    ε̂ = ε - s·√(1-ᾱ_t)·∇_x log p(y | x_t), returned in the wrapped model's prediction type.
    Wraps any denoiser, so it combines with :class:`ClassifierFreeGuidance`."""

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        classifier: Callable[[Tensor, Tensor], Tensor],
        labels: Tensor,
        scale: float,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
    ) -> None:
        self.model, self.classifier, self.labels = model, classifier, labels
        self.scale = check_float("classifier_scale", scale, 0.0)
        self.schedule, self.prediction_type = schedule, prediction_type

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        check_same_shape("labels", tuple(self.labels.shape), (x.shape[0],))
        pred = self.model(x, t)
        alpha_bar = self.schedule.alpha_bar_at(t.detach().cpu())
        grad = class_log_prob_grad(self.classifier, x, t, self.labels)
        eps = predict_eps(pred, x, alpha_bar, self.prediction_type)
        eps = eps - self.scale * broadcast((1 - alpha_bar).sqrt(), x) * grad
        x0 = predict_x0(eps, x, alpha_bar, "epsilon")
        return prediction_from(x0, eps, alpha_bar, self.prediction_type)
