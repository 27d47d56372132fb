"""The contrastive CLIP task: symmetric InfoNCE (Radford et al. 2021) over a batch of images and their
captions, with each image's hard negative captions as extra texts on the image side (NegCLIP,
Yuksekgonul et al. 2023). Captions of other images that also fit an image (a short caption fits
many scenes) are left out of that image's softmax and out of theirs, instead of being pushed away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.data.negatives import caption_fits
from ldm.io.files import load_state_dict
from ldm.modules.clip import image_embeddings, save_clip, text_embeddings
from ldm.training.ema import EMA
from ldm.training.loop import unwrap

TRAINING_WEIGHTS = "training.safetensors"  # the raw (not averaged) weights, for resuming


def fits_mask(captions: list[str], scenes: list[tuple[str, list]]) -> Tensor:
    """(B, B) bool: caption i fits scene j, for i != j (the diagonal, each image's own caption, is False)."""
    size = len(captions)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i, caption in enumerate(captions):
        for j, (background, objects) in enumerate(scenes):
            mask[i, j] = i != j and caption_fits(caption, background, objects)
    return mask


def contrastive_loss(images: Tensor, texts: Tensor, negatives: Tensor, negative_valid: Tensor, fits: Tensor,
                     logit_scale: Tensor) -> Tensor:
    """Mean of the image→text and text→image cross-entropies.

    images, texts (B, D) unit embeddings of pairs; negatives (B, K, D) each image's hard negatives with
    ``negative_valid`` (B, K); ``fits`` (B, B): caption i also fits image j (left out of both softmaxes)."""
    scale = logit_scale.exp().clamp(max=100.0)  # left-out logits get -1e4, not -inf (-inf gives a NaN scale gradient)
    pair_logits = scale * images @ texts.T  # (B images, B texts)
    pair_logits = pair_logits.masked_fill(fits.T, -1e4)  # image j, caption i that fits it
    negative_logits = scale * torch.einsum("bd,bkd->bk", images, negatives).masked_fill(~negative_valid, -1e4)
    target = torch.arange(images.shape[0], device=images.device)
    image_to_text = F.cross_entropy(torch.cat([pair_logits, negative_logits], dim=1), target)
    text_to_image = F.cross_entropy(pair_logits.T, target)
    return (image_to_text + text_to_image) / 2


class ClipTask:
    """Trains a ``CLIPModel``; the written folder (``save_clip``) holds the EMA weights, beside the raw ones."""

    def __init__(self, clip: nn.Module, tokenizer: ClipTokenizer) -> None:
        self.clip, self.tokenizer = clip.train(), tokenizer
        self.device = torch.device("cpu")
        self.metrics: dict[str, float] = {}

    def groups(self) -> list[list[nn.Module]]:
        return [[self.clip]]

    def prepare(self, accelerator: Accelerator) -> None:
        self.device = accelerator.device
        self.clip = accelerator.prepare(self.clip)

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        model = unwrap(self.clip)
        captions, negatives = list(batch["caption"]), batch["negatives"]  # negatives: B lists of K captions
        size, kinds = len(captions), len(negatives[0])
        flat = [text for row in negatives for text in row]
        tokens = _trim(self.tokenizer(captions + [text or "" for text in flat]), self.tokenizer.pad_token_id)
        texts = text_embeddings(model, tokens.to(self.device))  # (B + B·K, D)
        images = image_embeddings(model, batch["image"].to(self.device))
        valid = torch.tensor([[bool(text) for text in row] for row in negatives], device=self.device)
        fits = fits_mask(captions, batch["scene"]).to(self.device)
        loss = contrastive_loss(images, texts[:size], texts[size:].view(size, kinds, -1), valid, fits,
                                model.logit_scale)
        self.metrics = {"hard_negative_accuracy": _hard_accuracy(images, texts[:size], texts[size:], valid)}
        return loss

    def ema_target(self) -> nn.Module:
        return self.clip

    def write_model(self, path: Path, ema: EMA | None) -> None:
        model = unwrap(self.clip)
        save_clip(model, path, ema.averaged_state_dict(model) if ema is not None else None)
        if ema is not None:
            from ldm.io.files import save_state_dict

            save_state_dict(model.state_dict(), path / TRAINING_WEIGHTS)

    def load_model(self, path: Path) -> None:
        raw = path / TRAINING_WEIGHTS
        unwrap(self.clip).load_state_dict(load_state_dict(raw if raw.is_file() else path / "model.safetensors"))


def _trim(tokens: Tensor, eos: int) -> Tensor:
    """Token ids (B, L) cut after the longest prompt's end token: with a causal text tower and pooling at the
    first end token (padding is the end token), the columns after it change nothing but the cost."""
    last = int((tokens == eos).int().argmax(dim=1).max())
    return tokens[:, : last + 1]


@torch.no_grad()
def _hard_accuracy(images: Tensor, texts: Tensor, negatives: Tensor, valid: Tensor) -> float:
    """Share of (image, valid hard negative) pairs where the true caption scores higher."""
    size = images.shape[0]
    true = (images * texts).sum(-1, keepdim=True)  # (B, 1)
    other = torch.einsum("bd,bkd->bk", images, negatives.view(size, -1, images.shape[1]))
    return float(((true > other) & valid).sum() / valid.sum().clamp(min=1))
