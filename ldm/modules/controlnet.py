"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the SD U-Net's encoder that turns a spatial hint
(edges, depth, pose, ...) into residuals added to the U-Net's skips and middle output.

``ControlNet().state_dict()`` has the keys of lllyasviel's original ``cldm.py`` ``ControlNet`` (the
``control_model.`` prefix of its files stripped): ``time_embed``, ``input_blocks``, ``middle_block`` (built by the
U-Net's own :class:`~ldm.modules.unet.UNetEncoder`), ``input_hint_block`` (the hint embedding),
``zero_convs.N.0`` and ``middle_block_out.0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.modules.unet import TimestepEmbedSequential, UNet, UNetConfig, UNetEncoder
from ldm.validation import check_int

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class ControlNetConfig:
    """The U-Net whose encoder is copied, and the hint embedding: ``hint_channels`` input channels (3: RGB), conv
    widths ``hint_block_channels`` (SD: 16, 32, 96, 256), each after the first reached by a stride-2 conv, so the
    hint is 2^(len-1) times the latent's size (8 for SD, the autoencoder's factor). ``channel_order`` "bgr" flips
    the hint's channels first; ``global_pool_conditions`` averages the residuals over space (shuffle models)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        check_int("hint_channels", self.hint_channels, 1, 64)
        blocks = self.hint_block_channels
        if not isinstance(blocks, (list, tuple)) or not 1 <= len(blocks) <= 8:
            raise ValueError(f"hint_block_channels={blocks!r} is not allowed; allowed: 1 to 8 positive integers")
        self.hint_block_channels = tuple(check_int("hint_block_channels", c, 1, 4096) for c in blocks)
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order={self.channel_order!r} is not allowed; allowed: {CHANNEL_ORDERS}")
        if not isinstance(self.global_pool_conditions, bool):
            raise ValueError(f"global_pool_conditions={self.global_pool_conditions!r} must be a bool")

    @property
    def hint_factor(self) -> int:
        """How many times larger than the latents the hint is (the embedding's total stride)."""
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_block(config: ControlNetConfig) -> TimestepEmbedSequential:
    """The hint embedding, as ``input_hint_block`` in cldm.py: conv → SiLU, then per width step a conv and a
    stride-2 conv, each → SiLU, and a zero-initialised conv to model_channels. (B, hint, H, W) → (B, mc, H/f, W/f)."""
    widths = config.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for ch_in, ch_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(ch_in, ch_in, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(ch_in, ch_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(UNetEncoder):
    """``forward(x, hint, t, context) -> (down residuals, one per U-Net input block; mid residual)``, to pass to
    ``UNet.forward(..., down_residuals=, mid_residual=)``."""

    def __init__(self, config: ControlNetConfig | None = None) -> None:
        config = config or ControlNetConfig()
        super().__init__(config.unet)
        self.control_config = config
        self.input_hint_block = hint_block(config)
        self.zero_convs = nn.ModuleList(  # 1×1 convs starting at zero, so an untrained ControlNet changes nothing
            TimestepEmbedSequential(_zero(nn.Conv2d(ch, ch, 1))) for ch in self.skip_channels
        )
        ch = self.skip_channels[-1]
        self.middle_block_out = TimestepEmbedSequential(_zero(nn.Conv2d(ch, ch, 1)))

    @classmethod
    def from_unet(cls, unet: UNet, **hint: object) -> ControlNet:
        """A ControlNet on ``unet``'s config whose encoder, middle block and embeddings are copies of ``unet``'s
        weights; the hint embedding's last conv and the zero convs start at zero (its residuals are 0). ``hint``:
        the other ControlNetConfig fields (hint_channels, hint_block_channels, ...)."""
        net = cls(ControlNetConfig(unet=unet.config, **hint))
        shared = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in _SHARED}
        net.load_state_dict(shared, strict=False)
        param = next(unet.parameters())
        return net.to(param.device, param.dtype)

    def forward(self, x: Tensor, hint: Tensor, t: Tensor | float | int, context: Tensor,
                conditioning_scale: float = 1.0, guess_mode: bool = False,
                y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """x (B, in_channels, h, w) noisy latents, hint (B, hint_channels, h·f, w·f) in [0, 1], t (B,) or scalar,
        context (B, L, context_dim) → ([zero_conv(skip) for each input block], middle_block_out(middle)), each
        times ``conditioning_scale``; in ``guess_mode`` (diffusers' name) the k-th of the n + 1 outputs is scaled
        by 10^(k/n - 1) besides (logspace(-1, 0): 0.1 for the first skip to 1 for the middle)."""
        self.check_inputs(x, context)
        c = self.control_config
        expected = (x.shape[0], c.hint_channels, x.shape[2] * c.hint_factor, x.shape[3] * c.hint_factor)
        if tuple(hint.shape) != expected:
            raise ValueError(f"hint has shape {tuple(hint.shape)}; expected {expected} "
                             f"({c.hint_factor}x the latents' size)")
        emb = self.embed(x, t, y)
        context = context.to(emb.dtype)
        hint = hint.to(emb.dtype)
        if c.channel_order == "bgr":
            hint = hint.flip(1)
        guided_hint = self.input_hint_block(hint, emb, context)  # (B, mc, h, w)
        skips, h = self.encode(x.to(emb.dtype), emb, context, added=guided_hint)
        down = [self._run(conv, s, emb, context) for conv, s in zip(self.zero_convs, skips)]
        mid = self._run(self.middle_block_out, h, emb, context)
        if guess_mode and not c.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * conditioning_scale  # 0.1 … 1
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if c.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


_SHARED = ("time_embed", "label_emb", "input_blocks", "middle_block")  # UNetEncoder's modules
