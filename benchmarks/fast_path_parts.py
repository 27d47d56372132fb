"""Each part of the exact fast path alone, beside diffusers' component on the same weights, in one process.

The weights of benchmarks/pipeline_vs_diffusers.py (SD v1 layout, width 64, 256² images: 32×32 latents, batch 2
with guidance: U-Net batch 4). Timed, median of ``--runs`` after a warm-up, alternating:
- U-Net, 10 steps with the same text context: diffusers; ours plain; ours with the context's keys and values once;
- VAE decode of 2 latents: diffusers; ours plain (NCHW, out-of-place, upsample then conv); channels-last; + in place
  SiLU/add; + fused ×2 upsampling (the default);
- text: encoding the prompt and negative pairs, plain and from the prompt cache.

    OMP_NUM_THREADS=2 python benchmarks/fast_path_parts.py [--runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_vs_diffusers import PROMPTS, load_pipelines  # noqa: E402


def median_times(fns: dict[str, Callable[[], object]], runs: int,
                 setups: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median seconds of each ``fns[name]()`` over ``runs`` alternating rounds after a warm-up; ``setups[name]()``
    runs before each call, outside the timing."""
    setups = setups or {}
    for name, fn in fns.items():
        setups.get(name, lambda: None)()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs):
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            setups.get(name, lambda: None)()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(ts), 4) for name, ts in times.items()}


def unet_parts(ours: torch.nn.Module, theirs: torch.nn.Module, runs: int) -> dict[str, float]:
    from ldm.modules.attention import cached_context_projections

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(4, 4, 32, 32, generator=g), torch.randn(4, 77, 768, generator=g)
    steps = [torch.full((4,), t) for t in range(901, 0, -100)]

    def plain() -> None:
        for t in steps:
            ours(x, t, context)

    def cached() -> None:
        with cached_context_projections(ours):
            for t in steps:
                ours(x, t, context)

    def diffusers() -> None:
        for t in steps:
            theirs(x, t, encoder_hidden_states=context)

    return median_times({"diffusers": diffusers, "ours_plain": plain, "ours_context_kv_once": cached}, runs)


def vae_parts(vae: torch.nn.Module, theirs: torch.nn.Module, runs: int) -> dict[str, float]:
    import autoencoder.model as model
    from ldm.modules import upsample

    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))

    def setup(channels_last: bool, in_place: bool, subpixel: bool) -> Callable[[], None]:
        def apply() -> None:
            vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            upsample.set_subpixel_upsample(subpixel)
            model.IN_PLACE = in_place
        return apply

    variants = {"ours_plain": (False, False, False), "ours_channels_last": (True, False, False),
                "ours_channels_last_in_place": (True, True, False),
                "ours_channels_last_in_place_fused_upsample": (True, True, True),
                "ours_nchw_in_place_fused_upsample": (False, True, True)}
    fns = {"diffusers": lambda: theirs.decode(z), **{name: lambda: vae.decode(z) for name in variants}}
    setups = {"diffusers": setup(True, True, True), **{name: setup(*flags) for name, flags in variants.items()}}
    times = median_times(fns, runs, setups)
    model.IN_PLACE = True
    upsample.set_subpixel_upsample(True)
    return times


def text_parts(pipe: object, runs: int) -> dict[str, float]:
    negatives = ["blurry"] * len(PROMPTS)

    def encode() -> object:
        return pipe.encode_prompts(PROMPTS, negatives)

    return median_times({"ours_plain": encode, "ours_prompt_cache": encode}, runs,
                        {"ours_plain": lambda: pipe.set_fast_path(False),
                         "ours_prompt_cache": lambda: pipe.set_fast_path(True)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    ours, theirs = load_pipelines()
    with torch.inference_mode():
        report = {"threads": torch.get_num_threads(),
                  "unet_10_steps_s": unet_parts(ours.models.unet, theirs.unet, args.runs),
                  "vae_decode_s": vae_parts(ours.models.vae, theirs.vae, args.runs)}
    report["text_encode_s"] = text_parts(ours, args.runs)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
