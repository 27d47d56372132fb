"""Inputs as tensors: RGB images to (B, 3, H, W) in [-1, 1], label maps to (B, H, W) integers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.io.files import atomic_path

ImageInput = Image.Image | np.ndarray | Tensor | str | Path


def image_tensor(image: ImageInput, name: str = "image") -> Tensor:
    """PIL RGB image, uint8 array (H, W, 3), float tensor (B, 3, H, W) in [0, 1], or a file path."""
    if isinstance(image, (str, Path)):
        image = _open(image, name)
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{name} has mode {image.mode!r}; allowed: 'RGB'")
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name} is an array of shape {image.shape} and dtype {image.dtype}; "
                             "allowed: (H, W, 3) uint8")
        image = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} is {shape}; allowed: a PIL RGB image, (H, W, 3) uint8 array or (B, 3, H, W) tensor")
    return image.float() * 2 - 1


def label_map_tensor(labels: ImageInput, name: str = "semantic_map") -> Tensor:
    """Label map: PIL 'L'/'P' image, (H, W) integer array or (B, H, W) integer tensor, or a file path."""
    if isinstance(labels, (str, Path)):
        labels = _open(labels, name)
    if isinstance(labels, Image.Image):
        if labels.mode not in ("L", "P"):
            raise ValueError(f"{name} has mode {labels.mode!r}; allowed: 'L' or 'P' (one label per pixel)")
        labels = np.asarray(labels)
    if isinstance(labels, np.ndarray):
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name} is an array of shape {labels.shape} and dtype {labels.dtype}; "
                             "allowed: (H, W) integers")
        labels = torch.from_numpy(labels.astype(np.int64))[None]
    if not isinstance(labels, Tensor) or labels.ndim != 3 or labels.dtype.is_floating_point:
        raise ValueError(f"{name} must be a label map (H, W) or (B, H, W) of integers")
    return labels.long()


def _open(path: str | Path, name: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}={str(path)!r} is not a readable image ({err})") from None


def make_grid(images: list, columns: int | None = None):
    """Paste equal-sized PIL images into a grid of ``columns`` (default: about square)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a"}


def generation_parameters(prompt: str, negative_prompt: str | None, steps: int, sampler: str, guidance_scale: float,
                          seed: int | None, size: tuple[int, int], model: str, **extra: object) -> str:
    """The A1111 "parameters" text: the prompt, ``Negative prompt: …`` and one line of ``Key: value`` pairs."""
    pairs = {"Steps": steps, "Sampler": A1111_SAMPLERS.get(sampler, sampler), "CFG scale": guidance_scale,
             "Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model": model, **extra}
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {value}" for key, value in pairs.items() if value is not None)])


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> None:
    """Write a PNG carrying ``parameters`` in its "parameters" text chunk (as the SD WebUIs read it back)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:  # a failed write (disk full) leaves no half image and names the file
        image.save(tmp, format="PNG", pnginfo=info)
