"""Memory switches with diffusers' names: attention slicing, VAE slicing and tiling, CPU offload.

Each trades time for peak memory and leaves the images as they were (tiling: within the blend of its overlaps;
see benchmarks/pipeline_memory.py for the measured peaks).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from autoencoder import tiled_decode
from ldm.modules.attention import CrossAttention
from ldm.validation import check_int

logger = logging.getLogger(__name__)

DEFAULT_TILE = 64  # latent pixels (512 image pixels at f = 8), overlapping by a quarter


class MemorySwitches:
    """Mixed into :class:`pipelines.base.Pipeline` (which provides ``models`` and ``device``)."""

    models: Any
    device: torch.device
    vae_slicing: bool = False
    vae_tile: int | None = None

    def enable_attention_slicing(self, slice_size: int | str | None = "auto") -> None:
        """Attention over ``slice_size`` heads at a time ("auto": half of them; "max": one), so that one head's
        attention matrix is held at a time instead of all of them."""
        for module in self.models.unet.modules():
            if isinstance(module, CrossAttention):
                module.slice_size = _slice(slice_size, module.heads)

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def enable_vae_tiling(self, tile: int = DEFAULT_TILE) -> None:
        """Decode in ``tile``×``tile`` latent tiles that overlap by a quarter and are blended (no seams): memory
        bounded by the tile whatever the image size. A call's ``tile=`` overrides it."""
        self.vae_tile = check_int("tile", tile, 8)

    def disable_vae_tiling(self) -> None:
        self.vae_tile = None

    def enable_model_cpu_offload(self, gpu_id: int = 0) -> None:
        """Keep each model in CPU memory and move it to the GPU only while it runs (accelerate hooks): the text
        encoder, then the U-Net, then the VAE."""
        from accelerate import cpu_offload_with_hook

        device, hook = self._offload_device(gpu_id), None
        for model in (self.models.text_encoder, self.models.unet, self.models.vae):
            if model is not None:
                _, hook = cpu_offload_with_hook(model.to("cpu"), device, prev_module_hook=hook)
        self.device = device

    def enable_sequential_cpu_offload(self, gpu_id: int = 0) -> None:
        """Keep every weight in CPU memory and move each submodule to the GPU only for its forward (accelerate
        cpu_offload): the least GPU memory, the slowest."""
        from accelerate import cpu_offload

        device = self._offload_device(gpu_id)
        for model in (self.models.text_encoder, self.models.unet, self.models.vae):
            if model is not None:
                cpu_offload(model.to("cpu"), device)
        self.device = device

    @staticmethod
    def _offload_device(gpu_id: int) -> torch.device:
        if not torch.cuda.is_available():
            raise ValueError("CPU offload moves models to a GPU while they run; this machine has no CUDA device, "
                             "so the models already run from CPU memory: allowed here: attention slicing, VAE "
                             "slicing and tiling")
        check_int("gpu_id", gpu_id, 0, torch.cuda.device_count() - 1)
        return torch.device("cuda", gpu_id)

    def decode_latents(self, z: Tensor, tile: int | None) -> Tensor:
        """The VAE's images of unscaled latents ``z``, tiled (``tile`` or the pipeline's) and/or one by one."""
        vae, tile = self.models.vae, tile or self.vae_tile
        parts = z.split(1) if self.vae_slicing else (z,)
        return torch.cat([tiled_decode(vae, part, tile, tile // 4) if tile else vae.decode(part) for part in parts])


def _slice(slice_size: int | str | None, heads: int) -> int | None:
    if slice_size is None:
        return None
    if slice_size == "auto":
        return max(1, heads // 2)
    if slice_size == "max":
        return 1
    return check_int("slice_size", slice_size, 1)
