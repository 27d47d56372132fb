"""Speed of the shipped demo model on this machine: one 64×64 image in 25 dpmpp_2m steps with
classifier-free guidance inside a warm Python process (median of runs), and the whole
``ldm generate`` command from a cold start (fresh process, median of runs).

    OMP_NUM_THREADS=N python benchmarks/demo_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def warm(runs: int) -> list[float]:
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained("demo")
    pipe("a red circle in the top left", num_inference_steps=25, progress=False)  # warm-up
    times = []
    for seed in range(runs):
        start = time.perf_counter()
        pipe("a red circle in the top left", num_inference_steps=25, seed=seed, progress=False)
        times.append(time.perf_counter() - start)
    return times


def cold(runs: int) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(runs):
            command = [sys.executable, "-m", "ldm_toolkit.cli", "generate", "a red circle in the top left",
                       "--seed", str(seed), "-o", str(Path(tmp) / "out.png")]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import torch

    warm_times, cold_times = warm(args.runs), cold(args.runs)
    print(json.dumps({"threads": torch.get_num_threads(), "warm_25_steps_s": statistics.median(warm_times),
                      "warm_all_s": [round(t, 3) for t in warm_times],
                      "cold_ldm_generate_s": statistics.median(cold_times),
                      "cold_all_s": [round(t, 3) for t in cold_times]}, indent=2))


if __name__ == "__main__":
    main()
