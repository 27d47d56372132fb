"""A network's size, known before it is allocated: built once on PyTorch's meta device (shapes, no memory),
its parameters counted against a limit, so that an absurd config is an error, not a swapping machine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)
MAX_PARAMETERS = 10**10  # 40 GB of float32 weights; SDXL's U-Net has 2.6e9


def build_within_limit(build: Callable[[], M], what: str, limit: int = MAX_PARAMETERS) -> M:
    """``build()``, after its meta-device twin showed at most ``limit`` parameters (``ValueError`` naming ``what``)."""
    with torch.device("meta"):
        count = sum(p.numel() for p in build().parameters())
    if count > limit:
        raise ValueError(f"{what}: the config makes a network of {count:.3g} parameters; allowed: at most "
                         f"{limit:.0e} (check its channel and layer counts)")
    return build()
