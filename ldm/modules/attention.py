"""Cross-attention transformer blocks of the SD U-Net (Rombach et al. 2022, sec. 3.3).

Module and parameter names follow CompVis ``ldm/modules/attention.py`` so the state-dict keys
are those of the original Stable Diffusion checkpoints (``proj_in``, ``transformer_blocks.0.attn1.to_q``,
``ff.net.0.proj``, ...). Attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)V (Vaswani et al. 2017) of ``x`` over ``context``
    (self-attention when ``context`` is None); keys ``to_q``, ``to_k``, ``to_v``, ``to_out.0``."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # index 1 was a Dropout in CompVis
        self.slice_size: int | None = None  # heads per attention call (enable_attention_slicing); None: all
        self.kv_cache: dict[int, tuple] | None = None  # see cached_context_projections

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        batch, n, _ = x.shape
        k, v = self._keys_values(x) if context is None else self._context_keys_values(context)
        q = self._heads(self.to_q(x))
        if self.slice_size is None or self.slice_size >= self.heads:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # attention slicing: a few heads at a time hold their attention matrices
            out = torch.cat([F.scaled_dot_product_attention(q[:, i:i + self.slice_size], k[:, i:i + self.slice_size],
                                                            v[:, i:i + self.slice_size])
                             for i in range(0, self.heads, self.slice_size)], dim=1)
        return self.to_out(out.transpose(1, 2).reshape(batch, n, -1))  # (B, h, N, d) → (B, N, h·d)

    def _heads(self, projected: Tensor) -> Tensor:
        """(B, N, h·d) → (B, h, N, d); a view, SDPA accepts the strided layout."""
        return projected.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def _context_keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``context``; inside :func:`cached_context_projections` (and without autograd)
        computed once per context tensor and reused while neither it nor the projections changed."""
        cache = self.kv_cache
        if cache is None or torch.is_grad_enabled():
            return self._keys_values(context)
        stamp = (_stamp(context), _stamp(self.to_k.weight), _stamp(self.to_v.weight))
        entry = cache.get(id(context))
        if entry is not None and entry[0] is context and entry[1] == stamp:
            return entry[2], entry[3]
        k, v = self._keys_values(context)
        if len(cache) >= _KV_CACHE_ENTRIES:  # a few contexts per call (guided and conditional-only batches)
            cache.pop(next(iter(cache)))
        cache[id(context)] = (context, stamp, k, v)  # holding ``context`` keeps its id from being reused
        return k, v


_KV_CACHE_ENTRIES = 4


def _stamp(t: Tensor) -> tuple:
    """What changes when a tensor's values may have: its storage, layout and in-place version (inference tensors
    have no version counter and cannot change outside inference mode)."""
    version = None if t.is_inference() else t._version
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, version


@contextlib.contextmanager
def cached_context_projections(*models: nn.Module) -> Iterator[None]:
    """Within the block, each cross-attention layer of ``models`` projects a context tensor to keys and values
    once and reuses them while the same, unchanged tensor comes again: a sampler calls the U-Net with the same
    text context at every step, so ``to_k``/``to_v`` of the context need not run at each. Without autograd only;
    the cache is dropped on leaving the block."""
    layers = [m for model in models for m in model.modules() if isinstance(m, CrossAttention)]
    for layer in layers:
        layer.kv_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.kv_cache = None


class GEGLU(nn.Module):
    """GELU-gated linear unit x·GELU(g) (Shazeer 2020, eq. 5); key ``proj`` holds [x; g]."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward of width 4·dim; keys ``net.0.proj`` and ``net.2`` as in CompVis."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # residuals added in place: a linear layer does not keep its output for the backward pass
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around it (LDM sec. 3.3).

    ``proj_in``/``proj_out`` are 1×1 convolutions (SD v1) or, with ``use_linear``, linear layers
    (SD v2), with the same shapes in diffusers' format. Either way they run as a linear map on the
    (B, H·W, C) tokens, so the feature map changes layout once on the way in and once on the way out.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool, groups: int
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero_module in CompVis: the block starts as identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, C, H, W) → (B, H·W, C)
        h = self._project(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self._project(self.proj_out, h)
        return x + h.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, H·W, C) → (B, C, H, W)

    @staticmethod
    def _project(layer: nn.Linear | nn.Conv2d, h: Tensor) -> Tensor:
        """A linear layer, or a 1×1 conv applied as the same linear map on (B, H·W, C) tokens."""
        weight = layer.weight if isinstance(layer, nn.Linear) else layer.weight[:, :, 0, 0]
        return F.linear(h, weight, layer.bias)
