"""Bad arguments fail with a ValueError naming the parameter, the value and what is allowed."""

import re

import pytest
import torch

from ldm.diffusion import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    NoiseSchedule,
    drop_conditions,
    make_betas,
    make_timesteps,
    sample,
    strength_timesteps,
)

SCHEDULE = NoiseSchedule.create()
NOISE = torch.zeros(1, 4, 8, 8)
MODEL = lambda x, t: torch.zeros_like(x)  # noqa: E731


def raises(*fragments: str):
    return pytest.raises(ValueError, match=".*".join(re.escape(f) for f in fragments))


def test_unknown_schedule_name() -> None:
    with raises("beta_schedule='cosinus'", "'linear'", "'scaled_linear'", "'cosine'"):
        make_betas("cosinus")


def test_unknown_sampler_name() -> None:
    with raises("sampler='dpm++'", "'ddim'", "'dpmpp_2m'", "'euler_a'"):
        sample("dpm++", MODEL, NOISE, SCHEDULE, 10)


def test_unknown_prediction_type_and_spacing() -> None:
    with raises("prediction_type='noise'", "'epsilon'", "'v'", "'x0'"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, prediction_type="noise")
    with raises("timestep_spacing='even'", "'leading'", "'trailing'"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, timestep_spacing="even")


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range(steps: int) -> None:
    with raises(f"num_steps={steps}", "[1, 1000]"):
        sample("euler", MODEL, NOISE, SCHEDULE, steps)


def test_steps_not_an_integer() -> None:
    with raises("num_steps=2.5", "integer"):
        make_timesteps(2.5)


def test_negative_eta() -> None:
    with raises("eta=-0.1", "a finite number in [0, inf)"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, eta=-0.1)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_strength_outside_unit_interval(strength: float) -> None:
    with raises(f"strength={strength}", "(0, 1]"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, x0=NOISE, strength=strength)


def test_strength_too_small_for_the_steps() -> None:
    with raises("strength=0.05", "no denoising step", "strength >= 0.1"):
        strength_timesteps(make_timesteps(10), 0.05)


def test_strength_without_x0() -> None:
    with raises("strength=0.5", "x0"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, strength=0.5)


def test_mismatched_shapes() -> None:
    with raises("x0 has shape (2, 4, 8, 8)", "expected (1, 4, 8, 8)"):
        sample("ddim", MODEL, NOISE, SCHEDULE, 10, x0=torch.zeros(2, 4, 8, 8))
    guided = ClassifierGuidance(MODEL, lambda x, t: x.flatten(1)[:, :3], torch.tensor([0, 1]), 1.0, SCHEDULE)
    with raises("labels has shape (2,)", "expected (1,)"):
        guided(NOISE, torch.zeros(1))


def test_guidance_and_dropout_ranges() -> None:
    with raises("guidance_scale=-1.0", "a finite number in [0, inf)"):
        ClassifierFreeGuidance(MODEL, NOISE, NOISE, scale=-1.0)
    with raises("guidance_rescale=2.0", "[0, 1]"):
        ClassifierFreeGuidance(MODEL, NOISE, NOISE, rescale=2.0)
    with raises("p=1.5", "[0, 1]"):
        drop_conditions(NOISE, NOISE, 1.5)


def test_bad_betas() -> None:
    with raises("beta_start=0.5", "beta_end=0.1", "0 < beta_start <= beta_end < 1"):
        make_betas("linear", 1000, 0.5, 0.1)
    with pytest.raises(ValueError, match="betas must be a 1-D tensor of values in \\(0, 1\\]"):
        NoiseSchedule(torch.tensor([0.1, -0.2, 0.3]))


def test_what_a_training_sample_lacks_is_named_with_the_setting_that_needs_it() -> None:
    """A folder dataset (image, caption) under a model that needs labels or low-res copies: a ValueError, not a
    KeyError (the CLI prints ValueErrors as one line)."""
    from ldm.training.loop import batch_field

    batch = {"image": NOISE, "caption": ["a"], "index": torch.tensor([0])}
    assert batch_field(batch, "image", "training") is NOISE
    with raises("model.concat kind 'image' needs 'low_res'", "gives caption, image, index", "data.kind='shapes'"):
        batch_field(batch, "low_res", "model.concat kind 'image'")


def test_unknown_text_encoder_kind_has_no_pad_token() -> None:
    from ldm.conditioning.tokenizer import pad_token_id_for

    assert (pad_token_id_for("clip"), pad_token_id_for("openclip")) == (49407, 0)
    with raises("kind='t5'", "'clip'", "'openclip'"):
        pad_token_id_for("t5")
