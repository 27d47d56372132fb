"""Peak memory and time of each memory switch, each case in its own process (so that its peak is its own):

- the Stable Diffusion VAE (random weights, SD v1 layout: 128 base channels, f = 8) decoding one 1024x1024 image
  whole and in tiles (``enable_vae_tiling``: 64-latent tiles overlapping by 16);
- text-to-image on a reduced-width SD v1-layout model at 512x512, batch 2, 5 steps: plain, attention slicing,
  VAE slicing, VAE tiling.

    OMP_NUM_THREADS=2 python benchmarks/pipeline_memory.py                 # CPU: peak resident memory
    python benchmarks/pipeline_memory.py --device cuda                     # GPU: peak CUDA allocation
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = {
    "vae 1024, whole": ("vae", None),
    "vae 1024, tiled": ("vae", "tiling"),
    "t2i 512 x2, plain": ("t2i", None),
    "t2i 512 x2, attention slicing": ("t2i", "attention"),
    "t2i 512 x2, vae slicing": ("t2i", "vae_slicing"),
    "t2i 512 x2, vae tiling": ("t2i", "tiling"),
}


def _pipeline(device: str):
    import torch

    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.conditioning.text import TextEncoder, TextEncoderConfig
    from ldm.conditioning.tokenizer import ClipTokenizer
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.unet import UNet, UNetConfig
    from pipelines import Models, TextToImagePipeline

    torch.manual_seed(0)
    models = Models(
        UNet(UNetConfig(model_channels=64, num_heads=4)).eval(),
        AutoencoderKL(AutoencoderConfig()).eval(),  # the SD VAE's layout
        ScheduleConfig(beta_start=0.00085, beta_end=0.012),
        sample_size=64,
        text_encoder=TextEncoder(TextEncoderConfig(layers=2)).eval(),
        tokenizer=ClipTokenizer(),
    )
    return TextToImagePipeline(models, device=device)


def run_case(device: str, name: str) -> dict:
    import torch

    kind, switch = CASES[name]
    pipe = _pipeline(device)
    if switch == "attention":
        pipe.enable_attention_slicing()
    elif switch == "vae_slicing":
        pipe.enable_vae_slicing()
    elif switch == "tiling":
        pipe.enable_vae_tiling(64)
    start = time.perf_counter()
    with torch.no_grad():
        if kind == "vae":
            z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0)).to(device)
            pipe.decode(z * pipe.vae.config.scale_factor, "pt")
        else:
            pipe("a red circle", num_inference_steps=5, num_images_per_prompt=2, seed=0, progress=False)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": round(seconds, 1), "peak_mb": round(peak_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.device, args.case)))
        return
    print(f"| case | seconds | peak MB ({'CUDA allocated' if args.device.startswith('cuda') else 'resident'}) |")
    print("|---|---|---|")
    for name in CASES:
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--case", name],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {name} | {r['seconds']} | {r['peak_mb']} |", flush=True)


if __name__ == "__main__":
    main()
