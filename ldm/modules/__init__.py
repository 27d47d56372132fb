"""Network building blocks: the SD-compatible cross-attention U-Net and its parts."""

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer
from ldm.modules.resnet import Downsample, ResBlock, Upsample
from ldm.modules.unet import UNet, UNetConfig, timestep_embedding

__all__ = [
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SpatialTransformer",
    "UNet",
    "UNetConfig",
    "Upsample",
    "timestep_embedding",
]
