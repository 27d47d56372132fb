"""Training checkpoints: one folder per step, written under a temporary name and renamed into
place, so a run killed at any moment leaves its previous checkpoint whole.

``checkpoints/step-00001000/`` holds ``model/`` (our model folder: loads with
``from_pretrained``), ``ema.safetensors``, ``optimizer.pt`` and ``state.json``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ldm.io.files import commit_folder, naming_write_errors, save_state_dict, save_torch

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    folder = root / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, step: int, write_model, ema_state: dict, optimizer_state: dict,
                    state: dict[str, Any], keep: int) -> Path:
    """Write everything into a fresh ``.tmp-step-N.XXXX`` folder, flush it to disk, then rename it to
    ``step-N`` (atomic on POSIX) and flush the rename."""
    final = checkpoint_dir(root, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
    try:
        with naming_write_errors(final):
            write_model(tmp / "model")
            save_state_dict(ema_state, tmp / "ema.safetensors")
            save_torch(optimizer_state, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
            commit_folder(tmp, final)
    except BaseException:  # a failed write (disk full) or a signal: the previous checkpoint stays the newest
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    logger.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (root / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_optimizer_state(path: Path) -> dict:
    return torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())
