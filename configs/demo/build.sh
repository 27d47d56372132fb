#!/usr/bin/env bash
# Rebuild the shipped demo models from scratch (see configs/demo/README.md for times and hardware):
#   bash configs/demo/build.sh [autoencoder|clip|text-to-image|super-resolution|semantic|classifier|controlnet ...]
# Each model trains from its config into runs/demo/<name>/ (resuming if interrupted) and is then
# written, float16 with its EMA U-Net, to pipelines/weights/<demo name>/. The diffusion models need the
# autoencoder first; the classifier needs the unconditional model it guides (trained by its step).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Continued training of a finished model: a fresh optimizer, 20000 samples of the stream (latents cached sooner).
MORE="--set optim.max_steps=3600 --set optim.lr=5e-4 --set optim.decay_steps=1200 --set data.length=20000"
step() {
  case "$1" in
    autoencoder) ldm train-autoencoder configs/demo/autoencoder.yaml ;;
    clip) ldm train-clip configs/demo/clip.yaml
      ldm convert runs/demo/clip/model pipelines/weights/demo-clip --to folder --half ;;
    text-to-image) ldm train configs/demo/text-to-image.yaml   # on the CLIP's text tower (runs/demo/clip/model)
      ldm convert runs/demo/text-to-image/model pipelines/weights/demo --to folder --half ;;
    super-resolution) ldm train configs/demo/super-resolution.yaml
      ldm convert runs/demo/super-resolution/model pipelines/weights/demo-sr --to folder --half ;;
    semantic) ldm train configs/demo/semantic.yaml   # 2400 steps, then 3 × 3600 more on data seeds 0, 1, 2:
      ldm train configs/demo/semantic.yaml $MORE --set model.init_from=runs/demo/semantic/model \
        --output-dir runs/demo/semantic-2
      ldm train configs/demo/semantic.yaml $MORE --set model.init_from=runs/demo/semantic-2/model \
        --output-dir runs/demo/semantic-3 --set data.seed=1
      ldm train configs/demo/semantic.yaml $MORE --set model.init_from=runs/demo/semantic-3/model \
        --output-dir runs/demo/semantic-4 --set data.seed=2
      ldm convert runs/demo/semantic-4/model pipelines/weights/demo-semantic --to folder --half ;;
    classifier) ldm train configs/demo/unconditional.yaml   # 2400 steps; the classifier trains on its latents
      ldm train-classifier configs/demo/classifier.yaml
      ldm train configs/demo/unconditional.yaml $MORE --set model.init_from=runs/demo/classifier/model \
        --output-dir runs/demo/unconditional-2   # 5 × 3600 more U-Net steps; the classifier rides along unchanged
      for i in 3 4 5 6; do   # data seeds 1 to 4
        ldm train configs/demo/unconditional.yaml $MORE --set model.init_from=runs/demo/unconditional-$((i - 1))/model \
          --output-dir runs/demo/unconditional-$i --set data.seed=$((i - 2))
      done
      ldm convert runs/demo/unconditional-6/model pipelines/weights/demo-classifier --to folder --half ;;
    controlnet) ldm train-controlnet configs/demo/controlnet.yaml   # on the frozen shipped `demo`
      python configs/demo/ship_controlnet.py runs/demo/controlnet/model pipelines/weights/demo-controlnet ;;
    *) echo "build.sh: unknown model '$1'; allowed: autoencoder clip text-to-image super-resolution semantic" \
         "classifier controlnet" >&2
       exit 2 ;;
  esac
}
for name in "${@:-autoencoder clip text-to-image super-resolution semantic classifier controlnet}"; do
  for one in $name; do step "$one"; done
done
