"""A CLIP (Radford et al. 2021) of our own size as transformers' ``CLIPModel``: a text tower in the
``CLIPTextModel`` layout (the real CLIP tokenizer and vocabulary) and a ViT image tower.

A folder holds ``config.json`` and ``model.safetensors`` as ``CLIPModel.save_pretrained`` writes them,
so ``CLIPModel.from_pretrained(folder)`` loads it; images go in as (B, 3, S, S) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ldm.conditioning.text import TextEncoder, TextEncoderConfig, hf_text_kwargs
from ldm.io.files import CheckpointError, load_state_dict, read_json_object, save_state_dict, write_text_atomic
from ldm.validation import check_int

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class ClipConfig:
    """Sizes of both towers; ``text`` is a text-encoder config (kind "clip"), the image tower a ViT on
    ``image_size``² images cut into ``patch_size``² patches."""

    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(width=64, layers=4, heads=4,
                                                                              max_length=32))
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    projection_dim: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = TextEncoderConfig(**self.text)
        if self.text.kind != "clip" or self.text.layer != "last":
            raise ValueError(f"text.kind={self.text.kind!r}, text.layer={self.text.layer!r}; allowed: 'clip', 'last'")
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "projection_dim"):
            check_int(name, getattr(self, name), 1)
        if self.image_size % self.patch_size or self.vision_width % self.vision_heads:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size} and "
                             f"vision_heads={self.vision_heads} must divide vision_width={self.vision_width}")

    def hf_config(self) -> Any:
        from transformers import CLIPConfig

        vision = dict(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.vision_width,
                      intermediate_size=4 * self.vision_width, num_hidden_layers=self.vision_layers,
                      num_attention_heads=self.vision_heads, hidden_act=self.text.act, layer_norm_eps=1e-5)
        return CLIPConfig(text_config=hf_text_kwargs(self.text), vision_config=vision,
                          projection_dim=self.projection_dim)


def build_clip(config: ClipConfig) -> nn.Module:
    """A freshly initialised ``transformers.CLIPModel`` of ``config``'s sizes."""
    from transformers import CLIPModel

    return CLIPModel(config.hf_config())


def text_embeddings(model: nn.Module, token_ids: Tensor) -> Tensor:
    """Unit-length text embeddings (B, projection_dim): the end token's state, projected (``text_embeds``)."""
    pooled = model.text_model(input_ids=token_ids).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def image_embeddings(model: nn.Module, images: Tensor) -> Tensor:
    """Unit-length image embeddings (B, projection_dim) of images in [-1, 1] (CLIPModel's ``image_embeds``)."""
    pooled = model.vision_model(pixel_values=images).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def save_clip(model: nn.Module, folder: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (``state``, default the model's own), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(state if state is not None else model.state_dict(), folder / WEIGHTS, metadata={"format": "pt"})
    write_text_atomic(folder / CONFIG, model.config.to_json_string())


def load_clip(folder: str | Path) -> nn.Module:
    """The ``CLIPModel`` of a folder ``save_clip`` (or transformers) wrote, in eval mode; safetensors only."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: not a CLIP folder; expected {CONFIG} and {WEIGHTS}")
    try:
        hf = CLIPConfig(**read_json_object(folder / CONFIG))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG}: not a CLIP config ({err})") from None
    model = CLIPModel(hf)
    missing, unexpected = model.load_state_dict(load_state_dict(folder / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS}: keys do not fit the config: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()


def text_encoder_config(clip: nn.Module) -> TextEncoderConfig:
    """The ``TextEncoderConfig`` of a ``CLIPModel``'s text tower."""
    t = clip.config.text_config
    return TextEncoderConfig(kind="clip", vocab_size=t.vocab_size, width=t.hidden_size, layers=t.num_hidden_layers,
                             heads=t.num_attention_heads, max_length=t.max_position_embeddings,
                             mlp_ratio=t.intermediate_size / t.hidden_size, act=t.hidden_act)


def text_encoder_from_clip(clip: nn.Module) -> TextEncoder:
    """A ``TextEncoder`` holding a copy of a ``CLIPModel``'s text tower (keys ``text_model.*``, as in SD v1 files)."""
    text = TextEncoder(text_encoder_config(clip))
    text.load_state_dict({k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")})
    return text.eval()


__all__ = ["ClipConfig", "build_clip", "image_embeddings", "load_clip", "save_clip", "text_embeddings",
           "text_encoder_config", "text_encoder_from_clip"]
