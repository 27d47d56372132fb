#!/usr/bin/env bash
# GPU speed against diffusers on the same random SD1.5-size weights (U-Net width 320, VAE 128), 512x512, 50 DDIM
# steps, batch 1, guidance 7.5, fp16: one table of it/s (steps per second of the whole call) for diffusers default,
# diffusers + torch.compile, ours exact, ours + compile, ours + DeepCache. Sized for ten minutes of device time on
# an A100/H100-class GPU (three runs of 1 warm-up + 3 pairs of 50-step calls; compilation is most of it).
#   bash benchmarks/gpu_speed.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-gpu-speed}}
mkdir -p "$out"
common=(--device cuda --dtype fp16 --size 512 --steps 50 --batch 1 --width 128 --pairs 3)
# --width sets the VAE's base width (SD: 128); the U-Net's is 2.5x it in SD, see --unet-width
python benchmarks/pipeline_vs_diffusers.py "${common[@]}" --unet-width 320 --json "$out/exact.json"
python benchmarks/pipeline_vs_diffusers.py "${common[@]}" --unet-width 320 --compile --json "$out/compile.json"
python benchmarks/pipeline_vs_diffusers.py "${common[@]}" --unet-width 320 --deep-cache 6 --json "$out/deep-cache.json"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name in ("exact", "compile", "deep-cache"):
    r = json.loads((out / f"{name}.json").read_text())
    steps = int(r["setting"].split(" DDIM")[0].split()[-1])
    for who in ("diffusers", "ours"):
        if name == "deep-cache" and who == "diffusers":
            continue  # the same diffusers default as in the exact run
        label = {"exact": {"diffusers": "diffusers default", "ours": "ours exact"},
                 "compile": {"diffusers": "diffusers + compile", "ours": "ours + compile"},
                 "deep-cache": {"ours": "ours + DeepCache 6"}}[name][who]
        rows.append((label, steps / r["median_s"][who], r["first_call_s"][who]))
print("| pipeline | it/s (whole call) | first call s |\n|---|---|---|")
for label, its, first in rows:
    print(f"| {label} | {its:.1f} | {first:.1f} |")
PY
