#!/usr/bin/env bash
# Continue the demo text-to-image model on a lent GPU (the device tool: one H200, 10 minutes a command) and bring
# the weights back under $OUT. Prepared for a session that is lent the machine; not yet run on one (see
# docs/demo-training.md, "Across sessions"). The CPU path (build.sh) rebuilds everything without it.
#
# The device image has torch, transformers, accelerate, peft, safetensors; it lacks open_clip_torch (the CLIP
# vocabulary), ftfy and wcwidth (its text clean-up) and diffusers. Download their wheels here first (see the
# device README, "a Python package missing there") into .whl/, ignored by git, and carry it:
#   run(command="bash configs/demo/gpu.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# From the shipped weights, bf16, 8x the CPU batch at 2x the rate, no adherence curve inside the time limit
# (the checkpoints are evaluated afterwards on the CPU); timeout leaves a minute for the copy back.
timeout 480 python3 -m ldm_toolkit.train configs/demo/text-to-image.yaml --output-dir "$OUT/run" \
  --set model.init_from=pipelines/weights/demo --set model.text_encoder_from=null --set model.autoencoder_from=null \
  --set optim.mixed_precision=bf16 --set optim.batch_size=512 \
  --set optim.lr=1.2e-3 --set optim.warmup_steps=50 --set optim.max_steps=100000 --set checkpoint_every=500 \
  --set keep_checkpoints=1 --set eval_every=0 --set data.length=200000 --set data.seed=6 --set tracker=null \
  | tee "$OUT/train.log" || true   # stopped by the timeout: the newest checkpoint is the result
last=$(ls -d "$OUT"/run/checkpoints/step-* | tail -1)
python3 -m ldm_toolkit.cli convert "$last/model" "$OUT/demo" --to folder --half
cp "$OUT/run/log.jsonl" "$OUT/demo/log.jsonl"
rm -rf "$OUT/run"
