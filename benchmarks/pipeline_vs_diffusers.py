"""Time our text-to-image pipeline against diffusers' StableDiffusionPipeline on the same weights, in one process.

SD v1 layout at a reduced width (U-Net and VAE ``--width`` 64: blocks 64/128/256/256), the SD v1 CLIP text encoder
(768 wide, 12 layers), random weights saved once as a diffusers folder that both pipelines load. One call: batch
``--batch`` prompts with negative prompts, classifier-free guidance 7.5, ``--steps`` DDIM steps, ``--size``² pixels,
the same initial latents. After a warm-up call each, the two pipelines alternate (which goes first alternates too)
for ``--pairs`` pairs; the report is each one's median and the median of the per-pair ratios ours / diffusers
(< 1: ours is faster), and the largest pixel difference of the images (in [0, 1]).

    OMP_NUM_THREADS=2 python benchmarks/pipeline_vs_diffusers.py
    OMP_NUM_THREADS=2 python benchmarks/pipeline_vs_diffusers.py --fast-path off      # today's exact path
    OMP_NUM_THREADS=2 python benchmarks/pipeline_vs_diffusers.py --compile            # both compiled
    python benchmarks/pipeline_vs_diffusers.py --device cuda --dtype fp16 --size 512 --steps 50 --width 320
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = ["a red circle in the top left", "a large blue square above a small green triangle"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64,
                   help="VAE base width, and the U-Net's unless --unet-width (SD: 128)")
    p.add_argument("--unet-width", type=int, default=None, help="U-Net base width (SD: 320; default: --width)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--fast-path", choices=["on", "off"], default="on",
                   help="ours: the exact fast path (off: the plain path, subpixel upsampling too)")
    p.add_argument("--compile", action="store_true", help="torch.compile both (ours: compile=True)")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                   help="ours with DeepCache at interval N (approximate: the image difference is then not a parity)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    return p.parse_args()


def build_diffusers_folder(folder: Path, width: int, unet_width: int | None = None) -> None:
    """Random SD v1-layout weights (VAE base ``width``, U-Net ``unet_width`` or ``width``), saved as a diffusers
    StableDiffusionPipeline folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.conditioning.tokenizer import ClipTokenizer

    torch.manual_seed(0)
    widths = (width, 2 * width, 4 * width, 4 * width)
    u = unet_width or width
    unet = UNet2DConditionModel(block_out_channels=(u, 2 * u, 4 * u, 4 * u), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=min(32, u), sample_size=64)
    vae = AutoencoderKL(block_out_channels=widths, layers_per_block=2, latent_channels=4,
                        norm_num_groups=min(32, width), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    with torch.no_grad():  # no zero-initialised layer stays zero
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
    tokenizer = CLIPTokenizer.from_pretrained(ClipTokenizer().save_hf(folder / "_tokenizer"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder / "sd")


def load_pipelines(width: int = 64, unet_width: int | None = None, dtype: torch.dtype = torch.float32,
                   with_diffusers: bool = True, **ours_options: object) -> tuple[object, object | None]:
    """Our TextToImagePipeline and (``with_diffusers``) diffusers' StableDiffusionPipeline on the same random
    weights, built once in a temporary folder (``ours_options``: from_pretrained's)."""
    from diffusers import StableDiffusionPipeline

    from pipelines import TextToImagePipeline

    with tempfile.TemporaryDirectory() as tmp:
        build_diffusers_folder(Path(tmp), width, unet_width)
        theirs = (StableDiffusionPipeline.from_pretrained(Path(tmp) / "sd", torch_dtype=dtype, local_files_only=True)
                  if with_diffusers else None)
        ours = TextToImagePipeline.from_pretrained(Path(tmp) / "sd", torch_dtype=dtype, **ours_options)
    return ours, theirs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[float, np.ndarray]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main() -> None:
    args = parse_args()
    from ldm.modules.upsample import set_subpixel_upsample

    set_subpixel_upsample(args.fast_path == "on")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = load_pipelines(args.width, args.unet_width, dtype, device=device, fast=args.fast_path == "on",
                                  compile=args.compile)
    if args.deep_cache:
        ours.enable_deep_cache(args.deep_cache)
    theirs = theirs.to(device)
    theirs.set_progress_bar_config(disable=True)
    if args.compile:
        theirs.unet = torch.compile(theirs.unet)
    latent = args.size // 8
    latents = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    call = dict(negative_prompt=["blurry"] * args.batch, num_inference_steps=args.steps, guidance_scale=7.5,
                height=args.size, width=args.size, output_type="np")
    fns = {"ours": lambda: ours(PROMPTS[: args.batch], latents=latents.to(device, dtype), sampler="ddim",
                                guidance_interval=(0.0, None), progress=False, **call).images,
           "diffusers": lambda: theirs(PROMPTS[: args.batch], latents=latents.to(device, dtype), **call).images}
    warm = {name: timed(fn, device) for name, fn in fns.items()}  # the first call: warm-up (compilation)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(args.pairs):
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            seconds, _ = timed(fns[name], device)
            times[name].append(seconds)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    report = {
        "setting": f"SD v1 layout U-Net width {args.unet_width or args.width}, VAE {args.width}, "
                   f"{args.size}x{args.size}, {args.steps} DDIM steps, batch "
                   f"{args.batch}, guidance 7.5, {args.device} {args.dtype}, {torch.get_num_threads()} threads",
        "fast_path": args.fast_path, "compile": args.compile, "deep_cache": args.deep_cache,
        "first_call_s": {name: round(w[0], 3) for name, w in warm.items()},
        "median_s": {name: round(statistics.median(ts), 4) for name, ts in times.items()},
        "all_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "ratio_median": round(statistics.median(ratios), 4),
        "max_abs_image_difference": float(np.abs(warm["ours"][1].astype(np.float64) - warm["diffusers"][1]).max()),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
