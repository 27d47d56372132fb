"""Peak memory and time of text-to-image at the native size and at 4× its area, with and
without tiled VAE decoding, on a random-weight SD v1-layout model at reduced width.

Each case runs in its own process so that its peak resident memory (CPU) or peak CUDA
allocation is its own.

    python benchmarks/pipeline_memory.py                 # CPU
    python benchmarks/pipeline_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = [("native", 1, None), ("4x area", 2, None), ("4x area, tiled", 2, 32)]


def build(device: str):
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
        AutoencoderKL(AutoencoderConfig(base_channels=64)).eval(),
        ScheduleConfig(beta_start=0.00085, beta_end=0.012),
        sample_size=32,
        text_encoder=TextEncoder(TextEncoderConfig(layers=2)).eval(),
        tokenizer=ClipTokenizer(),
    )
    return TextToImagePipeline(models, device=device)


def run_case(device: str, scale: int, tile: int | None) -> dict:
    import torch

    pipe = build(device)
    side = 256 * scale
    start = time.perf_counter()
    pipe("a red circle", num_inference_steps=5, height=side, width=side, tile=tile, progress=False)
    seconds = time.perf_counter() - start
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"side": side, "tile": tile, "seconds": round(seconds, 2), "peak_mb": round(peak_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        _, scale, tile = CASES[args.case]
        print(json.dumps(run_case(args.device, scale, tile)))
        return
    print(f"{'case':<16}{'image':>10}{'seconds':>10}{'peak MB':>10}")
    for i, (name, _, _) in enumerate(CASES):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--case", str(i)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<16}{r['side']:>6}x{r['side']:<3}{r['seconds']:>10}{r['peak_mb']:>10}")


if __name__ == "__main__":
    main()
