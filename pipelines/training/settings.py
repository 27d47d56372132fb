"""The small JSON file beside what an adapter trainer writes (LoRA, textual inversion, ControlNet): its format
name, the task section's settings and the base model it was trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from ldm.config import config_from_dict, config_to_dict
from ldm.io import CheckpointError
from ldm.io.files import read_json_object, write_text_atomic

T = TypeVar("T")


def base_model_name(source: str) -> str:
    """How a settings file names the base model: a shipped demo's name as it is, a path made absolute."""
    from pipelines.base import DEMO_MODELS

    return source if source in DEMO_MODELS else str(Path(source).resolve())


def write_settings(path: Path, fmt: str, section: str, settings: Any, base_model: str | None) -> None:
    """``{"format": fmt, "base_model": …, section: settings}`` written atomically to ``path``."""
    meta = {"format": fmt, "base_model": base_model, section: config_to_dict(settings)}
    write_text_atomic(path, json.dumps(meta, indent=2) + "\n")


def read_settings(path: Path, fmt: str, section: str, cls: type[T], missing: str) -> tuple[T, str | None]:
    """The settings (checked into ``cls``) and the base model path of a file ``write_settings`` wrote;
    ``CheckpointError`` with ``missing`` when there is none, or naming another format."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}; {missing}")
    meta = read_json_object(path)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: format={meta.get('format')!r}; expected {fmt!r}")
    return config_from_dict(cls, meta.get(section, {}), str(path), f"{section}."), meta.get("base_model")
