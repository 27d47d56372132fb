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


def mask_tensor(mask: ImageInput, name: str = "mask_image") -> Tensor:
    """Inpainting mask, white (1) = generate, black (0) = keep: a PIL image (converted to grayscale, as diffusers
    does), an (H, W) uint8 array, a float tensor (B, 1, H, W) in [0, 1], or a file path → (B, 1, H, W) in [0, 1]."""
    if isinstance(mask, (str, Path)):
        mask = _open(mask, name)
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"{name} is an array of shape {mask.shape} and dtype {mask.dtype}; allowed: (H, W) uint8")
        mask = torch.from_numpy(mask.copy())[None, None].float() / 255
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1 or not mask.dtype.is_floating_point:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} is {shape}; allowed: a PIL image, (H, W) uint8 array or (B, 1, H, W) float tensor")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"{name} has values outside [0, 1]; allowed: 0 (keep) to 1 (generate)")
    return mask.float()


def blur_mask(mask: Tensor, sigma: float) -> Tensor:
    """``mask`` (B, 1, H, W) blurred by a Gaussian of std ``sigma`` pixels (separable, reflected at the borders):
    the soft edge the WebUIs' "mask blur" gives."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(mask, (radius, radius, radius, radius), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, -1, 1)).clamp(0, 1)


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


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> None:
    """Write a PNG carrying ``parameters`` in its "parameters" text chunk (as the SD WebUIs read it back)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:  # a failed write (disk full) leaves no half image and names the file
        image.save(tmp, format="PNG", pnginfo=info)
