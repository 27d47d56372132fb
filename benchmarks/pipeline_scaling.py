"""How the cost of our text-to-image call grows with the image size and the batch, with its peak memory.

The weights of benchmarks/pipeline_vs_diffusers.py (SD v1 layout, width 64, random), 10 DDIM steps, guidance 7.5,
the exact fast path; per setting the median of ``--runs`` calls after a warm-up, and the peak resident memory of
the setting's first call above the resident memory before it (Linux: the peak is reset through
/proc/self/clear_refs and read as VmHWM).

    OMP_NUM_THREADS=2 python benchmarks/pipeline_scaling.py [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_vs_diffusers import load_pipelines  # noqa: E402

SETTINGS = [(128, 1), (256, 1), (384, 1), (512, 1), (256, 2), (256, 4)]  # (side, batch)


def status_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    pipe, _ = load_pipelines(with_diffusers=False)
    rows = []
    for side, batch in SETTINGS:
        call = dict(num_inference_steps=10, guidance_scale=7.5, sampler="ddim", height=side, width=side,
                    guidance_interval=(0.0, None), progress=False, output_type="np")
        reset_peak()
        before = status_mb("VmRSS")
        pipe(["a red circle"] * batch, seed=0, **call)
        grown = status_mb("VmHWM") - before
        times = []
        for seed in range(args.runs):
            start = time.perf_counter()
            pipe(["a red circle"] * batch, seed=seed, **call)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"side": side, "batch": batch, "median_s": round(median, 3),
                     "per_image_s": round(median / batch, 3), "peak_above_before_mb": round(grown)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
