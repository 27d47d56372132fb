"""Classifier-free and classifier guidance against their defining formulas."""

import pytest
import torch

from ldm.diffusion import ClassifierFreeGuidance, ClassifierGuidance, NoiseSchedule
from ldm.diffusion.guidance import cfg_combine


class CountingNet:
    """net(x, t, cond) = x·cond + t/1000, recording every call's batch size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x * cond.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000


def setup():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.full((3,), 500.0)
    cond, uncond = torch.tensor([2.0, -1.0, 0.5]), torch.zeros(1)
    return x, t, cond, uncond


@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5])
def test_cfg_scale_is_one_batched_forward(scale: float) -> None:
    x, t, cond, uncond = setup()
    net = CountingNet()
    out = ClassifierFreeGuidance(net, cond, uncond, scale)(x, t)
    assert net.batches == [6]
    conditional = x * cond.reshape(-1, 1, 1, 1) + 0.5
    unconditional = torch.zeros_like(x) + 0.5
    torch.testing.assert_close(out, unconditional + scale * (conditional - unconditional))
    if scale == 1.0:
        torch.testing.assert_close(out, conditional)
    if scale == 0.0:
        torch.testing.assert_close(out, unconditional)


def test_cfg_with_dict_conditions() -> None:
    x, t, cond, uncond = setup()
    seen = {}

    def net(x, t, c):
        seen.update(c)
        return x * c["text"].reshape(-1, 1, 1, 1) + c["image"]

    image = torch.randn(3, 2, 4, 4)
    out = ClassifierFreeGuidance(net, {"text": cond, "image": image}, {"text": uncond, "image": image}, 3.0)(x, t)
    assert seen["text"].shape == (6,) and seen["image"].shape == (6, 2, 4, 4)
    torch.testing.assert_close(out, image + 3.0 * x * cond.reshape(-1, 1, 1, 1))


def test_guidance_rescale() -> None:
    """φ=1 gives the conditional prediction's per-sample std; φ=0 is plain CFG."""
    generator = torch.Generator().manual_seed(2)
    u, c = torch.randn(2, 4, 3, 8, 8, generator=generator)
    full = cfg_combine(u, c, 7.5, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    torch.testing.assert_close(cfg_combine(u, c, 7.5, 0.0), u + 7.5 * (c - u))
    half = cfg_combine(u, c, 7.5, rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * cfg_combine(u, c, 7.5))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_classifier_guidance_uses_the_analytic_gradient(prediction_type: str) -> None:
    """A linear classifier has ∇ log softmax(Wx)_y = W_y - Σ_k p_k W_k in closed form."""
    schedule = NoiseSchedule.create()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    t = torch.tensor([10.0, 200.0, 500.0, 900.0])
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    model = lambda x, t: torch.sin(x)  # noqa: E731
    classifier = lambda x, t: x @ weight.T  # noqa: E731
    guided = ClassifierGuidance(model, classifier, labels, 2.5, schedule, prediction_type)(x, t)

    probs = torch.softmax(x @ weight.T, dim=-1)
    grad = weight[labels] - probs @ weight
    ab = schedule.alpha_bar_at(t).reshape(-1, 1)
    eps = torch.sin(x) if prediction_type == "epsilon" else ab.sqrt() * torch.sin(x) + (1 - ab).sqrt() * x
    eps_hat = eps - 2.5 * (1 - ab).sqrt() * grad
    if prediction_type == "epsilon":
        expected = eps_hat
    else:
        x0 = (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        expected = ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0
    torch.testing.assert_close(guided, expected)


def test_classifier_guidance_combines_with_cfg() -> None:
    x, t, cond, uncond = setup()
    net = CountingNet()
    cfg = ClassifierFreeGuidance(net, cond, uncond, 4.0)
    classifier = lambda x, t: torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)  # noqa: E731
    guided = ClassifierGuidance(cfg, classifier, torch.tensor([0, 1, 0]), 0.0, NoiseSchedule.create())(x, t)
    torch.testing.assert_close(guided, cfg(x, t))
    pushed = ClassifierGuidance(cfg, classifier, torch.tensor([0, 1, 0]), 5.0, NoiseSchedule.create())(x, t)
    assert net.batches == [6, 6, 6]
    # ε̂ = ε - s√(1-ᾱ)∇log p(y|x): label 0 raises mean(x), so ε drops there; label 1 the opposite
    shift = (cfg(x, t) - pushed).mean(dim=(1, 2, 3))
    assert shift[0] > 0 > shift[1] and shift[2] > 0
