"""Training samples per second of the demo text-to-image config (configs/demo/text-to-image.yaml) under each
speed-up, one after another in one process: a jointly trained text encoder with every image encoded each step
(as the earlier demo trained), then cached latents, a frozen encoder with cached contexts, channels_last, and
torch.compile of the U-Net. Each variant times ``--steps`` optimizer steps (loss, backward, AdamW, EMA) after
its caches are warm and ``--warmup`` steps; the text encoder is a freshly initialised one of the domain CLIP's
text tower size, so no trained weights are needed.

    OMP_NUM_THREADS=2 python benchmarks/demo_training_speed.py [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "text-to-image.yaml"
JOINT = ["model.text_encoder_from=null", "model.text_encoder={width: 64, layers: 4, heads: 4, max_length: 32}"]
VARIANTS = {
    "joint encoder, encode every image": JOINT + ["model.train_text_encoder=true", "cache_latents=false"],
    "joint encoder, cached latents": JOINT + ["model.train_text_encoder=true"],
    "frozen encoder, cached latents and contexts": JOINT,
    "+ channels_last": JOINT,
    "+ torch.compile": JOINT,
}


def build(sets: list[str], batch: int) -> tuple[Any, Any, Any]:
    from ldm.training.config import load_train_config
    from ldm_toolkit.train import build_dataset, build_task

    config = load_train_config(CONFIG, sets=sets + [f"optim.batch_size={batch}", "data.length=4096"])
    torch.manual_seed(0)
    return config, build_task("diffusion", config, str(CONFIG)), build_dataset(config.data)


def time_variant(name: str, sets: list[str], steps: int, warmup: int, batch: int) -> float:
    from ldm.training.ema import EMA
    from ldm.training.loop import collate, step_generator

    config, task, dataset = build(sets, batch)
    unet = task.models.unet
    if name in ("+ channels_last", "+ torch.compile"):
        unet.to(memory_format=torch.channels_last)
    if name == "+ torch.compile":
        task.models.unet = torch.compile(unet)
    params = [p for group in task.groups() for m in group for p in m.parameters() if p.requires_grad]
    optimizer, ema = torch.optim.AdamW(params, lr=1e-4), EMA(unet, 0.998)
    batches = [collate([dataset[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(2)]
    for b, indices in zip(batches, (range(batch), range(batch, 2 * batch))):
        b["index"] = torch.tensor(list(indices))

    def step(k: int) -> None:
        loss = task.loss(0, batches[k % 2], step_generator(0, k, 0, 0), k)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet)

    for k in range(warmup):  # fills the caches and, for torch.compile, compiles
        step(k)
    start = time.perf_counter()
    for k in range(steps):
        step(k)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    results = {}
    for name, sets in VARIANTS.items():
        results[name] = round(time_variant(name, sets, args.steps, args.warmup, args.batch), 1)
        print(f"{name}: {results[name]} samples/s", flush=True)
    base = results["joint encoder, encode every image"]
    print(json.dumps({"samples_per_s": results, "speedup": {k: round(v / base, 2) for k, v in results.items()},
                      "threads": torch.get_num_threads(), "batch": args.batch}, indent=2))


if __name__ == "__main__":
    main()
