"""Reading and writing weight files safely: safetensors by default, ``.ckpt`` only through
``torch.load(weights_only=True)``, and every write atomic (temporary file, then rename)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what was found."""


class WriteError(OSError):
    """A file or folder could not be written (disk full, file too large, no permission); names the target."""

    def __init__(self, target: str | Path, reason: str) -> None:
        super().__init__(f"{target}: could not be written ({reason}); nothing was replaced")
        self.reason = reason


@contextlib.contextmanager
def naming_write_errors(target: str | Path) -> Iterator[None]:
    """Turn the errors writers raise when the disk refuses a write (``OSError``, safetensors' ``SafetensorError``)
    into one ``WriteError`` naming ``target``; the outermost target wins, so a file of a folder export is reported
    as the folder the user asked for."""
    try:
        yield
    except WriteError as err:
        raise WriteError(target, err.reason) from err.__cause__
    except (OSError, SafetensorError) as err:
        raise WriteError(target, str(err)) from err


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` (for state that is not a flat dict of tensors, e.g. an optimizer's), with its C++ stream
    errors on a full disk ("unexpected pos …", "file write failed": ``RuntimeError``) reported as ``WriteError``."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise WriteError(path, str(err).splitlines()[0]) from err


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a pickle checkpoint loaded with weights_only=True.

    A Lightning-style ``{"state_dict": {...}}`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        state = _load_pickle(path)
    else:
        allowed = ", ".join((".safetensors",) + PICKLE_SUFFIXES)
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; allowed: {allowed}")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (found keys: {', '.join(list(state)[:5]) or 'none'})")
    return tensors


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None


def _load_pickle(path: Path) -> dict:
    if _torch_version() < (2, 6):
        raise CheckpointError(f"{path}: pickle checkpoints are loaded only with torch >= 2.6, whose "
                              f"weights_only=True cannot be bypassed (CVE-2025-32434); this is torch "
                              f"{torch.__version__}: upgrade torch or convert the file to .safetensors elsewhere")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 5 …": the outcome is reported below instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"{path}: refused to unpickle: the file asks for more than plain tensors "
            f"({found[0].strip() if found else 'an unsupported object'}); "
            "only weights_only pickles or .safetensors files are loaded"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` (a unique name, created by us: nothing planted there is
    followed); on success flush it to disk and rename it over ``path``, then flush the folder, so that a crash
    or power cut leaves either the old file or the whole new one."""
    path = Path(path)
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with naming_write_errors(path):
            yield Path(tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


MAX_JSON_BYTES = 64 << 20  # the largest JSON of a model folder, a tokenizer.json, is a few MB


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file whose top level is an object; ``CheckpointError`` naming the file when it is missing,
    over ``MAX_JSON_BYTES``, not JSON, nested too deep to parse, or another type at the top."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes; allowed: at most {MAX_JSON_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the top level is a JSON {type(data).__name__}; allowed: an object {{...}}")
    return data


MODEL_MARKERS = ("model.yaml", "model_index.json", "config.json")  # ours, diffusers, transformers / CLIP


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` whole (a folder there is
    moved aside, then removed), so no reader sees files of two writes mixed and an interrupted write leaves the
    previous folder. Refuses a ``path`` that exists and is neither empty nor a model folder (``MODEL_MARKERS``):
    replacing it would delete what the user keeps there."""
    path = Path(path)
    if path.exists() and not _replaceable(path):
        raise CheckpointError(f"{path}: exists and is not a model folder ({', '.join(MODEL_MARKERS)}); "
                              "allowed: a new path, an empty folder or a model folder to replace")
    with naming_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with naming_write_errors(path):
            yield tmp
            commit_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_folder(tmp: Path, path: Path) -> None:
    """Flush the finished folder ``tmp`` to disk and put it in ``path``'s place (a folder there is moved aside,
    then removed), then flush the rename."""
    for item in [*tmp.rglob("*"), tmp]:  # files, then the folders' entries
        fsync_path(item)
    old = tmp.with_name(tmp.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _replaceable(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or any((path / name).is_file() for name in MODEL_MARKERS))


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to disk (folders: their entries, i.e. renames into them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) atomically, as ``atomic_path`` does."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_state_dict(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically (contiguous CPU copies; shared storage is split)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)
