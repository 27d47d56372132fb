"""Interim measure of a demo ControlNet checkpoint (until `ldm eval` has a controlnet task): on N held-out scenes
(data seed 1000) the map is the hint and the full caption the prompt; reports the foreground IoU of the map and
the generated image's object pixels, and the share of the map's objects drawn with the caption's colour and shape.

    python configs/demo/controlnet_eval.py runs/demo/controlnet/checkpoints/step-00001250/model 60
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import detect_objects, make_sample, object_mask
from pipelines import ControlNetPipeline
from pipelines.training.controlnet import render_hint

ckpt, n = Path(sys.argv[1]), int(sys.argv[2])
pipe = ControlNetPipeline.from_pretrained("demo", controlnet=ckpt)
samples = [make_sample(1000, i, 0.5, drop_prob=0.0) for i in range(n)]
ious, colours = [], []
for start in range(0, n, 20):
    batch = samples[start:start + 20]
    hints = [render_hint(torch.from_numpy(s.semantic.astype(np.int64))[None])[0] for s in batch]
    prompts = [s.full_caption for s in batch]
    images = pipe(prompts, hints, seed=7 + start, output_type="np", progress=False).images
    for s, im in zip(batch, images):
        im8 = (im * 255).round().astype(np.uint8)
        mask, want = object_mask(im8), s.semantic > 0
        ious.append((mask & want).sum() / max((mask | want).sum(), 1))
        found = detect_objects(im8)
        colours.append(np.mean([any(o.colour == w.colour and o.shape == w.shape for o in found) for w in s.objects]))
print(json.dumps({"checkpoint": ckpt.parent.name, "pairs": n, "foreground_iou": round(float(np.mean(ious)), 3),
                  "colour_and_shape": round(float(np.mean(colours)), 3)}))
