"""Time one training step (forward, backward, AdamW) of our U-Net against the same loop on
diffusers' UNet2DConditionModel with the same weights, inputs and optimizer settings.

SD v1 layout at a reduced width (model_channels 128 by default), batch 2, 32×32 latents, ε loss;
runs alternate between the two after warm-up and the medians are compared (ours/diffusers < 1:
ours is faster).

    python benchmarks/train_step_vs_diffusers.py
    python benchmarks/train_step_vs_diffusers.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ldm.io.unet_keys import unet_config_to_diffusers, unet_original_to_diffusers
from ldm.modules import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(model: torch.nn.Module, call: Callable, x, t, context, target) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        loss = F.mse_loss(call(x, t, context).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = p.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = UNetConfig(model_channels=args.model_channels)
    torch.manual_seed(0)
    ours = UNet(config)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(config))
    theirs.load_state_dict(unet_original_to_diffusers(ours.state_dict(), config), strict=True)
    ours, theirs = (m.to(device, dtype).train() for m in (ours, theirs))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device, dtype)
    context = torch.randn(args.batch, 77, config.context_dim, generator=g).to(device, dtype)
    target = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device)
    t = torch.tensor([999, 10] * args.batch)[: args.batch].to(device)
    steps = {
        "ours": make_step(ours, lambda x, t, c: ours(x, t, c), x, t, context, target),
        "diffusers": make_step(theirs, lambda x, t, c: theirs(x, t, encoder_hidden_states=c).sample, x, t, context,
                               target),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(2):
        for fn in steps.values():
            fn()
    for _ in range(args.runs):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"train step, SD v1 layout mc={args.model_channels}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.device} {args.dtype}: ours {ours_s * 1000:.0f} ms, diffusers {theirs_s * 1000:.0f} ms, "
          f"ratio ours/diffusers = {ours_s / theirs_s:.3f} (median of {args.runs})")


if __name__ == "__main__":
    main()
