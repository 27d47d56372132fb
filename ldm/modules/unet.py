"""The Stable Diffusion U-Net: a time-conditioned U-Net with cross-attention (Rombach et al. 2022).

``UNet().state_dict()`` has exactly the keys of an original SD checkpoint with the
``model.diffusion_model.`` prefix stripped (``time_embed.0``, ``input_blocks.N.M``,
``middle_block.{0,1,2}``, ``output_blocks.N.M``, ``out.{0,2}``, ``label_emb``), so an SD single
file loads after stripping the prefix. Block order and widths follow CompVis ``openaimodel.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer
from ldm.modules.resnet import Downsample, ResBlock, Upsample
from ldm.validation import check_int

# Keys older model files saved under ``unet:`` that are not architecture: read and ignored, never written.
# gradient_checkpointing is a training-time switch (TrainConfig.gradient_checkpointing, enable_gradient_checkpointing).
LEGACY_KEYS = ("gradient_checkpointing",)


def without_legacy_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """A saved U-Net config without the :data:`LEGACY_KEYS`, ready for ``UNetConfig``."""
    return {key: value for key, value in data.items() if key not in LEGACY_KEYS}


LIMITS = {"in_channels": 64, "out_channels": 64, "model_channels": 4096, "num_res_blocks": 16, "context_dim": 8192,
          "transformer_depth": 64, "norm_groups": 1024}  # upper bounds of the U-Net's integer settings


@dataclass
class UNetConfig:
    """U-Net hyper-parameters; the defaults are SD v1.5 (``v1-inference.yaml``).

    ``attention_levels`` are the indices into ``channel_mult`` whose blocks get a transformer
    (the middle block always has one). Exactly one of ``num_heads`` (SD v1: 8) and ``head_dim``
    (SD v2: 64) is set. ``in_channels`` > 4 means concat conditioning (inpainting: 9).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_projection: bool = False
    num_classes: int | None = None
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.channel_mult = _int_tuple("channel_mult", self.channel_mult, low=1, high=64)  # YAML, JSON: lists
        if len(self.channel_mult) > 8:
            raise ValueError(f"channel_mult={list(self.channel_mult)} has {len(self.channel_mult)} levels; "
                             "allowed: at most 8")
        self.attention_levels = _int_tuple("attention_levels", self.attention_levels, low=0, high=7)
        for name, high in LIMITS.items():  # generous bounds: a typo must not allocate the machine away
            check_int(name, getattr(self, name), 1, high)
        if not isinstance(self.use_linear_projection, bool):
            raise ValueError(f"use_linear_projection={self.use_linear_projection!r} must be a bool")
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1, 1_000_000)
        self._check_levels()

    def _check_levels(self) -> None:
        levels = list(range(len(self.channel_mult)))
        if not self.channel_mult:
            raise ValueError("channel_mult=() is empty; allowed: a non-empty tuple of positive integers")
        if list(self.attention_levels) != sorted(set(self.attention_levels) & set(levels)):
            raise ValueError(f"attention_levels={self.attention_levels!r} is not supported; "
                             f"allowed: increasing, distinct indices in {levels}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"num_heads={self.num_heads!r}, head_dim={self.head_dim!r}: set exactly one of them")
        name = "num_heads" if self.head_dim is None else "head_dim"
        check_int(name, getattr(self, name), 1)
        for channels in [self.model_channels, *self.level_channels]:
            if channels % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} does not divide {channels} channels; allowed: "
                                 "a divisor of model_channels and of every model_channels·channel_mult")
        for channels in {self.level_channels[i] for i in self.attention_levels} | {self.level_channels[-1]}:
            self.heads(channels)

    @property
    def level_channels(self) -> list[int]:
        """Feature channels of each resolution level: model_channels · channel_mult."""
        return [self.model_channels * mult for mult in self.channel_mult]

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a transformer on ``channels`` features, as in CompVis."""
        size = self.num_heads or self.head_dim
        if channels % size:
            name = "num_heads" if self.head_dim is None else "head_dim"
            raise ValueError(f"{name}={size} does not divide {channels} attention channels; allowed: a divisor of it")
        return (self.num_heads, channels // self.num_heads) if self.num_heads else (channels // size, size)


def _int_tuple(name: str, value: object, low: int, high: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={value!r} must be a list or tuple of integers >= {low}")
    return tuple(check_int(name, v, low, high) for v in value)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(-i/(dim/2)) (Vaswani et al.
    2017, sec. 3.5; CompVis order = diffusers ``flip_sin_to_cos=True, freq_shift=0``). (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedSequential(nn.Sequential):
    """A block of the U-Net: passes the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """The U-Net's embedding, encoder and middle block (``time_embed``, ``label_emb``, ``input_blocks``,
    ``middle_block``): what :class:`UNet` and a ControlNet (ldm.modules.controlnet) share, key for key."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        self.gradient_checkpointing = False  # a runtime switch, not saved: see enable_gradient_checkpointing
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if config.num_classes is not None:
            self.label_emb = nn.Embedding(config.num_classes, emb_dim)
        self.input_blocks, self.skip_channels = self._encoder()
        ch = self.skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb_dim, config.norm_groups),
            self._transformer(ch),
            ResBlock(ch, ch, emb_dim, config.norm_groups),
        )

    def _encoder(self) -> tuple[nn.ModuleList, list[int]]:
        """conv_in, then per level num_res_blocks × (ResBlock[, transformer]) and a Downsample
        (none after the last level); also the channels of every block's output, the skips."""
        c = self.config
        conv_in = nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)
        blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_channels = [c.model_channels]
        for level, channels in enumerate(c.level_channels):
            for _ in range(c.num_res_blocks):
                blocks.append(self._res_attn(level, skip_channels[-1], channels))
                skip_channels.append(channels)
            if level != len(c.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
        return blocks, skip_channels

    def _res_attn(self, level: int, ch_in: int, ch_out: int) -> TimestepEmbedSequential:
        c = self.config
        block = TimestepEmbedSequential(ResBlock(ch_in, ch_out, 4 * c.model_channels, c.norm_groups))
        if level in c.attention_levels:
            block.append(self._transformer(ch_out))
        return block

    def _transformer(self, channels: int) -> SpatialTransformer:
        c = self.config
        heads, dim_head = c.heads(channels)
        return SpatialTransformer(
            channels, heads, dim_head, c.transformer_depth, c.context_dim, c.use_linear_projection, c.norm_groups
        )

    def enable_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass instead of keeping them (Chen et al. 2016):
        less memory for more compute, while training; the outputs and gradients are the same."""
        if not isinstance(enabled, bool):
            raise ValueError(f"gradient_checkpointing={enabled!r} must be a bool")
        self.gradient_checkpointing = enabled
        return self

    def _run(self, block: TimestepEmbedSequential, *args: object) -> Tensor:
        """Run one block, through activation checkpointing (Chen et al. 2016) when enabled and training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed(self, x: Tensor, t: Tensor | float | int, y: Tensor | None) -> Tensor:
        """The time (plus class) embedding (B, 4·model_channels) of timesteps ``t`` (scalar or (B,))."""
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or ({batch},)")
        weight = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(weight.dtype))
        if (y is None) != (self.config.num_classes is None):
            raise ValueError(f"y={'None' if y is None else 'a tensor'} but num_classes={self.config.num_classes}; "
                             "class labels y are required exactly when num_classes is set")
        if y is not None:
            if y.shape != (batch,):
                raise ValueError(f"y has shape {tuple(y.shape)}; expected ({batch},)")
            emb = emb + self.label_emb(y.to(x.device)).to(emb.dtype)
        return emb

    def check_inputs(self, x: Tensor, context: Tensor | None) -> None:
        """``ValueError`` unless x is (B, in_channels, H, W) and context (B, L, context_dim)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.config.in_channels}, H, W)")
        if context is None or context.ndim != 3 or context.shape[-1] != self.config.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context has shape {got}; expected (B, L, {self.config.context_dim})")

    def encode(self, h: Tensor, emb: Tensor, context: Tensor,
               added: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """(the input blocks' outputs, the skips; the middle block's output) of ``h``; ``added`` (a ControlNet's
        embedded hint) is added to the first block's (conv_in's) output."""
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if i == 0 and added is not None:
                h = h + added
            skips.append(h)
        return skips, self._run(self.middle_block, h, emb, context)


class UNet(UNetEncoder):
    """ε/v-prediction U-Net ``forward(x, t, context, y) -> (B, out_channels, H, W)``."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__(config)
        config = self.config
        self.output_blocks = self._decoder(self.skip_channels)
        ch = config.level_channels[0]
        self.out = nn.Sequential(
            nn.GroupNorm(config.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[2].weight)  # zero_module in CompVis
        nn.init.zeros_(self.out[2].bias)

    def _decoder(self, skip_channels: list[int]) -> nn.ModuleList:
        """Per level, deepest first, num_res_blocks + 1 × (ResBlock[, transformer]) on [h; skip],
        the last one followed by an Upsample (none at level 0)."""
        c, blocks = self.config, nn.ModuleList()
        skip_channels, ch = list(skip_channels), skip_channels[-1]
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                block = self._res_attn(level, ch + skip_channels.pop(), c.level_channels[level])
                ch = c.level_channels[level]
                if level and i == c.num_res_blocks:
                    block.append(Upsample(ch))
                blocks.append(block)
        return blocks

    def forward(
        self, x: Tensor, t: Tensor | float | int, context: Tensor | None = None, y: Tensor | None = None,
        down_residuals: list[Tensor] | tuple[Tensor, ...] | None = None, mid_residual: Tensor | None = None,
    ) -> Tensor:
        """x (B, in_channels, H, W), t (B,) or scalar, context (B, L, context_dim), y (B,) labels
        → (B, out_channels, H, W). ``down_residuals`` (one per input block, shaped as its output) are added to
        the skips and ``mid_residual`` to the middle block's output: a ControlNet's control (Zhang et al. 2023,
        eq. 4; diffusers' down_block_additional_residuals / mid_block_additional_residual)."""
        self.check_inputs(x, context)
        emb = self.embed(x, t, y)
        context = context.to(emb.dtype)
        if down_residuals is not None and len(down_residuals) != len(self.input_blocks):
            raise ValueError(f"down_residuals has {len(down_residuals)} tensors; expected {len(self.input_blocks)}, "
                             "one per input block")
        cache = self.feature_cache if not torch.is_grad_enabled() else None
        if cache is not None and cache.reuse((tuple(x.shape), x.dtype, x.device)):
            return self._shallow_pass(x.to(emb.dtype), emb, context, cache, down_residuals)
        skips, h = self.encode(x.to(emb.dtype), emb, context)
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        keep = None if cache is None else len(self.output_blocks) - 1 - cache.depth  # the first shallow block
        for i, block in enumerate(self.output_blocks):
            if i == keep:
                cache.features = h  # the deep path's output, which the next shallow passes reuse
            h = self._up(block, h, skips, emb, context)
        return self.out(h)

    def _up(self, block: TimestepEmbedSequential, h: Tensor, skips: list[Tensor], emb: Tensor,
            context: Tensor) -> Tensor:
        """One output block on [h; the last skip] (popped); upsampled to the next skip's size (odd sizes)."""
        h = torch.cat([h, skips.pop()], dim=1)
        size = skips[-1].shape[-2:] if skips else None
        return self._run(block, h, emb, context, size)

    def _shallow_pass(self, x: Tensor, emb: Tensor, context: Tensor, cache: DeepFeatureCache,
                      down_residuals: list[Tensor] | tuple[Tensor, ...] | None) -> Tensor:
        """The first ``cache.depth + 1`` input blocks and the last as many output blocks, on the deep features
        of the last full pass (DeepCache, Ma et al. 2024)."""
        skips, h = [], x
        for i, block in enumerate(self.input_blocks[: cache.depth + 1]):
            h = self._run(block, h, emb, context)
            skips.append(h if down_residuals is None else h + down_residuals[i])
        h = cache.features
        for block in self.output_blocks[len(self.output_blocks) - 1 - cache.depth:]:
            h = self._up(block, h, skips, emb, context)
        return self.out(h)

    feature_cache: DeepFeatureCache | None = None


@dataclass
class DeepFeatureCache:
    """DeepCache (Ma, Fang & Wang 2024): the U-Net's deep features change little between neighbouring sampling
    steps, so a full pass every ``interval`` calls keeps the input of the last ``depth + 1`` output blocks, and the
    calls in between run only the first ``depth + 1`` input blocks and those output blocks on it: an
    approximation, opt-in. A call of another batch shape, dtype or device (e.g. guidance switched off below a
    σ) runs in full."""

    interval: int = 6
    depth: int = 1
    first: int = 7  # calls at the start that run in full (the high-noise steps set the layout)
    features: Tensor | None = None
    key: tuple | None = None
    since_full: int = 0
    calls: int = 0

    def reuse(self, key: tuple) -> bool:
        """Whether this call may reuse the features (else it runs in full and stores them)."""
        self.calls += 1
        if (self.features is None or key != self.key or self.since_full + 1 >= self.interval
                or self.calls <= self.first):
            self.key, self.since_full, self.features = key, 0, None
            return False
        self.since_full += 1
        return True


@contextlib.contextmanager
def reusing_deep_features(unet: UNet, interval: int = 6, depth: int = 1,
                          first: int = 7) -> Iterator[DeepFeatureCache]:
    """Within the block ``unet`` reuses its deep features across calls without autograd (see
    :class:`DeepFeatureCache`); ``interval`` ≥ 1 (1: every call in full), 0 ≤ ``depth`` < the number of
    input blocks; the first ``first`` calls in full."""
    check_int("interval", interval, 1, 1000)
    check_int("depth", depth, 0, len(unet.input_blocks) - 2)
    check_int("first", first, 0)
    unet.feature_cache = cache = DeepFeatureCache(interval, depth, first)
    try:
        yield cache
    finally:
        unet.feature_cache = None


def widen_inputs(unet: UNet, config: UNetConfig) -> UNet:
    """A U-Net of ``config`` that computes what ``unet`` does: ``config`` may differ from ``unet.config`` only by a
    larger ``in_channels`` (concat conditioning added, as SD inpainting models grow from 4 to 9 inputs). ``conv_in``
    keeps its weights for the old inputs and starts at zero for the new ones, so fine-tuning starts from the trained
    model instead of from scratch."""
    old = unet.config
    changed = {k for k in vars(config) if getattr(config, k) != getattr(old, k)} - {"in_channels"}
    if changed:
        raise ValueError(f"U-Net fields {sorted(changed)} differ from the trained model's; allowed to change: "
                         "in_channels (to more)")
    if config.in_channels < old.in_channels:
        raise ValueError(f"in_channels={config.in_channels} would drop inputs of the trained model "
                         f"(in_channels={old.in_channels}); allowed: {old.in_channels} or more")
    state = unet.state_dict()
    weight = state["input_blocks.0.0.weight"]  # (C_out, C_in_old, 3, 3)
    grown = weight.new_zeros(weight.shape[0], config.in_channels, *weight.shape[2:])
    grown[:, : old.in_channels] = weight
    state["input_blocks.0.0.weight"] = grown
    wide = UNet(config).enable_gradient_checkpointing(unet.gradient_checkpointing)
    wide.load_state_dict(state)
    return wide.train(unet.training)
