"""``ldm train CONFIG`` — also ``accelerate launch -m ldm_toolkit.train CONFIG`` for several processes.

Like the CLI this is an entry point above every package (nothing imports it): it assembles the pipelines'
model bundle and its training tasks (``pipelines.training``); the loop itself (``ldm.training``) only sees modules.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldm.config import ConfigError, config_from_dict
from ldm.modules.size import build_within_limit
from ldm.training.config import DataConfig, ModelSpec, TrainConfig, load_train_config
from ldm.training.lock import RunLock
from ldm.training.resume import check_resume_config
from ldm.training.stop import TrainingStopped

if TYPE_CHECKING:  # imported where used: `ldm --help` stays fast
    from autoencoder import AutoencoderKL
    from ldm.conditioning.text import TextEncoder
    from pipelines import Models

logger = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The overrides every trainer takes."""
    parser.add_argument("config", help="YAML training config (see configs/)")
    parser.add_argument("--output-dir", default=None, help="where checkpoints, logs and the model go")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (resumes count)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=None, help="seed of data order, noise and dropout")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set optim.lr=2e-4 (repeatable)")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                        help="let a resumed run differ from its saved config.yaml at KEY (repeatable), "
                        "e.g. optim.lr; without it such a resume stops with the keys that differ")


def read_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {"output_dir": args.output_dir, "max_steps": args.max_steps,
                 "checkpoint_every": args.checkpoint_every, "seed": args.seed}
    return load_train_config(args.config, overrides, args.set, task_defaults(getattr(args, "task", "diffusion")))


TASKS = ("diffusion", "autoencoder", "classifier", "finetune", "clip", "ti", "controlnet")


def task_defaults(task: str) -> dict[str, Any]:
    """Config defaults of ``task`` that differ from TrainConfig's (dotted key -> value; the file may set them)."""
    if task == "ti":
        from pipelines.training.textual_inversion import DEFAULTS

        return DEFAULTS
    if task == "controlnet":
        from pipelines.training.controlnet import DEFAULTS

        return DEFAULTS
    return {}


def build_dataset(data: DataConfig, task: str = "diffusion") -> Any:
    """The dataset, checked in full (folders: every image opens) before any model is built.
    The classifier always trains on one-object shapes, whose label is the shape."""
    if data.kind == "folder":
        from ldm.data.folder import ImageCaptionFolder

        return ImageCaptionFolder(data.path, data.image_size)
    from ldm.data.shapes import ShapesDataset

    if task == "clip":
        from ldm.data.negatives import ContrastiveShapesDataset as ShapesDataset  # images with hard negatives
    return ShapesDataset(seed=data.seed, length=data.length, two_object_prob=data.two_object_prob,
                         drop_prob=data.drop_prob, image_size=data.image_size,
                         kind="one" if task == "classifier" else data.objects)


def check_model_spec(spec: ModelSpec, source: str) -> None:
    """Validate the component configs (cheap) so typos fail before anything is built."""
    from autoencoder import AutoencoderConfig
    from ldm.conditioning.text import TextEncoderConfig
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.unet import UNetConfig

    if spec.init_from:
        return
    config_from_dict(UNetConfig, spec.unet, source, "model.unet.")
    config_from_dict(ScheduleConfig, spec.schedule, source, "model.schedule.")
    if spec.text_encoder_from and spec.text_encoder:
        raise ConfigError(f"{source}: model.text_encoder cannot change the text encoder of model.text_encoder_from "
                          f"({spec.text_encoder_from}); allowed: leave model.text_encoder empty")
    if spec.text_encoder is not None and not spec.text_encoder_from:
        config_from_dict(TextEncoderConfig, spec.text_encoder, source, "model.text_encoder.")
    if not spec.autoencoder_from:
        config_from_dict(AutoencoderConfig, spec.vae, source, "model.vae.")
    elif set(spec.vae) - {"scale_factor"}:
        extra = ", ".join(sorted(set(spec.vae) - {"scale_factor"}))
        raise ConfigError(f"{source}: model.vae.{extra} cannot change the autoencoder of model.autoencoder_from; "
                          "allowed: scale_factor (a number or 'auto')")
    elif "scale_factor" in spec.vae:
        check_scale_factor(spec.vae["scale_factor"], source)


def build_models(spec: ModelSpec, data: DataConfig) -> Models:
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.conditioning.text import TextEncoder, TextEncoderConfig
    from ldm.conditioning.tokenizer import ClipTokenizer, pad_token_id_for
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.unet import UNet, UNetConfig
    from pipelines import Models, load_models
    from pipelines.base import resolve_source

    if spec.init_from:
        from ldm.config import config_to_dict
        from ldm.modules.unet import widen_inputs

        def updated(cls: type, loaded: Any, changes: dict[str, Any], prefix: str) -> Any:
            return config_from_dict(cls, {**config_to_dict(loaded), **changes}, spec.init_from, prefix)

        models = load_models(resolve_source(spec.init_from))
        if spec.unet:  # the loaded U-Net with more inputs (concat channels)
            models.unet = widen_inputs(models.unet, updated(UNetConfig, models.unet.config, spec.unet, "model.unet."))
        if spec.schedule:  # fine-tune to another noise schedule (as Lin et al. 2023 moved SD to zero terminal SNR)
            models.schedule = updated(ScheduleConfig, models.schedule, spec.schedule, "model.schedule.")
        if spec.concat is not None:  # the condition that the added inputs take (as SD inpainting adds 5)
            models.concat = spec.concat
        if spec.sampling:
            models.sampling = sampling_defaults(spec)
        if spec.text_encoder_from:  # another text encoder under the trained U-Net (its contexts must fit it)
            models.text_encoder = load_text_encoder(spec.text_encoder_from)
            kind = models.text_encoder.config.kind
            models.tokenizer = ClipTokenizer(max_length=models.text_encoder.config.max_length,
                                             pad_token_id=pad_token_id_for(kind))
            if models.text_encoder.config.width != models.unet.config.context_dim:
                raise ConfigError(f"model.text_encoder_from={spec.text_encoder_from!r} has width "
                                  f"{models.text_encoder.config.width}; allowed: the U-Net's context_dim "
                                  f"{models.unet.config.context_dim}")
        return models
    if spec.autoencoder_from:
        vae = load_autoencoder(spec.autoencoder_from)
        if "scale_factor" in spec.vae:
            vae.config.scale_factor = resolve_scale_factor(spec.vae["scale_factor"], vae, data)
    else:
        vae = AutoencoderKL(AutoencoderConfig(**spec.vae))
    if spec.text_encoder_from:
        text = load_text_encoder(spec.text_encoder_from)
    else:
        text = TextEncoder(TextEncoderConfig(**spec.text_encoder)) if spec.text_encoder is not None else None
    tokenizer = None
    if text is not None:
        tokenizer = ClipTokenizer(max_length=text.config.max_length, pad_token_id=pad_token_id_for(text.config.kind))
    sample_size = spec.sample_size or data.image_size // vae.downsample_factor
    unet = build_within_limit(lambda: UNet(UNetConfig(**spec.unet)), "model.unet")
    return Models(unet, vae, ScheduleConfig(**spec.schedule), sample_size,
                  text_encoder=text, tokenizer=tokenizer, concat=spec.concat, sampling=sampling_defaults(spec))


def sampling_defaults(spec: ModelSpec) -> Any:
    from pipelines.models import SamplingDefaults

    return config_from_dict(SamplingDefaults, spec.sampling, "model.sampling", "model.sampling.")


def run(args: argparse.Namespace) -> None:
    """Check the config and the data, then build the models and train."""
    task = getattr(args, "task", "diffusion")
    config = read_config(args)
    if task == "clip":
        from ldm.modules.clip import ClipConfig

        config_from_dict(ClipConfig, config.clip, args.config, "clip.")
    elif task != "autoencoder":
        check_model_spec(config.model, args.config)
    if task == "finetune":
        from pipelines.training.lora import check_finetune

        check_finetune(config, args.config)
    if task == "ti":
        from pipelines.training.textual_inversion import check_textual_inversion

        check_textual_inversion(config, args.config)
    if task == "controlnet":
        from pipelines.training.controlnet import check_controlnet

        check_controlnet(config, args.config)
    with RunLock(config.output_dir) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext():
        check_resume_config(config, getattr(args, "allow_config_change", []))
        _train(task, config, build_dataset(config.data, task), args.config)


def _train(task: str, config: TrainConfig, dataset: Any, source: str) -> None:
    from ldm.training.loop import run_training

    if task == "ti":  # before any model is built
        from pipelines.training.textual_inversion import check_captions, check_textual_inversion

        check_captions(dataset, check_textual_inversion(config, source))
    torch.manual_seed(config.seed)  # weight initialisation of whatever is built from configs (and LoRA's A)
    trainer = build_task(task, config, source)
    final = run_training(config, trainer, dataset, on_checkpoint=checkpoint_hooks(config, task))
    logger.info("model written to %s", final)
    if task == "finetune":
        from pipelines.training.lora import export_finetuned

        export_finetuned(trainer, config.output_dir)


def check_scale_factor(value: Any, source: str) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{source}: model.vae.scale_factor={value!r} is not allowed; allowed: a number > 0 or 'auto'")
    return float(value)


def resolve_scale_factor(value: Any, vae: Any, data: DataConfig, count: int = 512) -> float:
    """``value``, or for "auto" 1/std of the posterior means of the first ``count`` training images."""
    if value != "auto":
        return check_scale_factor(value, "config")
    from ldm.training.loop import collate

    dataset = build_dataset(data)
    images = collate([dataset[i] for i in range(min(count, len(dataset)))])["image"]
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).mean for chunk in images.split(64)])
    scale = 1.0 / float(latents.std())
    logger.info("model.vae.scale_factor: auto = 1/std of %d images' latents = %.5f", len(images), scale)
    return scale


def load_text_encoder(source: str) -> TextEncoder:
    """The text encoder of a CLIP folder (its text tower) or of a model folder, or of a demo name."""
    from pipelines.base import resolve_source

    path = resolve_source(source)
    if (path / "config.json").is_file() and not (path / "model.yaml").is_file():
        from ldm.modules.clip import load_clip, text_encoder_from_clip

        return text_encoder_from_clip(load_clip(path))
    from pipelines import load_models

    text = load_models(path).text_encoder
    if text is None:
        raise ConfigError(f"model.text_encoder_from={source!r} has no text encoder; allowed: a CLIP or text-to-image "
                          "model folder")
    return text


def load_autoencoder(path: str) -> AutoencoderKL:
    """The autoencoder of any model folder (``ldm train-autoencoder`` writes one with only that)."""
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.io import read_checkpoint
    from pipelines.base import resolve_source

    checkpoint = read_checkpoint(resolve_source(path))
    vae = AutoencoderKL(config_from_dict(AutoencoderConfig, checkpoint.config["vae"], str(path), "vae."))
    vae.load_state_dict(checkpoint.weights["vae"])
    return vae


def build_task(task: str, config: TrainConfig, source: str) -> Any:
    """The models of ``task``, wrapped in its training task."""
    spec = config.model
    if task == "autoencoder":
        from autoencoder import AutoencoderConfig, AutoencoderKL
        from autoencoder.train import AutoencoderTask

        vae_from = spec.init_from or spec.autoencoder_from
        vae = load_autoencoder(vae_from) if vae_from else AutoencoderKL(AutoencoderConfig(**spec.vae))
        perceptual = None
        if config.lpips_weights:
            from autoencoder.losses import load_lpips

            perceptual = load_lpips(config.lpips_weights)
        return AutoencoderTask(vae, config.loss, source, perceptual)
    if task == "clip":
        return clip_task(config, source)
    models = build_models(spec, config.data)
    if task == "classifier":
        from ldm.modules.classifier import ClassifierConfig, NoiseAwareClassifier
        from pipelines.training.classifier import CLASS_NAMES, ClassifierTask

        fields = {"in_channels": models.vae.config.latent_channels, "num_classes": len(CLASS_NAMES),
                  **config.classifier}
        models.classifier = NoiseAwareClassifier(config_from_dict(ClassifierConfig, fields, source, "classifier."))
        models.class_names = models.class_names or CLASS_NAMES
        return ClassifierTask(models, config.objective.latents)
    if task == "finetune":
        from pipelines.training.lora import finetune_task

        return finetune_task(config, models, source)
    if task == "ti":
        from pipelines.training.textual_inversion import textual_inversion_task

        return textual_inversion_task(config, models, source)
    if task == "controlnet":
        from pipelines.training.controlnet import controlnet_task

        return controlnet_task(config, models, source)
    from pipelines.training.diffusion import DiffusionTask

    return DiffusionTask(config, models)


def clip_task(config: TrainConfig, source: str) -> Any:
    """A CLIP of ``config.clip``'s sizes (or the one of ``model.init_from``) in its contrastive task."""
    from ldm.conditioning.tokenizer import ClipTokenizer, pad_token_id_for
    from ldm.modules.clip import ClipConfig, build_clip, load_clip
    from ldm.training.clip import ClipTask

    if config.model.init_from:
        from pipelines.base import resolve_source

        clip = load_clip(resolve_source(config.model.init_from))
    else:
        clip = build_clip(config_from_dict(ClipConfig, config.clip, source, "clip."))
    pad = pad_token_id_for("clip")  # transformers' CLIPTextModel: padded with the end token, as SD v1
    tokenizer = ClipTokenizer(max_length=clip.config.text_config.max_position_embeddings, pad_token_id=pad)
    return ClipTask(clip, tokenizer)


def checkpoint_hooks(config: TrainConfig, task: str) -> Any:
    """What runs at each checkpoint of a text-to-image run: the sample grid and the adherence curve."""
    if task not in ("diffusion", "finetune"):
        return None
    if config.eval_every and config.eval_every % config.checkpoint_every:
        raise ConfigError(f"eval_every={config.eval_every} is not allowed with checkpoint_every="
                          f"{config.checkpoint_every}; allowed: 0 or a multiple of checkpoint_every")
    hooks = [sample_grid_writer(config)] if config.sample_prompts else []
    hooks += [adherence_curve_writer(config)] if config.eval_every else []
    return lambda step, folder, accelerator: [hook(step, folder, accelerator) for hook in hooks]


def adherence_curve_writer(config: TrainConfig):
    """A checkpoint hook: every ``eval_every`` steps (and at the end), the detector's adherence of the checkpoint's
    (EMA) model on ``eval_count`` held-out prompts, appended to ``OUTPUT_DIR/curve.jsonl`` with the samples seen."""

    def write(step: int, folder: Any, accelerator: Any) -> None:
        import json

        from pipelines import TextToImagePipeline
        from pipelines.evaluation.text_to_image import generate_batches, heldout_prompts, split_adherence

        if step % config.eval_every and step != config.optim.max_steps:
            return
        pipe = TextToImagePipeline.from_pretrained(folder / "model", device=accelerator.device)
        prompts = heldout_prompts(config.eval_count, config.eval_seed)
        images = generate_batches(pipe, prompts, 7.5, 25, "dpmpp_2m", seed=config.eval_seed, batch_size=64)
        o = config.optim
        record = {"step": step, "samples": step * o.batch_size * o.grad_accum * accelerator.num_processes,
                  **split_adherence(prompts, images)}
        with open(Path(config.output_dir) / "curve.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        flat = {f"adherence/{part}.{key}": value for part in ("one_object", "two_object")
                for key, value in record[part].items()}
        accelerator.log(flat, step=step)

    return write


def sample_grid_writer(config: TrainConfig):
    """A checkpoint hook: a grid of ``sample_prompts`` from the checkpoint's (EMA) model, written to
    ``OUTPUT_DIR/samples/step-N.png`` and logged to the tracker. Skipped for models it cannot
    sample from prompts alone (adapter-only checkpoints, concat conditions)."""

    def write(step: int, folder: Any, accelerator: Any) -> None:
        import numpy as np

        from ldm.config import load_yaml
        from pipelines import TextToImagePipeline
        from pipelines.images import make_grid, save_png

        model = folder / "model"
        if not (model / "unet.safetensors").is_file():
            return
        spec = load_yaml(model / "model.yaml")
        if "text_encoder" not in spec or spec.get("concat"):
            return
        pipe = TextToImagePipeline.from_pretrained(model, device=accelerator.device)
        images = pipe(list(config.sample_prompts), num_inference_steps=config.sample_steps, seed=config.seed,
                      progress=False).images
        grid = make_grid(images)
        out = folder.parent.parent / "samples" / f"step-{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_png(grid, out)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")

    return write


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm train", description="Train a latent diffusion model from a YAML config.")
    add_common_arguments(parser)
    parser.add_argument("--task", choices=TASKS, default="diffusion", help="what to train (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        run(args)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError
        sys.stderr.write(f"ldm: error: {err}\n")
        return 2
    except TrainingStopped as err:
        sys.stderr.write(f"ldm: {err}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("ldm: interrupted (Ctrl-C)\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
