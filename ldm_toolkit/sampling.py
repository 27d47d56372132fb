"""The sampling commands: ``ldm generate | inpaint | upscale | semantic``. Each checks its inputs and output path
before a model is loaded, writes PNGs that carry how they were made, and prints the seed it used."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ldm_toolkit.arguments import add_sampling_options, check_png_output, interval

MAX_PARAMETERS_BYTES = 64 * 1024  # a PNG's "parameters" text; a prompt of 75-token chunks is a few kB


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help='the prompt; "" for unconditional')
    add_sampling_options(p, "demo", 7.5)
    p.add_argument("--guidance-interval", type=interval, default=None, metavar="LOW,HIGH",
                   help="guide only at noise levels sigma in [LOW, HIGH] (HIGH may be inf), e.g. 5,inf; "
                   "default: the model's own (every level, unless its model.yaml says otherwise)")
    _add_batch_options(p)
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--classifier", default=None, help="model folder whose noise-aware classifier guides sampling")
    p.add_argument("--class", dest="class_label", default=None,
                   help="target class (index or name) for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=10.0,
                   help="classifier guidance scale (default: %(default)s)")
    p.add_argument("--control", action="append", default=[], metavar="CONTROLNET=IMAGE[:SCALE]",
                   help="a ControlNet (diffusers folder, original file or demo-controlnet) and its control image, "
                   "at SCALE (default 1); repeatable: several ControlNets")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="make FILE's image again from the parameters it carries (prompt, negative prompt, seed, "
                   "steps, sampler, guidance, size, batch; --model overrides its model)")


def add_inpaint(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="the RGB image to change")
    p.add_argument("mask", help="mask of the same size: white = generate anew, black = keep")
    p.add_argument("prompt", help="what to put where the mask is white")
    add_sampling_options(p, "demo", 7.5)
    _add_batch_options(p)
    p.add_argument("--strength", type=float, default=1.0,
                   help="1 starts from noise; below 1 from the image noised to it (default: %(default)s)")
    p.add_argument("--mask-blur", type=float, default=0.0,
                   help="std in pixels of a Gaussian that softens the mask's edge (default: %(default)s)")


def add_upscale(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="low-resolution RGB image")
    add_sampling_options(p, "demo-sr", 1.0)


def add_semantic(p: argparse.ArgumentParser) -> None:
    p.add_argument("map", help="label map PNG (mode L or P, one label per pixel)")
    p.add_argument("--prompt", default="", help="optional prompt, for models with a text encoder")
    add_sampling_options(p, "demo-semantic", 1.0)


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--num-images", type=int, default=1, help="images: each is written, and a grid of them")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (kohya/A1111 or diffusers/peft .safetensors) at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors or diffusers learned_embeds); its "
                   "token is the file's own (A1111: the file name); repeatable")


def _lora_argument(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if sep and path else (text, 1.0)
    except ValueError:
        return text, 1.0


def check_before_sampling(args: argparse.Namespace) -> None:
    """--from-png read, then the output path and the sampling options checked, before any model is loaded."""
    from pipelines.options import SamplingOptions

    if getattr(args, "from_png", None):
        _apply_png(args)
    elif args.command == "generate" and args.prompt is None:
        raise ValueError("prompt is missing; allowed: a prompt (\"\" for unconditional) or --from-png FILE")
    args.model = args.model or args.default_model
    args.seed = None if args.seed == -1 else args.seed
    check_png_output(args.output)
    if args.deep_cache is not None:
        from ldm.validation import check_int

        check_int("--deep-cache", args.deep_cache, 1, 1000)
    from pipelines.base import DEMO_CONTROLNETS

    for text in getattr(args, "control", []):
        net, image, _ = _control_argument(text)
        for what, path in (("ControlNet", net), ("control image", image)):
            if not (what == "ControlNet" and path in DEMO_CONTROLNETS) and not Path(path).exists():
                raise ValueError(f"--control={text!r}: the {what} {path!r} does not exist")
    if getattr(args, "classifier", None) and args.class_label is None:
        raise ValueError(f"--classifier={args.classifier!r} is not allowed without --class; allowed: --class NAME "
                         "or INDEX with it")
    SamplingOptions(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                    num_images_per_prompt=getattr(args, "num_images", 1), seed=args.seed,
                    guidance_interval=getattr(args, "guidance_interval", None))


def _apply_png(args: argparse.Namespace) -> None:
    """Take prompt, negative prompt, seed, steps, sampler, guidance, size, batch (and model unless --model says
    otherwise) from the PNG's parameters."""
    from PIL import Image

    from pipelines.parameters import GenerationParameters

    try:
        with Image.open(args.from_png) as image:
            text = getattr(image, "text", {}).get("parameters")
    except (OSError, ValueError) as err:
        raise ValueError(f"--from-png={args.from_png!r} is not a readable image ({err})") from None
    if not text or len(text) > MAX_PARAMETERS_BYTES:
        raise ValueError(f"--from-png={args.from_png!r} carries no generation parameters (a 'parameters' text "
                         f"chunk of at most {MAX_PARAMETERS_BYTES} bytes); allowed: a PNG written by ldm or a WebUI")
    made = GenerationParameters.from_text(text, f"--from-png={args.from_png!r}")
    args.prompt, args.negative, args.steps, args.sampler = made.prompt, made.negative_prompt, made.steps, made.sampler
    args.guidance, args.seed, args.width, args.height = made.guidance_scale, made.seed, made.width, made.height
    args.model = args.model or made.model or None
    args.num_images = int(made.extra.get("Batch size", 1))
    args.batch_pos = int(made.extra["Batch pos"]) if "Batch pos" in made.extra else None
    args.lora = made.extra["LoRA"].split(";") if made.extra.get("LoRA") else []
    args.control = made.extra["Control"].split(";") if made.extra.get("Control") else []
    args.embedding = made.extra["Embeddings"].split(";") if made.extra.get("Embeddings") else []
    if "Guidance interval" in made.extra:
        args.guidance_interval = interval(made.extra["Guidance interval"])
    if "Class" in made.extra:
        args.class_label, args.classifier_scale = made.extra["Class"], float(made.extra["Classifier scale"])


def pipeline(cls: type, args: argparse.Namespace) -> Any:
    from ldm.validation import check_int

    pipe = cls.from_pretrained(args.model, device=args.device, compile=args.compile)
    if args.deep_cache is not None:
        pipe.enable_deep_cache(args.deep_cache)
    if args.max_pixels is not None:
        pipe.max_pixels = check_int("--max-pixels", args.max_pixels, 1)
    loras = [_lora_argument(text) for text in getattr(args, "lora", [])]
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], [scale for _, scale in loras])
    for path in getattr(args, "embedding", []):
        pipe.load_textual_inversion(path)
    return pipe


def generate(args: argparse.Namespace) -> None:
    from pipelines import ClassifierGuidedPipeline, TextToImagePipeline, load_models

    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, seed=args.seed,
                  num_images_per_prompt=args.num_images)
    extra: dict[str, Any] = {}
    if args.control:
        out = _controlled(args, common)
        extra["Control"] = ";".join(args.control)
    elif args.class_label is None:
        pipe = pipeline(TextToImagePipeline, args)
        out = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
                   guidance_interval=args.guidance_interval, **common)
        if args.guidance_interval is not None:
            low, high = args.guidance_interval
            extra["Guidance interval"] = f"{low:g},{'inf' if high is None else f'{high:g}'}"
    else:
        pipe = pipeline(ClassifierGuidedPipeline, args)
        if args.classifier:
            donor = load_models(args.classifier)
            pipe.models.classifier, pipe.models.class_names = donor.classifier.to(pipe.device), donor.class_names
        out = pipe(args.class_label, args.classifier_scale, prompt=args.prompt, negative_prompt=args.negative,
                   **common)
        extra = {"Class": args.class_label, "Classifier scale": f"{args.classifier_scale:g}"}
    save(out, args, args.prompt, args.negative, **extra)


def _control_argument(text: str) -> tuple[str, str, float]:
    net, sep, rest = text.partition("=")
    if not sep or not net or not rest:
        raise ValueError(f"--control={text!r} is not allowed; allowed: CONTROLNET=IMAGE or CONTROLNET=IMAGE:SCALE")
    image, scale = _lora_argument(rest)
    return net, image, scale


def _controlled(args: argparse.Namespace, common: dict[str, Any]) -> Any:
    from pipelines import ControlNetPipeline

    controls = [_control_argument(text) for text in args.control]
    pipe = pipeline(ControlNetPipeline, args)
    pipe.controlnet = [net for net, _, _ in controls]
    return pipe(args.prompt, [image for _, image, _ in controls], negative_prompt=args.negative,
                controlnet_conditioning_scale=[scale for _, _, scale in controls], height=args.height,
                width=args.width, **common)


def inpaint(args: argparse.Namespace) -> None:
    from pipelines import InpaintPipeline

    pipe = pipeline(InpaintPipeline, args)
    out = pipe(args.prompt, args.image, args.mask, strength=args.strength, negative_prompt=args.negative,
               num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
               num_images_per_prompt=args.num_images, seed=args.seed, mask_blur=args.mask_blur)
    save(out, args, args.prompt, args.negative, **{"Denoising strength": f"{args.strength:g}",
                                                   "Mask blur": f"{args.mask_blur:g}"})


def upscale(args: argparse.Namespace) -> None:
    from pipelines import SuperResolutionPipeline

    pipe = pipeline(SuperResolutionPipeline, args)
    out = pipe(args.image, num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
               seed=args.seed)
    save(out, args, "", None, Source=Path(args.image).name)


def semantic(args: argparse.Namespace) -> None:
    from pipelines import SemanticToImagePipeline

    pipe = pipeline(SemanticToImagePipeline, args)
    out = pipe(args.map, prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
               sampler=args.sampler, seed=args.seed)
    save(out, args, args.prompt, None, Map=Path(args.map).name)


def save(out: Any, args: argparse.Namespace, prompt: str, negative: str | None, **extra: str) -> None:
    """Each image as a PNG carrying its parameters: one image to OUTPUT; several to OUTPUT-1.png … and their grid
    to OUTPUT (or, made again from one image of a batch, that image alone)."""
    from pipelines.images import make_grid, save_png
    from pipelines.parameters import GenerationParameters

    images, output = out.images, Path(args.output)
    width, height = images[0].size
    if getattr(args, "lora", None):
        extra["LoRA"] = ";".join(args.lora)
    if getattr(args, "embedding", None):
        extra["Embeddings"] = ";".join(args.embedding)
    made = GenerationParameters(prompt, negative, args.steps, args.sampler, args.guidance, out.seed, width, height,
                                str(args.model), dict(extra))
    position = getattr(args, "batch_pos", None)
    if len(images) == 1 or position is not None:
        made.extra.update({"Batch size": str(len(images)), "Batch pos": str(position)} if position is not None else {})
        save_png(images[position or 0], output, made.to_text())
        print(f"wrote {output} (seed {out.seed})")
        return
    for i, image in enumerate(images):
        each = GenerationParameters(**{**vars(made), "extra": {**made.extra, "Batch size": str(len(images)),
                                                               "Batch pos": str(i)}})
        save_png(image, output.with_name(f"{output.stem}-{i + 1}{output.suffix}"), each.to_text())
    grid = GenerationParameters(**{**vars(made), "extra": {**made.extra, "Batch size": str(len(images))}})
    save_png(make_grid(images), output, grid.to_text())
    print(f"wrote {output} and {output.stem}-1{output.suffix} … {output.stem}-{len(images)}{output.suffix} "
          f"(seed {out.seed})")
