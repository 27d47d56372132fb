"""The training loss against oracles that know the true target in closed form."""

import pytest
import torch

from ldm.diffusion import NoiseSchedule, condition_dropout_mask, diffusion_loss, drop_conditions, min_snr_weight

SCHEDULE = NoiseSchedule.create("linear", 1000)
C = 0.4  # every training image is the constant C, so x_t determines ε exactly


def oracle(kind: str):
    """The exact prediction of `kind` for data that is the constant C."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = SCHEDULE.alpha_bar_at(t).float().reshape(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * C) / (1 - ab).sqrt()
        x0 = torch.full_like(x_t, C)
        return {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[kind]

    return model


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0"])
def test_oracle_has_zero_loss_and_wrong_type_does_not(kind: str) -> None:
    x0 = torch.full((64, 2, 4, 4), C)
    generator = torch.Generator().manual_seed(0)
    assert diffusion_loss(oracle(kind), x0, SCHEDULE, prediction_type=kind, generator=generator).item() < 1e-8
    other = {"epsilon": "v", "v": "x0", "x0": "epsilon"}[kind]
    assert diffusion_loss(oracle(other), x0, SCHEDULE, prediction_type=kind, generator=generator).item() > 1e-2


def test_zero_model_loss_is_noise_power() -> None:
    """With f ≡ 0 the ε loss is E‖ε‖² = 1, and 1 + offset² with offset noise."""
    x0 = torch.zeros(256, 4, 8, 8)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    plain = diffusion_loss(zero, x0, SCHEDULE, generator=torch.Generator().manual_seed(0)).item()
    offset = diffusion_loss(zero, x0, SCHEDULE, generator=torch.Generator().manual_seed(0), offset_noise=0.5).item()
    assert plain == pytest.approx(1.0, abs=0.02)
    assert offset == pytest.approx(1.25, abs=0.05)


def test_min_snr_weights_closed_form() -> None:
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.01, 1.0, 5.0, 5.0]))


def test_min_snr_changes_the_loss_only_where_snr_exceeds_gamma() -> None:
    x0 = torch.zeros(512, 1, 2, 2)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    weighted = [
        diffusion_loss(zero, x0, SCHEDULE, generator=torch.Generator().manual_seed(3), min_snr_gamma=g).item()
        for g in (1e9, 5.0)
    ]
    plain = diffusion_loss(zero, x0, SCHEDULE, generator=torch.Generator().manual_seed(3)).item()
    assert weighted[0] == pytest.approx(plain, rel=1e-6)
    assert weighted[1] < plain


def test_condition_dropout_rate_and_rows() -> None:
    cond = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(0)) + 5
    null = torch.zeros(1, 3)
    out = drop_conditions(cond, null, 0.1, torch.Generator().manual_seed(1))
    dropped = (out == 0).all(dim=1)
    kept = (out == cond).all(dim=1)
    assert bool((dropped | kept).all())
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    again = drop_conditions(cond, null, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(drop_conditions(cond, null, 0.0), cond)


def test_caption_and_condition_dropout_share_one_mask_with_the_draws_of_earlier_runs() -> None:
    """drop_captions (text training) and drop_conditions drop the same rows for the same generator; the
    mask is the one training runs drew before (keep where torch.rand(B) >= p), so they resume bit for bit."""
    from pipelines.training.diffusion import drop_captions

    captions = [f"caption {i}" for i in range(64)]
    earlier = torch.rand(64, generator=torch.Generator().manual_seed(7)) >= 0.3  # the former drop_captions draw
    mask = condition_dropout_mask(64, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(mask, ~earlier)
    dropped = [c == "" for c in drop_captions(captions, 0.3, torch.Generator().manual_seed(7))]
    cond = drop_conditions(torch.ones(64, 2), torch.zeros(1, 2), 0.3, torch.Generator().manual_seed(7))
    assert dropped == mask.tolist() == (cond == 0).all(dim=1).tolist()


def test_min_snr_weight_uses_the_schedule_snr() -> None:
    t = torch.tensor([0, 10, 500, 999])
    ab = SCHEDULE.alpha_bar[t]
    assert torch.equal(SCHEDULE.snr(t), ab / (1 - ab))


def test_timestep_bias_draws_its_portion_from_the_late_range() -> None:
    seen: list[torch.Tensor] = []

    def record(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x_t)

    x0 = torch.zeros(4000, 1, 2, 2)
    diffusion_loss(record, x0, SCHEDULE, generator=torch.Generator().manual_seed(0),
                   timestep_bias_portion=0.25, timestep_bias_begin=800)
    t = seen[0]
    assert t[:1000].min() >= 800 and t[:1000].float().mean() == pytest.approx(899.5, abs=5)  # uniform on [800, 999]
    assert t[1000:].float().mean() == pytest.approx(499.5, abs=15)  # the rest uniform on [0, 999]
    assert (t >= 800).float().mean().item() == pytest.approx(0.25 + 0.75 * 0.2, abs=0.02)
    with pytest.raises(ValueError, match="timestep_bias_begin=1000 is out of range"):
        diffusion_loss(record, x0, SCHEDULE, timestep_bias_portion=0.5, timestep_bias_begin=1000)
