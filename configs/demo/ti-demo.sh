#!/usr/bin/env bash
# Adapters on the demo model, from 64 pictures of orange triangles (training scenes, data seed 0):
# - textual inversion: a token learned from captions that never name the shape ("a <orange-tri> in the top left");
# - LoRA (rank 4): the same pictures captioned without the colour ("a triangle in the top left"), so that it makes
#   triangles orange. Then counts how often each draws what it learned, before and after.
#   bash configs/demo/ti-demo.sh [WORK_DIR]      # about 2 min on 2 CPU threads; writes docs/ti-demo.json
set -euo pipefail
work="${1:-runs/demo/ti-demo}"
mkdir -p "$work"
python - "$work" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
from ldm.data.shapes import make_sample
root = Path(sys.argv[1]) / "images"
root.mkdir(parents=True, exist_ok=True)
lines, plain, index = [], [], 0
while len(lines) < 64:  # one-object training scenes (data seed 0) with an orange triangle
    s = make_sample(0, index, 0.0, drop_prob=0.0, image_size=64)
    index += 1
    (obj,) = s.objects
    if (obj.colour, obj.shape) != ("orange", "triangle"):
        continue
    name = f"{len(lines):03d}.png"
    Image.fromarray(s.image).save(root / name)
    lines.append(json.dumps({"file_name": name, "text": s.full_caption.replace("orange triangle", "<orange-tri>")}))
    plain.append(json.dumps({"file_name": f"../images/{name}", "text": s.full_caption.replace("orange ", "")}))
(root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
lora = Path(sys.argv[1]) / "lora-images"  # the same pictures captioned "a triangle …": the LoRA makes triangles orange
lora.mkdir(exist_ok=True)
for line in plain:
    entry = json.loads(line)
    name = Path(entry["file_name"]).name
    (lora / name).write_bytes((root / name).read_bytes())
    entry["file_name"] = name
    with open(lora / "metadata.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
PY
ldm train-ti configs/demo/ti-smoke.yaml --output-dir "$work/run" --set model.init_from=demo \
    --set data.kind=folder --set "data.path=$work/images" --set data.image_size=64 \
    --set "ti.token=<orange-tri>" --set ti.init_word=shape --set "ti.templates=[]" \
    --max-steps 200 --set optim.batch_size=16 --set optim.lr=5e-3 --checkpoint-every 100
ldm finetune configs/demo/finetune-smoke.yaml --output-dir "$work/lora" --set model.init_from=demo \
    --set data.kind=folder --set "data.path=$work/lora-images" --set data.image_size=64 \
    --max-steps 200 --set optim.batch_size=16 --set optim.lr=1e-3 --checkpoint-every 100
python - "$work" <<'PY'
import json, sys
from pathlib import Path
from ldm.data.shapes import POSITIONS, detect_objects
from pipelines import TextToImagePipeline
from pipelines.evaluation.text_to_image import generate_batches
work = Path(sys.argv[1])
positions = [p for p in POSITIONS for _ in range(12)]
prompts = [f"a <orange-tri> in the {p}" for p in positions]  # 108 prompts
report = {}
for name, embedding in (("before (the token is plain text)", None), ("after", work / "run" / "model")):
    pipe = TextToImagePipeline.from_pretrained("demo")
    if embedding is not None:
        pipe.load_textual_inversion(embedding / "learned_embeds.safetensors")
    images = generate_batches(pipe, prompts, 7.5, 25, "dpmpp_2m", seed=5000, batch_size=36)
    found = [[(o.colour, o.shape, o.position) for o in detect_objects(im)] for im in images]
    concept = [any(f[:2] == ("orange", "triangle") for f in objs) for objs in found]
    placed = [("orange", "triangle", p) in objs for objs, p in zip(found, positions)]
    report[name] = {"orange_triangle": round(sum(concept) / len(found), 3),
                    "orange_triangle_at_the_position": round(sum(placed) / len(found), 3)}
plain_prompts = [f"a triangle in the {p}" for p in positions]
lora = {}
for name, folder in (("before", None), ("after", work / "lora" / "model")):
    pipe = TextToImagePipeline.from_pretrained("demo")
    if folder is not None:
        pipe.load_lora_weights(folder)
    images = generate_batches(pipe, plain_prompts, 7.5, 25, "dpmpp_2m", seed=5000, batch_size=36)
    found = [[(o.colour, o.shape) for o in detect_objects(im)] for im in images]
    lora[name] = {"orange_triangle": round(sum(("orange", "triangle") in objs for objs in found) / len(found), 3),
                  "triangle": round(sum(any(s == "triangle" for _, s in objs) for objs in found) / len(found), 3)}
print(json.dumps(report), json.dumps(lora))
Path("docs/ti-demo.json").write_text(json.dumps({
    "embedding": {"prompts": "a <orange-tri> in the POSITION (108)", "rates": report},
    "lora": {"prompts": "a triangle in the POSITION (108)", "rates": lora}}, indent=2) + "\n")
PY
