"""Checkpoint formats: our folders, original SD single files and diffusers folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.io.checkpoint import Checkpoint, detect_format, read_folder, write_folder
from ldm.io.files import CheckpointError, load_state_dict, save_state_dict

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "detect_format",
    "export_checkpoint",
    "load_state_dict",
    "read_checkpoint",
    "save_state_dict",
]


def read_checkpoint(path: str | Path, **options: Any) -> Checkpoint:
    """Read any supported format; ``options`` go to the single-file reader
    (``use_ema``, ``prediction_type``, ``overrides``)."""
    kind = detect_format(path)
    if kind != "single_file":
        options.pop("use_ema", None)  # folders keep EMA weights apart already
        if options:
            raise ValueError(f"{', '.join(options)}: only for SD single files; {path} is a {kind} with its own config")
    if kind == "folder":
        return read_folder(path)
    if kind == "diffusers":
        from ldm.io.diffusers_folder import read_diffusers

        return read_diffusers(path)
    from ldm.io.single_file import read_single_file

    return read_single_file(path, **options)


def export_checkpoint(checkpoint: Checkpoint, path: str | Path, to: str) -> None:
    """Write ``checkpoint`` as ``to`` = "folder" (ours), "diffusers" or "sd" (original single file)."""
    if to in ("diffusers", "sd") and set(checkpoint.weights) != {"unet", "vae", "text_encoder"}:
        raise ValueError(
            f"to={to!r} needs a text-to-image model (U-Net, VAE, text encoder); this one has "
            f"{', '.join(sorted(checkpoint.weights))}"
            f"{' and concat conditioning' if 'concat' in checkpoint.config else ''}"
        )
    if to == "folder":
        write_folder(checkpoint, path)
    elif to == "diffusers":
        from ldm.io.diffusers_folder import write_diffusers

        write_diffusers(checkpoint, path)
    elif to == "sd":
        from ldm.io.single_file import write_single_file

        write_single_file(checkpoint, path)
    else:
        raise ValueError(f"to={to!r} is not supported; allowed: 'folder', 'diffusers', 'sd'")
