"""Textual-inversion embedding files (Gal et al. 2022): one learned token of n vectors (n, D).

Layouts read (nothing is unpickled beyond ``torch.load(weights_only=True)``):

- AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": str, "step": …}``;
- AUTOMATIC1111 ``.safetensors``: ``{"emb_params": (n, D)}`` (the token is the file's name);
- diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{"<token>": (D,) or (n, D)}``; a folder holding one
  of them is read too.

A token of n > 1 vectors is used as n tokens ``<tok> <tok>_1 … <tok>_{n-1}``, as diffusers expands it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ldm.io.files import PICKLE_SUFFIXES, CheckpointError, _load_pickle, _load_safetensors

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")  # what diffusers saves in a folder
SDXL_KEYS = {"clip_l", "clip_g"}


@dataclass(frozen=True)
class TextualInversion:
    """``vectors`` (n, D) of one embedding; ``token``: the file's own token (the diffusers key, the A1111
    ``name``), or the file's stem when it names none (A1111 ``emb_params``); ``layout``: "a1111" | "diffusers"."""

    token: str
    vectors: Tensor
    layout: str
    path: Path


def read_textual_inversion(path: str | Path, width: int | None = None) -> TextualInversion:
    """The embedding in ``path`` (a file, or a folder holding diffusers' ``learned_embeds.*``); with ``width``,
    a ``ValueError`` naming the file when its vectors are not (n, width)."""
    path = _embedding_file(Path(path))
    state = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)
    token, vectors, layout = _parse(path, state)
    if vectors.ndim == 1:
        vectors = vectors[None]  # (D,) -> (1, D)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: the embedding has shape {tuple(vectors.shape)} ({vectors.dtype}); "
                              "allowed: float vectors (D,) or (n, D)")
    if width is not None and vectors.shape[1] != width:
        raise ValueError(f"{path}: textual-inversion embedding of shape {tuple(vectors.shape)} does not fit this "
                         f"text encoder; allowed: (n, {width}), its width {width}")
    return TextualInversion(token=token, vectors=vectors.detach(), layout=layout, path=path)


def expand_token(token: str, n: int) -> list[str]:
    """diffusers' names of the n tokens of a multi-vector embedding: ``<tok>, <tok>_1, …, <tok>_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _embedding_file(path: Path) -> Path:
    if path.is_dir():
        for name in DIFFUSERS_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without {' or '.join(DIFFUSERS_NAMES)}; "
                              "allowed: an embedding file or a folder holding one of them")
    if not path.is_file():
        raise CheckpointError(f"textual-inversion embedding {str(path)!r} does not exist")
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        allowed = ", ".join((".safetensors",) + PICKLE_SUFFIXES)
        raise CheckpointError(f"{path}: unknown embedding file type {path.suffix!r}; allowed: {allowed}")
    return path


def _parse(path: Path, state: dict) -> tuple[str, Tensor, str]:
    """(token, vectors, layout) of a loaded file, as diffusers' ``_retrieve_tokens_and_embeddings`` reads it."""
    if "string_to_param" in state:  # A1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), Tensor):
            raise CheckpointError(f"{path}: string_to_param holds {_describe(params)}; allowed: one tensor under '*'")
        name = state.get("name")
        return (name if isinstance(name, str) and name else path.stem), next(iter(params.values())), "a1111"
    if isinstance(state.get("emb_params"), Tensor):  # A1111 .safetensors
        return path.stem, state["emb_params"], "a1111"
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if len(state) == 1 and len(tensors) == 1:  # diffusers: {"<token>": vectors}
        token, vectors = next(iter(tensors.items()))
        return token, vectors, "diffusers"
    if SDXL_KEYS <= set(state):
        raise CheckpointError(f"{path}: an SDXL embedding (clip_l, clip_g); allowed: SD v1/v2 embeddings "
                              "(string_to_param, emb_params or one token)")
    raise CheckpointError(f"{path}: not a textual-inversion embedding (keys: {', '.join(map(str, list(state)[:5]))}); "
                          "allowed: A1111 string_to_param / emb_params, or diffusers' single {token: tensor}")


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return f"{len(value)} entries ({', '.join(map(str, list(value)[:5]))})"
    return type(value).__name__
