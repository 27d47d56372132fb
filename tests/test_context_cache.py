"""The sampling fast path's cache of cross-attention keys and values: a sampler calls the U-Net with the same text
context at every step, so each cross-attention layer projects it once per call — and recomputes whenever the
context or the projection weights changed, so that a result never depends on the cache."""

from __future__ import annotations

import numpy as np
import torch
from sd_fixtures import randomize

from ldm.diffusion import ClassifierFreeGuidance, Denoiser, NoiseSchedule
from ldm.diffusion.schedule import ScheduleConfig
from ldm.modules import CrossAttention, UNet, UNetConfig
from ldm.modules.attention import cached_context_projections


def small_unet() -> UNet:
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                           num_heads=2, context_dim=16, norm_groups=8))
    randomize(unet, 0)
    return unet.eval()


def count_context_projections(unet: UNet) -> list[int]:
    """A counter of to_k calls on a context (cross-attention layers only), filled by forward hooks."""
    calls = [0]
    for module in unet.modules():
        if isinstance(module, CrossAttention) and module.to_k.in_features == unet.config.context_dim:
            module.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900, 400]), torch.randn(2, 5, 16, generator=g)


def test_the_context_is_projected_once_per_call_with_the_same_result() -> None:
    unet, (x, t, context) = small_unet(), inputs()
    calls = count_context_projections(unet)
    layers = sum(isinstance(m, CrossAttention) and m.to_k.in_features == 16 for m in unet.modules())
    with torch.no_grad():
        plain = [unet(x * s, t - 100 * s, context) for s in range(3)]
        assert calls[0] == 3 * layers
        calls[0] = 0
        with cached_context_projections(unet):
            cached = [unet(x * s, t - 100 * s, context) for s in range(3)]
        assert calls[0] == layers  # the first step only
        assert all(torch.equal(a, b) for a, b in zip(plain, cached))
        calls[0] = 0
        unet(x, t, context)  # outside the block: no cache
        assert calls[0] == layers and all(m.kv_cache is None for m in unet.modules() if isinstance(m, CrossAttention))


def test_a_changed_context_or_weight_is_projected_again() -> None:
    unet, (x, t, context) = small_unet(), inputs()
    calls = count_context_projections(unet)
    layer = next(m for m in unet.modules() if isinstance(m, CrossAttention) and m.to_k.in_features == 16)
    with torch.no_grad(), cached_context_projections(unet):
        unet(x, t, context)
        other = context.clone()
        expected = unet(x, t, other)  # another tensor with equal values: projected again, same output
        context.mul_(2)  # in place: its version changes
        changed = unet(x, t, context)
        original = layer.to_v.weight.clone()
        layer.to_v.weight.add_(0.5)  # e.g. a LoRA fused between steps
        after_weight = unet(x, t, context)
    layers = sum(isinstance(m, CrossAttention) and m.to_k.in_features == 16 for m in unet.modules())
    assert calls[0] == 3 * layers + 1  # the changed weight: only its layer projects again
    with torch.no_grad():
        assert not torch.equal(changed, after_weight)
        assert torch.equal(after_weight, unet(x, t, context))  # the uncached result with the new weight
        layer.to_v.weight.copy_(original)
        assert torch.equal(changed, unet(x, t, context)) and not torch.equal(changed, expected)


def test_training_with_autograd_is_never_cached() -> None:
    unet, (x, t, context) = small_unet(), inputs()
    calls = count_context_projections(unet)
    with cached_context_projections(unet):
        unet(x, t, context).square().mean().backward()
        unet(x, t, context)
    assert calls[0] == 2 * sum(isinstance(m, CrossAttention) and m.to_k.in_features == 16 for m in unet.modules())


def test_guidance_builds_its_batch_once_so_the_cache_holds_over_steps() -> None:
    unet, (x, _, context) = small_unet(), inputs()
    calls = count_context_projections(unet)
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    cfg = ClassifierFreeGuidance(Denoiser(lambda x, t, c: unet(x, t, c["context"]), schedule),
                                 {"context": context}, {"context": torch.zeros_like(context)}, scale=5.0)
    layers = sum(isinstance(m, CrossAttention) and m.to_k.in_features == 16 for m in unet.modules())
    with torch.no_grad(), cached_context_projections(unet):
        for sigma in (10.0, 5.0, 1.0):
            cfg.denoise(x, sigma)
    assert calls[0] == layers


# prompt embeddings kept across calls (pipelines.prompt_cache)


def encoder_calls(pipe) -> list[int]:
    calls = [0]
    pipe.models.text_encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_same_prompts_are_encoded_once_across_calls() -> None:
    from sd_fixtures import small_models

    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(small_models())
    calls = encoder_calls(pipe)
    call = dict(num_inference_steps=2, seed=0, output_type="np", progress=False)
    first = pipe("a red circle", negative_prompt="blue", **call).images
    n = calls[0]
    again = pipe("a red circle", negative_prompt="blue", **call).images
    assert calls[0] == n and (first == again).all()
    pipe("a red square", negative_prompt="blue", **call)  # other prompts: encoded
    assert calls[0] > n
    pipe.set_fast_path(False)
    n = calls[0]
    plain = pipe("a red circle", negative_prompt="blue", **call).images
    assert calls[0] > n and np.abs(plain - first).max() <= 1e-5  # the plain path: contiguous VAE convolutions


def test_a_changed_text_encoder_is_never_served_from_the_cache() -> None:
    from sd_fixtures import small_models

    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(small_models())
    cond, _ = pipe.encode_prompts(["a red circle"], [""])
    weight = pipe.models.text_encoder.final_norm.weight if hasattr(pipe.models.text_encoder, "final_norm") else next(
        pipe.models.text_encoder.parameters())
    with torch.no_grad():
        weight.data.mul_(1.5)  # through .data: no version bump; the sampled values show the change
    changed, _ = pipe.encode_prompts(["a red circle"], [""])
    assert not torch.equal(changed, cond)
    pipe.set_fast_path(False)
    assert torch.equal(pipe.encode_prompts(["a red circle"], [""])[0], changed)  # what the uncached path gives
