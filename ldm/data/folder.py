"""Image-caption folders in the diffusers / Hugging Face ``imagefolder`` convention: images beside
a ``metadata.jsonl`` whose lines read ``{"file_name": "a.png", "text": "a caption"}``.

The whole folder is checked when the dataset is built (before any model is), so a typo fails
at once with the path and line that caused it, not an hour into training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ldm.data.shapes import to_unit_range
from ldm.validation import check_int

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
KEYS = ("file_name", "text")


def _parse_line(line: str, where: str) -> tuple[str, str]:
    """(file_name, text) of one metadata line; ``where`` is "file:line" for the errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {KEYS}, got {type(record).__name__}")
    missing = [key for key in KEYS if key not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; each line needs {KEYS}")
    bad = [key for key in KEYS if not isinstance(record[key], str)]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} must be a string, got {record[bad[0]]!r}")
    return record["file_name"], record["text"]


def _inside(root: Path, name: str, where: str) -> Path:
    """``root / name`` resolved (links followed), refused unless it stays inside ``root``; checked before
    anything is looked up, so the error says nothing about files outside."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: file_name {name!r} leads outside the image folder {root}; "
                         "allowed: a path inside it")
    return path


def _check_image(path: Path, where: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a file PIL can decode in full (a truncated file fails here,
    not hours into training)."""
    if not path.is_file():
        raise ValueError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise ValueError(f"{where}: image {path} cannot be read ({type(err).__name__}: {err})") from None


def read_metadata(root: str | Path) -> list[tuple[Path, str]]:
    """Validated (image path, caption) pairs of a folder; ``ValueError`` naming the path for a
    missing folder or metadata file, a bad line, a missing or unreadable image, or no items."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    metadata = root / METADATA
    if not metadata.is_file():
        raise ValueError(f'image folder {root} has no {METADATA} (lines of {{"file_name": ..., "text": ...}})')
    items = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"{metadata}:{number}"
            name, text = _parse_line(line, where)
            path = _inside(root, name, where)
            _check_image(path, where)
            items.append((path, text))
    if not items:
        raise ValueError(f"{metadata} lists no images; the dataset would be empty")
    return items


def resize_and_crop(image: Image.Image, size: int, center_crop: bool = True) -> Image.Image:
    """Shorter side to ``size`` (bicubic) and the central ``size``×``size`` square; without
    ``center_crop`` the whole image is resized to the square (aspect ratio not kept)."""
    if not center_crop:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCaptionFolder(Dataset):
    """Items ``{"image": float (3, S, S) in [-1, 1], "caption": str}`` of a validated folder."""

    def __init__(self, root: str | Path, image_size: int, center_crop: bool = True) -> None:
        self.root = Path(root)
        self.image_size = check_int("image_size", image_size, 1)
        self.center_crop = center_crop
        self.items = read_metadata(self.root)
        log.info("image folder %s: %d images", self.root, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        path, caption = self.items[index]
        with Image.open(path) as image:
            image = resize_and_crop(image.convert("RGB"), self.image_size, self.center_crop)
        return {"image": to_unit_range(np.array(image)), "caption": caption}
