"""Scores by the domain CLIP: CLIP score (100 · cosine of image and caption, as torchmetrics' CLIPScore) and the
hard-negative score (whether the image is closer to its caption than to the caption changed in one respect)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.data.negatives import NEGATIVE_KINDS, hard_negatives
from ldm.data.shapes import ShapeObject, make_sample, to_unit_range
from ldm.modules.clip import image_embeddings, load_clip, text_embeddings


class ClipJudge:
    """A CLIP folder (or demo name) with its tokenizer; embeds uint8 images (S, S, 3) and captions."""

    def __init__(self, source: str | Path, device: str | torch.device = "cpu") -> None:
        from pipelines.base import resolve_source

        self.device = torch.device(device)
        self.model: nn.Module = load_clip(resolve_source(source)).to(self.device)
        self.tokenizer = ClipTokenizer(max_length=self.model.config.text_config.max_position_embeddings)
        self.image_size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def images(self, images: list[np.ndarray], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([to_unit_range(im) for im in images[start:start + batch_size]]).to(self.device)
            if batch.shape[-1] != self.image_size:
                batch = nn.functional.interpolate(batch, size=self.image_size, mode="area")
            out.append(image_embeddings(self.model, batch))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, captions: list[str], batch_size: int = 1024) -> torch.Tensor:
        return torch.cat([text_embeddings(self.model, self.tokenizer(captions[i:i + batch_size]).to(self.device))
                          for i in range(0, len(captions), batch_size)])


def clip_scores(judge: ClipJudge, images: list[np.ndarray], captions: list[str],
                scenes: list[tuple[str, list[ShapeObject]]] | None = None, seed: int = 0) -> dict[str, Any]:
    """``clip_score`` (mean 100·cos of image and caption) and, per kind of hard negative, the share of images
    closer to their caption than to that negative (``hard_negative``: all kinds pooled). Without ``scenes``
    (generated images) the negatives are built from the caption alone."""
    image_emb, caption_emb = judge.images(images), judge.texts(captions)
    true = (image_emb * caption_emb).sum(-1)  # (N,) cosines
    rows, negatives = [], []
    for i, caption in enumerate(captions):
        background, objects = scenes[i] if scenes is not None else (None, None)
        for kind, negative in hard_negatives(caption, background, objects, np.random.default_rng([seed, i])).items():
            rows.append((i, kind))
            negatives.append(negative)
    report: dict[str, Any] = {"clip_score": float(100 * true.clamp(min=0).mean()), "images": len(images)}
    if not negatives:
        return report
    wins = (image_emb[[i for i, _ in rows]] * judge.texts(negatives)).sum(-1) < true[[i for i, _ in rows]]
    report["hard_negative"] = float(wins.float().mean())
    report["by_kind"] = {kind: {"accuracy": float(wins[idx].float().mean()), "pairs": len(idx)}
                         for kind in NEGATIVE_KINDS if (idx := [n for n, (_, k) in enumerate(rows) if k == kind])}
    return report


def evaluate_clip(judge: ClipJudge, count: int, seed: int, two_object_prob: float = 0.5) -> dict[str, Any]:
    """The CLIP on ``count`` held-out real images (data seed ``seed``) with their full captions: the CLIP score and
    the hard-negative accuracy per kind (the gate: each kind ≥ 0.95)."""
    samples = [make_sample(seed, i, two_object_prob, drop_prob=0.0, image_size=judge.image_size) for i in range(count)]
    report = clip_scores(judge, [s.image for s in samples], [s.caption for s in samples],
                         [(s.background, s.objects) for s in samples], seed)
    return {"data_seed": seed, "captions": "full", **report}
