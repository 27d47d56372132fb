"""``ldm train CONFIG`` — also ``accelerate launch -m ldm.train CONFIG`` for several processes.

Like the CLI this is an entry point (nothing imports it), so it may assemble the pipelines'
model container; the loop itself (ldm.training) only sees modules.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ldm.config import config_from_dict
from ldm.training.config import DataConfig, ModelSpec, TrainConfig, load_train_config

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


def read_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {"output_dir": args.output_dir, "max_steps": args.max_steps,
                 "checkpoint_every": args.checkpoint_every, "seed": args.seed}
    return load_train_config(args.config, overrides, args.set)


def build_dataset(data: DataConfig, source: str = "config") -> Any:
    """The dataset, checked in full (folders: every image opens) before any model is built."""
    if data.kind == "folder":
        from ldm.data.folder import ImageCaptionFolder

        return ImageCaptionFolder(data.path, data.image_size)
    from ldm.data.shapes import ShapesDataset

    return ShapesDataset(seed=data.seed, length=data.length, two_object_prob=data.two_object_prob,
                         drop_prob=data.drop_prob, image_size=data.image_size)


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
    if spec.text_encoder is not None:
        config_from_dict(TextEncoderConfig, spec.text_encoder, source, "model.text_encoder.")
    if not spec.autoencoder_from:
        config_from_dict(AutoencoderConfig, spec.vae, source, "model.vae.")


def build_models(spec: ModelSpec, data: DataConfig) -> Any:
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.conditioning.text import TextEncoder, TextEncoderConfig
    from ldm.conditioning.tokenizer import ClipTokenizer
    from ldm.diffusion.schedule import ScheduleConfig
    from ldm.modules.unet import UNet, UNetConfig
    from pipelines import Models, load_models

    if spec.init_from:
        return load_models(spec.init_from)
    if spec.autoencoder_from:
        vae = load_models(spec.autoencoder_from).vae
    else:
        vae = AutoencoderKL(AutoencoderConfig(**spec.vae))
    text = TextEncoder(TextEncoderConfig(**spec.text_encoder)) if spec.text_encoder is not None else None
    pad = 0 if text is not None and text.config.kind == "openclip" else 49407
    tokenizer = ClipTokenizer(max_length=text.config.max_length, pad_token_id=pad) if text is not None else None
    sample_size = spec.sample_size or data.image_size // vae.downsample_factor
    return Models(UNet(UNetConfig(**spec.unet)), vae, ScheduleConfig(**spec.schedule), sample_size,
                  text_encoder=text, tokenizer=tokenizer, concat=spec.concat)


def run(args: argparse.Namespace) -> None:
    """Check the config and the data, then build the models and train."""
    config = read_config(args)
    check_model_spec(config.model, args.config)
    dataset = build_dataset(config.data, args.config)
    from ldm.training.diffusion import train

    torch.manual_seed(config.seed)  # weight initialisation of whatever is built from configs
    final = train(config, build_models(config.model, config.data), dataset)
    logger.info("model written to %s", final)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm train", description="Train a latent diffusion model from a YAML config.")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        run(args)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError
        print(f"ldm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
