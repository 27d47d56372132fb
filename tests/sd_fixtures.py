"""Small random-weight Stable Diffusion models in diffusers' classes, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.conditioning.tokenizer import ClipTokenizer

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale_param = p.ndim == 1 and name.endswith("weight")  # norm scales stay near 1
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if scale_param else 0.0))


def diffusers_v1_pipeline(tmp: Path, in_channels: int = 4) -> StableDiffusionPipeline:
    """``in_channels`` 9: the SD inpainting U-Net layout (latents, mask, masked image latents)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = DiffusersVAE(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4))
    for seed, module in enumerate((unet, vae, text)):
        randomize(module, seed)
    tokenizer = CLIPTokenizer.from_pretrained(ClipTokenizer().save_hf(tmp / "tok"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def small_models(concat: dict | None = None, text: bool = True, classifier: bool = False, seed: int = 0):
    """Our own small random-weight models: f=2 autoencoder, 8×8 latents, optional parts."""
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.conditioning.text import TextEncoder, TextEncoderConfig
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.classifier import ClassifierConfig, NoiseAwareClassifier
    from ldm.modules.unet import UNet, UNetConfig
    from pipelines import Models

    torch.manual_seed(seed)
    extra = {"image": 3, "semantic": (concat or {}).get("num_classes", 0)}.get((concat or {}).get("kind"), 0)
    unet = UNet(UNetConfig(in_channels=4 + extra, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(0,), num_heads=2, context_dim=32, norm_groups=8))
    vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    parts = {}
    if text:
        parts["text_encoder"] = TextEncoder(TextEncoderConfig(width=32, layers=2, heads=4))
        parts["tokenizer"] = ClipTokenizer()
    if classifier:
        config = ClassifierConfig(model_channels=16, channel_mult=(1, 2), num_classes=3, norm_groups=8)
        parts["classifier"] = NoiseAwareClassifier(config)
        parts["class_names"] = ["circle", "square", "triangle"]
    for i, module in enumerate([unet, vae] + [m for m in parts.values() if isinstance(m, torch.nn.Module)]):
        randomize(module, seed + i)
    models = Models(unet, vae, ScheduleConfig(beta_start=0.00085, beta_end=0.012), 8, concat=concat, **parts)
    for module in (models.unet, models.vae, models.text_encoder, models.classifier):
        if module is not None:
            module.eval()
    return models


def small_v2_models():
    """Our own small random-weight SD v2 layout: OpenCLIP text tower (penultimate layer), linear projections in
    the transformers, v-prediction."""
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.conditioning.text import TextEncoder, TextEncoderConfig
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.unet import UNet, UNetConfig
    from pipelines import Models

    torch.manual_seed(3)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                           num_heads=None, head_dim=16, context_dim=64, use_linear_projection=True, norm_groups=8))
    vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    text = TextEncoder(TextEncoderConfig(kind="openclip", width=64, layers=3, heads=4, act="gelu", layer="penultimate"))
    for seed, module in enumerate((unet, vae, text)):
        randomize(module, seed)
    return Models(unet.eval(), vae.eval(), ScheduleConfig(beta_start=0.00085, beta_end=0.012, prediction_type="v"), 8,
                  text_encoder=text.eval(), tokenizer=ClipTokenizer(pad_token_id=0))
