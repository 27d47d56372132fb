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

EXAMPLES = {
    "generate": 'ldm generate "a red circle in the top left" -o out.png\n'
    'ldm generate "a blue square" -n 4 --steps 25 --guidance 7.5 --sampler dpmpp_2m --seed 1 -o grid.png\n'
    'ldm generate "" --model demo-classifier --class triangle --classifier-scale 10 -o tri.png',
    "upscale": "ldm upscale low.png -o high.png --model demo-sr",
    "semantic": "ldm semantic map.png -o out.png --model demo-semantic",
    "convert": "ldm convert v1-5.safetensors sd15/ --to diffusers\nldm convert my-model/ model.safetensors --to sd\n"
    "ldm convert runs/demo/text-to-image/model pipelines/weights/demo --to folder --half",
    "eval": "ldm eval text-to-image -o eval/  # the demo model, 300 held-out prompts, guidance 1,2,4,7.5,12\n"
    "ldm eval super-resolution -o eval/ --count 300\nldm eval classifier -o eval/ --classifier-scales 0,10\n"
    "ldm eval clip -o eval/ --count 1000  # demo-clip's hard-negative accuracy per kind on held-out images",
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
        if args.command in ("generate", "upscale", "semantic"):
            _check_before_sampling(args)
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
        ("generate", _add_generate, _generate, "text-to-image (and classifier-guided) generation to a PNG"),
        ("upscale", _add_upscale, _upscale, "super-resolution of an image"),
        ("semantic", _add_semantic, _semantic, "an image from a semantic label map"),
        ("convert", _add_convert, _convert, "convert between our folders, diffusers folders and SD single files"),
        ("train", _add_train, _train, "train a latent diffusion model from a YAML config (resumes automatically)"),
        ("train-autoencoder", _add_train, _train, "train the KL autoencoder: L1 + KL + PatchGAN (+ LPIPS)"),
        ("train-classifier", _add_train, _train, "train a noise-aware classifier on the latents of a model"),
        ("train-clip", _add_train, _train, "train a CLIP contrastively on shapes images and captions, with hard "
         "negatives; it saves as transformers' CLIPModel"),
        ("finetune", _add_train, _train, "fine-tune a model (fully, or LoRA with lora:) and export it to diffusers"),
        ("eval", _add_eval, _eval, "measure a model on held-out shapes samples: JSON report, plot and grids"),
    ):
        sub = commands.add_parser(name, help=text, description=text, epilog="examples:\n" + EXAMPLES[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add(sub)
        sub.set_defaults(run=run)
    return parser


def _sampling_options(p: argparse.ArgumentParser, model: str, guidance: float) -> None:
    p.add_argument("-o", "--output", default="out.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--model", default=model,
                   help="demo name, our folder, diffusers folder or SD file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=guidance,
                   help="classifier-free guidance scale (default: %(default)s)")
    _sampler_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="allow up to N output pixels (images x height x width) in one call; default: the "
                   "pipeline's bound (4 MP; upscale 0.26 MP), so that a large input does not exhaust memory")
    _device_option(p)


def _interval(text: str) -> tuple[float, float | None]:
    low, sep, high = text.partition(",")
    try:
        bounds = float(low), (None if high.strip() in ("", "inf") else float(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (numbers; HIGH may be inf)")
    return bounds


def _sampler_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="dpmpp_2m",
                   help="ddpm | ddim | dpmpp_2m | euler | euler_a (default: %(default)s)")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device: auto (the first available of cuda, mps, xpu, "
                   "cpu), cpu, cuda, cuda:1, mps or xpu (default: %(default)s)")


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='the prompt; "" for unconditional')
    _sampling_options(p, "demo", 7.5)
    p.add_argument("--guidance-interval", type=_interval, default=None, metavar="LOW,HIGH",
                   help="guide only at noise levels sigma in [LOW, HIGH] (HIGH may be inf), e.g. 5,inf; "
                   "default: the model's own (every level, unless its model.yaml says otherwise)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images; more than one are saved as a grid")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--classifier", default=None, help="model folder whose noise-aware classifier guides sampling")
    p.add_argument("--class", dest="class_label", default=None,
                   help="target class (index or name) for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=10.0,
                   help="classifier guidance scale (default: %(default)s)")


def _add_upscale(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="low-resolution RGB image")
    _sampling_options(p, "demo-sr", 1.0)


def _add_semantic(p: argparse.ArgumentParser) -> None:
    p.add_argument("map", help="label map PNG (mode L or P, one label per pixel)")
    p.add_argument("--prompt", default="", help="optional prompt, for models with a text encoder")
    _sampling_options(p, "demo-semantic", 1.0)


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
    _sampler_option(p)
    p.add_argument("--guidance", type=_scales, default=[1.0, 2.0, 4.0, 7.5, 12.0],
                   help="text-to-image guidance scales, comma-separated (default: 1,2,4,7.5,12)")
    p.add_argument("--classifier-scales", type=_scales, default=[0.0, 10.0],
                   help="classifier guidance scales; 0 is unguided (default: 0,10)")
    p.add_argument("--clip", default="demo-clip", help="text-to-image: CLIP folder that also scores the images "
                   "(CLIP score, hard-negative score); 'none' for the detector only (default: %(default)s)")
    _device_option(p)


def _eval(args: argparse.Namespace) -> None:
    import json

    from pipelines.evaluation import EvalOptions, run_evaluation

    if args.count < 1:
        raise ValueError(f"--count={args.count} is not allowed; allowed: an integer >= 1")
    options = EvalOptions(args.count, args.seed, args.steps, args.sampler, args.guidance, args.classifier_scales,
                          args.device, None if args.clip.lower() == "none" else args.clip)
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
                 "finetune": "finetune", "train-clip": "clip"}[args.command]
    run(args)


def _check_before_sampling(args: argparse.Namespace) -> None:
    """The output path and the sampling options, checked before any model is loaded."""
    from pipelines.options import SamplingOptions

    out = Path(args.output)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"-o/--output={args.output!r} is not allowed; allowed: a .png file path (not a folder)")
    _check_writable_folder(out.parent, f"-o/--output={args.output!r}")
    if getattr(args, "classifier", None) and args.class_label is None:
        raise ValueError(f"--classifier={args.classifier!r} is not allowed without --class; allowed: --class NAME "
                         "or INDEX with it")
    SamplingOptions(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                    num_images_per_prompt=getattr(args, "num_images", 1),
                    guidance_interval=getattr(args, "guidance_interval", None))


def _check_writable_folder(folder: Path, what: str) -> None:
    """A file can be created in ``folder`` (tried, not guessed from permission bits: /proc or a read-only mount
    pass os.access)."""
    import tempfile

    folder = folder if str(folder) else Path(".")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{what}: the folder {str(folder)!r} does not exist or is not writable "
                         f"({err.strerror or err})") from None


def _pipeline(cls: type, args: argparse.Namespace):
    from ldm.validation import check_int

    pipe = cls.from_pretrained(args.model, device=args.device)
    if args.max_pixels is not None:
        pipe.max_pixels = check_int("--max-pixels", args.max_pixels, 1)
    return pipe


def _generate(args: argparse.Namespace) -> None:
    from pipelines import ClassifierGuidedPipeline, TextToImagePipeline, load_models

    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed,
                  num_images_per_prompt=args.num_images)
    if args.class_label is None:
        pipe = _pipeline(TextToImagePipeline, args)
        images = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
                      guidance_interval=args.guidance_interval, **common).images
    else:
        pipe = _pipeline(ClassifierGuidedPipeline, args)
        if args.classifier:
            donor = load_models(args.classifier)
            pipe.models.classifier, pipe.models.class_names = donor.classifier.to(pipe.device), donor.class_names
        images = pipe(args.class_label, args.classifier_scale, prompt=args.prompt, negative_prompt=args.negative,
                      **common).images
    extra = {} if args.class_label is None else {"Class": args.class_label, "Classifier scale": args.classifier_scale}
    _save(images, args.output, _parameters(args, args.prompt, args.negative, images[0].size, **extra))


def _upscale(args: argparse.Namespace) -> None:
    from pipelines import SuperResolutionPipeline

    pipe = _pipeline(SuperResolutionPipeline, args)
    images = pipe(args.image, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                  seed=args.seed).images
    _save(images, args.output, _parameters(args, "", None, images[0].size, Source=Path(args.image).name))


def _semantic(args: argparse.Namespace) -> None:
    from pipelines import SemanticToImagePipeline

    pipe = _pipeline(SemanticToImagePipeline, args)
    images = pipe(args.map, prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  sampler=args.sampler, seed=args.seed).images
    _save(images, args.output, _parameters(args, args.prompt, None, images[0].size, Map=Path(args.map).name))


def _convert(args: argparse.Namespace) -> None:
    from ldm.io import export_checkpoint, read_checkpoint
    from pipelines.base import resolve_source
    from pipelines.models import ModelConfig, config_source

    source = resolve_source(args.source)  # a demo name is its shipped folder
    _check_writable_folder(Path(args.target).parent, f"target={args.target!r}")
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


def _parameters(args: argparse.Namespace, prompt: str, negative: str | None, size: tuple[int, int],
                **extra: object) -> str:
    from pipelines.images import generation_parameters

    return generation_parameters(prompt, negative, args.steps, args.sampler, args.guidance, args.seed, size,
                                 str(args.model), **extra)


def _save(images: list, output: str, parameters: str) -> None:
    """One image, or a grid of several, as a PNG that carries its generation parameters."""
    from pipelines.images import make_grid, save_png

    grid = images[0] if len(images) == 1 else make_grid(images)
    save_png(grid, output, parameters)
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
