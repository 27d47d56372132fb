"""Helpers the trainer tests share: a small captioned image folder, and running a trainer through the CLI while
keeping the task it built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import ldm_toolkit.train
from ldm_toolkit.cli import main as cli_main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def caption_folder(images: Path, word: str) -> Path:
    """8 coloured 8×8 squares on black in 16×16 PNGs (left for the first four, right for the rest) with a
    metadata.jsonl captioning each "a COLOUR WORD on the SIDE"."""
    lines = []
    images.mkdir()
    for i in range(8):
        name, rgb = list(COLOURS.items())[i % 4]
        image, x = Image.new("RGB", (16, 16)), 2 + 6 * (i // 4)
        image.paste(rgb, (x, 4, x + 8, 12))
        image.save(images / f"{i}.png")
        side = "left" if i < 4 else "right"
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {name} {word} on the {side}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images


def run_capturing_task(argv: list[str], kind: type) -> object:
    """Run the ``ldm`` command ``argv`` (it must succeed) and return the one training task it built, of ``kind``."""
    found = []
    real = ldm_toolkit.train.build_task

    def spy(*args: object, **kwargs: object) -> object:
        found.append(real(*args, **kwargs))
        return found[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ldm_toolkit.train, "build_task", spy)
        assert cli_main(argv) == 0
    (task,) = found
    assert isinstance(task, kind)
    return task
