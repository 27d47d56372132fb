"""How a pipeline runs fast: the exact fast path (on by default) and ``torch.compile`` (opt-in).

The exact fast path changes how, not what, is computed (images within 1e-5 of the plain path; benchmarks/
pipeline_vs_diffusers.py measures it): the text context's cross-attention keys and values once per call
(ldm.modules.attention.cached_context_projections), the autoencoder in channels-last memory format, nearest ×2
upsampling fused with the 3×3 conv after it (ldm.modules.upsample), SiLU and residual adds in place in the
autoencoder at inference. ``torch.compile`` (inductor) compiles the U-Net on its first call for each input shape;
PyTorch keeps the compiled code in a cache on disk that later processes reuse."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def apply_fast_path(models: Any, enabled: bool) -> None:
    """Memory formats of the fast path (``enabled``) or the plain ones: the autoencoder's convolutions run in
    channels-last on every device (on this CPU 20% faster decoding; the U-Net gains nothing and stays)."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    models.vae.to(memory_format=fmt)


def compile_unet(unet: torch.nn.Module, device: torch.device) -> bool:
    """``unet`` compiled in place with ``torch.compile`` (on its first call); False with a one-line warning when
    the compiler cannot run here (no C++ compiler for CPU code), so that sampling goes on uncompiled."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        logger.warning("compile=True: no C++ compiler (g++, c++ or clang++) on PATH, which torch.compile needs for "
                       "CPU code; running without compilation")
        return False
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-toolkit" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))  # kept across processes (default: /tmp)
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a compiler failure falls back to eager code, with a warning
    if device.type == "cpu":
        logger.warning("compile=True on a CPU: the compiled U-Net measured no faster than the eager one on our CPU, "
                       "after minutes of compilation (docs/performance.md); torch.compile pays on GPUs")
    unet.compile()
    return True


class WarmUpTimer:
    """Logs how long the first sampling call of each latent shape took under ``torch.compile`` (its warm-up:
    compilation, or loading the compiled code from the cache)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, ...]] = set()

    def start(self, shape: tuple[int, ...]) -> float | None:
        return None if shape in self.seen else time.perf_counter()

    def stop(self, shape: tuple[int, ...], started: float | None) -> None:
        if started is not None:
            self.seen.add(shape)
            logger.info("torch.compile warm-up for latents %s: %.1f s (compiling, or loading the cache); later "
                        "calls of this shape run compiled", tuple(shape), time.perf_counter() - started)
