"""Conditioning: CLIP tokenizer and text encoders (labels and spatial conditioning beside them).

Names are imported lazily so that ``import ldm.conditioning`` stays cheap (transformers and
open_clip load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipTokenizer": "ldm.conditioning.tokenizer",
    "TextEncoder": "ldm.conditioning.text",
    "TextEncoderConfig": "ldm.conditioning.text",
    "PRESETS": "ldm.conditioning.text",
    "clip_skip_from_diffusers": "ldm.conditioning.text",
    "parse_prompt_attention": "ldm.conditioning.prompt_weights",
    "encode_prompts": "ldm.conditioning.prompts",
    "encode_prompt_pair": "ldm.conditioning.prompts",
    "pad_to_same_chunks": "ldm.conditioning.prompts",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
