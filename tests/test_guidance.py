"""Classifier-free and classifier guidance against their defining formulas."""

import pytest
import torch

from ldm.diffusion import ClassifierFreeGuidance, ClassifierGuidance, Denoiser, NoiseSchedule, sample
from ldm.diffusion.guidance import cfg_combine

SCHEDULE = NoiseSchedule.create()
SIGMA = SCHEDULE.sigma_at(500.0).item()  # t(σ) = 500


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
    cond, uncond = torch.tensor([2.0, -1.0, 0.5]), torch.zeros(1)
    return x, cond, uncond


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5])
def test_cfg_scale_is_one_batched_forward(scale: float, prediction_type: str) -> None:
    x, cond, uncond = setup()
    net = CountingNet()
    denoiser = Denoiser(net, SCHEDULE, prediction_type)
    x0, eps = ClassifierFreeGuidance(denoiser, cond, uncond, scale).denoise(x, SIGMA)
    assert net.batches == [6]
    # the network outputs, combined as u + s·(c - u) in the network's own output space
    x_t, t = denoiser.network_input(x, SIGMA)
    assert t.tolist() == [500.0] * 3
    conditional = x_t * cond.reshape(-1, 1, 1, 1) + 0.5
    unconditional = torch.zeros_like(x) + 0.5
    guided_output = unconditional + scale * (conditional - unconditional)
    torch.testing.assert_close((x0, eps), denoiser.from_output(x, SIGMA, guided_output))
    # ... which is the same combination of x̂0 and of ε̂: both are affine in the output at fixed x and σ
    c0, c_eps = denoiser.from_output(x, SIGMA, conditional)
    u0, u_eps = denoiser.from_output(x, SIGMA, unconditional)
    torch.testing.assert_close(x0, u0 + scale * (c0 - u0))
    torch.testing.assert_close(eps, u_eps + scale * (c_eps - u_eps))
    if scale == 1.0:
        torch.testing.assert_close((x0, eps), (c0, c_eps))
    if scale == 0.0:
        torch.testing.assert_close((x0, eps), (u0, u_eps))


def test_cfg_with_dict_conditions() -> None:
    x, cond, uncond = setup()
    seen = {}

    def net(x, t, c):
        seen.update(c)
        return x * c["text"].reshape(-1, 1, 1, 1) + c["image"]

    image = torch.randn(3, 2, 4, 4)
    denoiser = Denoiser(net, SCHEDULE)
    cfg = ClassifierFreeGuidance(denoiser, {"text": cond, "image": image}, {"text": uncond, "image": image}, 3.0)
    _, eps = cfg.denoise(x, SIGMA)
    assert seen["text"].shape == (6,) and seen["image"].shape == (6, 2, 4, 4)
    x_t, _ = denoiser.network_input(x, SIGMA)
    torch.testing.assert_close(eps, image + 3.0 * x_t * cond.reshape(-1, 1, 1, 1))


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
    x = torch.randn(4, 6, generator=generator, dtype=torch.float64)  # the VP sample x_t
    t = torch.tensor([10.0, 200.0, 500.0, 900.0])
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    seen_t = []
    model = lambda x, t: torch.sin(x)  # noqa: E731
    classifier = lambda x, t: seen_t.append(t) or x @ weight.T  # noqa: E731
    sigma = schedule.sigma_at(t)  # one σ per sample
    denoiser = Denoiser(model, schedule, prediction_type)
    x_ve = x * (1 + sigma**2).sqrt()[:, None]  # the same sample in the VE form x0 + σ ε
    x0_hat, eps_hat = ClassifierGuidance(denoiser, classifier, labels, 2.5).denoise(x_ve, sigma)
    assert seen_t[0].tolist() == t.tolist()

    probs = torch.softmax(x @ weight.T, dim=-1)
    grad = weight[labels] - probs @ weight
    ab = schedule.alpha_bar_at(t).reshape(-1, 1)
    eps = torch.sin(x) if prediction_type == "epsilon" else ab.sqrt() * torch.sin(x) + (1 - ab).sqrt() * x
    expected_eps = eps - 2.5 * (1 - ab).sqrt() * grad
    torch.testing.assert_close(eps_hat, expected_eps)
    torch.testing.assert_close(x0_hat, (x - (1 - ab).sqrt() * expected_eps) / ab.sqrt())


def test_classifier_guidance_combines_with_cfg() -> None:
    x, cond, uncond = setup()
    net = CountingNet()
    cfg = ClassifierFreeGuidance(Denoiser(net, SCHEDULE), cond, uncond, 4.0)
    classifier = lambda x, t: torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)  # noqa: E731
    guided = ClassifierGuidance(cfg, classifier, torch.tensor([0, 1, 0]), 0.0)
    torch.testing.assert_close(guided.denoise(x, SIGMA), cfg.denoise(x, SIGMA))
    pushed = ClassifierGuidance(cfg, classifier, torch.tensor([0, 1, 0]), 5.0).denoise(x, SIGMA)
    assert net.batches == [6, 6, 6]
    # ε̂ = ε - s√(1-ᾱ)∇log p(y|x): label 0 raises mean(x), so ε drops there; label 1 the opposite
    shift = (cfg.denoise(x, SIGMA)[1] - pushed[1]).mean(dim=(1, 2, 3))
    assert shift[0] > 0 > shift[1] and shift[2] > 0
    # and x̂0 = x - σ ε̂ moves the other way, by σ times as much
    torch.testing.assert_close(pushed[0] - cfg(x, SIGMA), SIGMA * (cfg.denoise(x, SIGMA)[1] - pushed[1]))


def test_guidance_over_a_bare_network_is_bound_by_sample() -> None:
    """The documented call: guidance of a bare network, its prediction type given to ``sample``."""
    x, cond, uncond = setup()
    net = lambda x, t, c: torch.tanh(x * c.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000)  # noqa: E731
    classifier = lambda x, t: torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)  # noqa: E731
    labels = torch.tensor([0, 1, 0])
    for prediction_type in ("epsilon", "v"):
        bare = ClassifierGuidance(ClassifierFreeGuidance(net, cond, uncond, 3.0), classifier, labels, 2.0)
        bound = ClassifierGuidance(ClassifierFreeGuidance(Denoiser(net, SCHEDULE, prediction_type), cond, uncond, 3.0),
                                   classifier, labels, 2.0)
        runs = [sample("ddim", model, x, SCHEDULE, 5, prediction_type=prediction_type) for model in (bare, bound)]
        assert torch.equal(*runs)
    with pytest.raises(TypeError, match="wraps a bare network"):
        ClassifierFreeGuidance(net, cond, uncond, 3.0)(x, SIGMA)


def test_a_guidance_interval_guides_inside_and_runs_the_conditional_model_alone_outside() -> None:
    x, cond, uncond = setup()
    net = CountingNet()
    denoiser = Denoiser(net, SCHEDULE, "v")
    x_t, _ = denoiser.network_input(x, SIGMA)
    conditional = x_t * cond.reshape(-1, 1, 1, 1) + 0.5
    guided = 0.5 + 7.5 * (conditional - 0.5)  # the unconditional output is 0.5 (cond 0, t 500)
    inside = ClassifierFreeGuidance(denoiser, cond, uncond, 7.5, interval=(SIGMA / 2, None)).denoise(x, SIGMA)
    torch.testing.assert_close(inside, denoiser.from_output(x, SIGMA, guided))
    assert net.batches == [6]
    outside = ClassifierFreeGuidance(denoiser, cond, uncond, 7.5, interval=(2 * SIGMA, None)).denoise(x, SIGMA)
    torch.testing.assert_close(outside, denoiser.from_output(x, SIGMA, conditional))
    assert net.batches == [6, 3]  # one forward, of the conditional branch only
    sigmas = torch.tensor([SIGMA / 4, SIGMA, 4 * SIGMA], dtype=torch.float64)  # per-sample σ: one guided
    mixed = ClassifierFreeGuidance(denoiser, cond, uncond, 7.5, interval=(SIGMA / 2, 2 * SIGMA)).denoise(x, sigmas)
    x_t, t = denoiser.network_input(x, sigmas)
    conditional = x_t * cond.reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000
    unconditional = torch.zeros_like(x) + t.reshape(-1, 1, 1, 1) / 1000
    expected = conditional.clone()
    expected[1] = unconditional[1] + 7.5 * (conditional[1] - unconditional[1])
    torch.testing.assert_close(mixed, denoiser.from_output(x, sigmas, expected))


@pytest.mark.parametrize("interval", [(2.0, 1.0), (-1.0, None), (1.0,), "low"])
def test_bad_guidance_intervals_are_named(interval: object) -> None:
    x, cond, uncond = setup()
    with pytest.raises(ValueError, match=r"guidance_interval=.* is not allowed"):
        ClassifierFreeGuidance(Denoiser(CountingNet(), SCHEDULE, "v"), cond, uncond, 7.5, interval=interval)
