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


def diffusers_v1_pipeline(tmp: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = DiffusersVAE(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    for seed, module in enumerate((unet, vae, text)):
        randomize(module, seed)
    tokenizer = CLIPTokenizer.from_pretrained(ClipTokenizer().save_hf(tmp / "tok"))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
