"""Time our SD U-Net against diffusers' UNet2DConditionModel on the same weights.

SD v1 layout at a reduced width (default model_channels 128), random weights, one forward per
run under ``torch.inference_mode``; runs alternate between the two models after warm-up and the
median of each is reported, with the ratio ours / diffusers (< 1: ours is faster).

    python benchmarks/unet_vs_diffusers.py                      # CPU, float32 (after pip install -e .)
    python benchmarks/unet_vs_diffusers.py --device cuda --dtype bf16 --compile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from ldm.io.unet_keys import unet_config_to_diffusers, unet_original_to_diffusers
from ldm.modules import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args()


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call; CPU time is robust to other
    processes taking the cores (with one thread it is the compute cost; with more it counts spin-waits)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = UNetConfig(model_channels=args.model_channels)
    torch.manual_seed(0)
    ours = UNet(config)
    with torch.no_grad():  # random weights everywhere, including the zero-initialised convs
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(config))
    theirs.load_state_dict(unet_original_to_diffusers(ours.state_dict(), config), strict=True)
    ours, theirs = (m.to(device, dtype).eval() for m in (ours, theirs))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device, dtype)
    t = torch.tensor([999, 500] * args.batch)[: args.batch].to(device)
    context = torch.randn(args.batch, 77, config.context_dim, generator=g).to(device, dtype)
    run_ours: Callable = torch.compile(ours) if args.compile else ours
    run_theirs: Callable = torch.compile(theirs) if args.compile else theirs
    fns = {
        "ours": lambda: run_ours(x, t, context),
        "diffusers": lambda: run_theirs(x, t, encoder_hidden_states=context).sample,
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    with torch.inference_mode():
        diff = (fns["ours"]().float() - fns["diffusers"]().float()).abs().max().item()
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        for i in range(args.runs):
            for name in list(fns)[:: 1 if i % 2 == 0 else -1]:  # alternate which model goes first
                times[name].append(timed(fns[name], device))
    wall = {name: statistics.median(w for w, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"SD v1 layout, model_channels={args.model_channels} ({params:.1f}M params), batch {args.batch}, "
          f"{args.size}x{args.size} latents, {device} {args.dtype}{' compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads, median of {args.runs}")
    for name in fns:
        best = min(w for w, _ in times[name])
        print(f"  {name:10s} wall {1e3 * wall[name]:8.1f} ms (min {1e3 * best:.1f})   cpu {1e3 * cpu[name]:8.1f} ms")
    print(f"  max |ours - diffusers| = {diff:.2e}")
    print(f"  ratio ours / diffusers = {wall['ours'] / wall['diffusers']:.3f} (wall), "
          f"{cpu['ours'] / cpu['diffusers']:.3f} (cpu)")


if __name__ == "__main__":
    main()
