"""Ship a trained demo ControlNet: its diffusers folder in float16 with its settings file naming the base model.

    python configs/demo/ship_controlnet.py runs/demo/controlnet/model pipelines/weights/demo-controlnet
"""

import json
import shutil
import sys
from pathlib import Path

from ldm.io.controlnet_keys import read_controlnet, write_controlnet_diffusers

source, target = Path(sys.argv[1]), Path(sys.argv[2])
net = read_controlnet(source).half()
if target.exists():
    shutil.rmtree(target)
write_controlnet_diffusers(net, target)
settings = json.loads((source / "controlnet.json").read_text())
settings["base_model"] = "demo"  # the shipped text-to-image model it was trained on
(target / "controlnet.json").write_text(json.dumps(settings, indent=2) + "\n")
print(f"{target}: {sum(p.stat().st_size for p in target.iterdir()) / 2**20:.1f} MB")
