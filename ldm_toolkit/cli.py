"""The ``ldm`` command line: generate, upscale, semantic, convert, train…, eval.

Errors print one line (``ldm: error: ...``) and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.training.stop import TrainingStopped
from ldm_toolkit import sampling
from ldm_toolkit.arguments import add_device_option, add_sampler_option, check_writable_folder

EXAMPLES = {
    "generate": 'ldm generate "a red circle in the top left" -o out.png\n'
    'ldm generate "a blue square" -n 4 --steps 25 --guidance 7.5 --sampler dpmpp_2m --seed 1 -o grid.png\n'
    'ldm generate "" --model demo-classifier --class triangle --classifier-scale 10 -o tri.png\n'
    "ldm generate --from-png out.png -o again.png  # the same image, from the parameters out.png carries\n"
    'ldm generate "a house" --model v1-5.safetensors --control sd-controlnet-canny/=edges.png:0.8',
    "inpaint": 'ldm inpaint photo.png mask.png "a yellow triangle" -o filled.png --mask-blur 2\n'
    'ldm inpaint photo.png mask.png "a red circle" --model sd-inpainting.safetensors --steps 30 -n 4',
    "upscale": "ldm upscale low.png -o high.png --model demo-sr",
    "semantic": "ldm semantic map.png -o out.png --model demo-semantic",
    "convert": "ldm convert v1-5.safetensors sd15/ --to diffusers\nldm convert my-model/ model.safetensors --to sd\n"
    "ldm convert runs/demo/text-to-image/model pipelines/weights/demo --to folder --half",
    "eval": "ldm eval text-to-image -o eval/  # the demo model, 300 held-out prompts, guidance 1,2,4,7.5,12\n"
    "ldm eval super-resolution -o eval/ --count 300\nldm eval classifier -o eval/ --classifier-scales 0,10\n"
    "ldm eval clip -o eval/ --count 1000  # demo-clip's hard-negative accuracy per kind on held-out images\n"
    "ldm eval controlnet -o eval/  # demo-controlnet on demo: map IoU, colour from the prompt, 300 scenes",
    "samplers": "ldm samplers\nldm generate \"a red circle\" --sampler \"DPM++ 2M Karras\"",
    "train": "ldm train configs/demo/smoke.yaml --output-dir runs/smoke --max-steps 20 --set optim.lr=2e-4\n"
    "accelerate launch --multi_gpu --num_processes 2 -m ldm_toolkit.train configs/demo/smoke.yaml",
    "train-autoencoder": "ldm train-autoencoder configs/demo/autoencoder-smoke.yaml --output-dir runs/ae\n"
    "accelerate launch --multi_gpu --num_processes 2 -m ldm_toolkit.train configs/demo/autoencoder-smoke.yaml "
    "--task autoencoder",
    "train-classifier": "ldm train-classifier configs/demo/classifier-smoke.yaml "
    "--set model.init_from=runs/smoke/model",
    "train-clip": "ldm train-clip configs/demo/clip.yaml --output-dir runs/demo/clip\n"
    "accelerate launch --multi_gpu --num_processes 2 -m ldm_toolkit.train configs/demo/clip-smoke.yaml --task clip",
    "finetune": "ldm finetune configs/demo/finetune-smoke.yaml --set model.init_from=runs/smoke/model\n"
    "ldm finetune configs/demo/finetune-smoke.yaml --set data.kind=folder --set data.path=my-images --set lora=null",
    "train-ti": "ldm train-ti configs/demo/ti-smoke.yaml --set model.init_from=runs/smoke/model\n"
    "ldm train-ti configs/demo/ti-smoke.yaml --set data.kind=folder --set data.path=my-images "
    "--set ti.token='<my-thing>' --set ti.init_word=toy --set ti.templates=[]",
    "train-controlnet": "ldm train-controlnet configs/demo/controlnet-smoke.yaml "
    "--set model.init_from=runs/smoke/model\n"
    "accelerate launch -m ldm_toolkit.train configs/demo/controlnet-smoke.yaml --task controlnet",
}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the usage too
        self.exit(2, f"ldm: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    _default_threads()
    try:
        if getattr(args, "device", None) is not None:  # checked before any model is loaded
            from ldm.devices import resolve_device

            args.device = str(resolve_device(args.device, "--device"))
        if args.command in ("generate", "inpaint", "upscale", "semantic"):
            sampling.check_before_sampling(args)
        args.run(args)
    except (ValueError, OSError, ArithmeticError) as err:  # CheckpointError, ConfigError: ValueErrors
        print(f"ldm: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"ldm: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("ldm: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def _default_threads() -> None:
    """Half the cores (at least one) unless OMP_NUM_THREADS says otherwise: on a busy small machine, all of them
    oversubscribe (a cold `ldm generate` took 71 s with every thread on a busy 2-core machine, 11-14 s with one)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ldm", description="Latent diffusion: generate, upscale, semantic synthesis, convert.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, add, run, text in (
        ("generate", sampling.add_generate, sampling.generate,
         "text-to-image (and classifier-guided) generation to PNGs that carry their parameters"),
        ("inpaint", sampling.add_inpaint, sampling.inpaint, "regenerate the masked part of an image"),
        ("upscale", sampling.add_upscale, sampling.upscale, "super-resolution of an image"),
        ("semantic", sampling.add_semantic, sampling.semantic, "an image from a semantic label map"),
        ("convert", _add_convert, _convert, "convert between our folders, diffusers folders and SD single files"),
        ("train", _add_train, _train, "train a latent diffusion model from a YAML config (resumes automatically)"),
        ("train-autoencoder", _add_train, _train, "train the KL autoencoder: L1 + KL + PatchGAN (+ LPIPS)"),
        ("train-classifier", _add_train, _train, "train a noise-aware classifier on the latents of a model"),
        ("train-clip", _add_train, _train, "train a CLIP contrastively on shapes images and captions, with hard "
         "negatives; it saves as transformers' CLIPModel"),
        ("finetune", _add_train, _train, "fine-tune a model (fully, or LoRA with lora:) and export it to diffusers"),
        ("train-ti", _add_train, _train, "textual inversion: learn a new token's embedding (ti:) on a folder of "
         "images, the model frozen; writes learned_embeds.safetensors"),
        ("train-controlnet", _add_train, _train, "train a ControlNet (controlnet:) on a frozen model, the hint the "
         "semantic map as an RGB image; writes a diffusers ControlNetModel folder"),
        ("eval", _add_eval, _eval, "measure a model on held-out shapes samples: JSON report, plot and grids"),
        ("samplers", lambda p: None, _samplers, "list the samplers --sampler takes, with their WebUI names"),
    ):
        sub = commands.add_parser(name, help=text, description=text, epilog="examples:\n" + EXAMPLES[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add(sub)
        sub.set_defaults(run=run)
    return parser


def _samplers(args: argparse.Namespace) -> None:
    from ldm.diffusion.samplers import A1111_NAMES, SAMPLERS, SIGMA_SPACING_SAMPLERS

    print(f"{'sampler':<14}{'karras / exponential':<22}{'WebUI names (also accepted)':<40}method")
    for name, fn in SAMPLERS.items():
        aliases = ", ".join(a for a, (sampler, _) in A1111_NAMES.items() if sampler == name)
        spacing = "yes" if name in SIGMA_SPACING_SAMPLERS else "-"
        print(f"{name:<14}{spacing:<22}{aliases:<40}{(fn.__doc__ or '').strip().splitlines()[0]}")


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="demo name, our folder, diffusers folder, SD single file (.safetensors / .ckpt) "
                   "or CLIP folder (--to folder only)")
    p.add_argument("target", help="output folder or file")
    p.add_argument("--to", required=True, choices=("diffusers", "sd", "folder"), help="output format")
    p.add_argument("--prediction-type", default=None, help="for SD files: epsilon or v (SD 2.x 768-v); default: the "
                   "file's stored config if we wrote it, else epsilon")
    p.add_argument("--no-ema", action="store_true", help="for full SD training checkpoints: take the non-EMA weights")
    p.add_argument("--half", action="store_true", help="store float weights as float16 (and the U-Net's EMA weights "
                   "as the U-Net, when the source keeps them apart): half the size, for shipping")


def _scales(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,2,4,7.5") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: numbers >= 0, e.g. 1,2,4,7.5")
    return values


def _add_eval(p: argparse.ArgumentParser) -> None:
    from pipelines.evaluation import EVALUATIONS

    p.add_argument("task", choices=EVALUATIONS, help="what to measure")
    p.add_argument("-o", "--output", default="eval",
                   help="folder for <task>.json and the pictures (default: %(default)s)")
    p.add_argument("--model", default=None, help="model to measure (default: the task's demo model)")
    p.add_argument("--count", type=int, default=300, help="held-out prompts / images / samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1000,
                   help="data seed of the held-out set; training uses 0-4 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    add_sampler_option(p)
    p.add_argument("--guidance", type=_scales, default=None,
                   help="guidance scales, comma-separated (default: text-to-image 1,2,4,7.5,12; controlnet 7.5)")
    p.add_argument("--classifier-scales", type=_scales, default=[0.0, 10.0],
                   help="classifier guidance scales; 0 is unguided (default: 0,10)")
    p.add_argument("--clip", default="demo-clip", help="text-to-image: CLIP folder that also scores the images "
                   "(CLIP score, hard-negative score); 'none' for the detector only (default: %(default)s)")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                   help="text-to-image, controlnet: sample with DeepCache at interval N, to measure its quality cost")
    p.add_argument("--base", default="demo",
                   help="controlnet: the text-to-image model the ControlNet steers (default: %(default)s)")
    add_device_option(p)


def _eval(args: argparse.Namespace) -> None:
    import json

    from pipelines.evaluation import EvalOptions, run_evaluation

    if args.count < 1:
        raise ValueError(f"--count={args.count} is not allowed; allowed: an integer >= 1")
    options = EvalOptions(args.count, args.seed, args.steps, args.sampler, args.guidance, args.classifier_scales,
                          args.device, None if args.clip.lower() == "none" else args.clip, args.base,
                          args.deep_cache)
    report = run_evaluation(args.task, args.output, args.model, options)
    print(json.dumps(report, indent=2))
    print(f"wrote {Path(args.output) / (args.task + '.json')}")


def _add_train(p: argparse.ArgumentParser) -> None:
    from ldm_toolkit.train import add_common_arguments

    add_common_arguments(p)


def _train(args: argparse.Namespace) -> None:
    from ldm_toolkit.train import run

    logging.getLogger().setLevel(logging.INFO)
    args.task = {"train": "diffusion", "train-autoencoder": "autoencoder", "train-classifier": "classifier",
                 "finetune": "finetune", "train-clip": "clip", "train-ti": "ti",
                 "train-controlnet": "controlnet"}[args.command]
    run(args)


def _convert(args: argparse.Namespace) -> None:
    from ldm.io import export_checkpoint, read_checkpoint
    from pipelines.base import resolve_source
    from pipelines.models import ModelConfig, config_source

    source = resolve_source(args.source)  # a demo name is its shipped folder
    check_writable_folder(Path(args.target).parent, f"target={args.target!r}")
    if (source / "config.json").is_file() and not (source / "model_index.json").is_file():
        return _convert_clip(source, args)
    options = {"prediction_type": args.prediction_type, "use_ema": not args.no_ema}
    if not source.is_file():
        options = {}
    checkpoint = read_checkpoint(source, **options)
    ModelConfig.from_dict(checkpoint.config, config_source(source))  # every key and value checked before writing
    if args.half:
        from ldm.io.checkpoint import half_precision

        checkpoint = half_precision(checkpoint)
    export_checkpoint(checkpoint, args.target, args.to)
    print(f"wrote {args.target} ({args.to})")


def _convert_clip(source: Path, args: argparse.Namespace) -> None:
    """A CLIP folder (ldm train-clip, transformers' CLIPModel) copied, float16 with --half."""
    from ldm.modules.clip import load_clip, save_clip

    if args.to != "folder":
        raise ValueError(f"{source} is a CLIP folder (config.json, model.safetensors); allowed: --to folder")
    clip = load_clip(source)
    state = {k: v.half() if args.half and v.is_floating_point() else v for k, v in clip.state_dict().items()}
    save_clip(clip, args.target, state)
    print(f"wrote {args.target} (CLIP folder)")


if __name__ == "__main__":
    sys.exit(main())
