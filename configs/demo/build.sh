#!/usr/bin/env bash
# Rebuild the shipped demo models from scratch (see configs/demo/README.md for times and hardware):
#   bash configs/demo/build.sh [autoencoder|text-to-image|super-resolution|semantic|classifier ...]
# Each model trains from its config into runs/demo/<name>/ (resuming if interrupted) and is then
# written, float16 with its EMA U-Net, to pipelines/weights/<demo name>/. The diffusion models need the
# autoencoder first; the classifier needs the unconditional model it guides (trained by its step).
set -euo pipefail
cd "$(dirname "$0")/../.."
step() {
  case "$1" in
    autoencoder) ldm train-autoencoder configs/demo/autoencoder.yaml ;;
    text-to-image) ldm train configs/demo/text-to-image.yaml   # 3000 steps, then continued to 6000 at half the rate:
      ldm train configs/demo/text-to-image.yaml --set optim.max_steps=6000 --set optim.decay_steps=1500 --set optim.lr=3.0e-4
      ldm convert runs/demo/text-to-image/model pipelines/weights/demo --to folder --half ;;
    super-resolution) ldm train configs/demo/super-resolution.yaml
      ldm convert runs/demo/super-resolution/model pipelines/weights/demo-sr --to folder --half ;;
    semantic) ldm train configs/demo/semantic.yaml
      ldm convert runs/demo/semantic/model pipelines/weights/demo-semantic --to folder --half ;;
    classifier) ldm train configs/demo/unconditional.yaml
      ldm train-classifier configs/demo/classifier.yaml
      ldm convert runs/demo/classifier/model pipelines/weights/demo-classifier --to folder --half ;;
    *) echo "build.sh: unknown model '$1'; allowed: autoencoder text-to-image super-resolution semantic classifier" >&2
       exit 2 ;;
  esac
}
for name in "${@:-autoencoder text-to-image super-resolution semantic classifier}"; do
  for one in $name; do step "$one"; done
done
