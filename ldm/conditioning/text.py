"""Frozen text encoders producing the cross-attention context (B, 77, width).

kind "clip" (SD v1): transformers' ``CLIPTextModel``; output is ``last_hidden_state`` (after the
final layer norm). kind "openclip" (SD v2): open_clip's text tower; output is the penultimate
resblock's output followed by ``ln_final``, as SD v2's ``FrozenOpenCLIPEmbedder(layer="penultimate")``.

``clip_skip`` (A1111's "Clip skip", ComfyUI's ``CLIPSetLastLayer(-n)``) counts from the tower's last
block: ``clip_skip=n`` is the output of the n-th block from the end, followed by the final layer
norm; 1 is the last block, 2 the penultimate. ``None`` is the config's ``layer`` ("last" = 1,
"penultimate" = 2, so SD v2's default is clip_skip 2). diffusers' ``clip_skip=k`` counts from the
model's output layer instead: see :func:`clip_skip_from_diffusers`.

State-dict keys equal the original single-file layouts: kind clip gives ``text_model.*``
(stored under ``cond_stage_model.transformer.`` in SD v1 files); kind openclip gives open_clip's
``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.*``, ``ln_final.*``,
``text_projection``, ``logit_scale`` (stored under ``cond_stage_model.model.`` in SD v2 files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldm.validation import check_choice, check_float, check_int

KINDS = ("clip", "openclip")
ACTS = ("quick_gelu", "gelu")
LAYERS = ("last", "penultimate")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of a CLIP text transformer; defaults are SD v1's ViT-L/14 text tower."""

    kind: str = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    max_length: int = 77
    mlp_ratio: float = 4.0  # MLP hidden size = width * mlp_ratio
    act: str = "quick_gelu"
    layer: str = "last"  # whose hidden states (then the final layer norm) form the context

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_int("vocab_size", self.vocab_size, 1, 1_000_000)  # upper bounds: a typo must not exhaust memory
        check_int("width", self.width, 1, 8192)
        check_int("layers", self.layers, 2 if self.layer == "penultimate" else 1, 256)
        check_int("heads", self.heads, 1, 256)
        check_int("max_length", self.max_length, 2, 4096)
        check_float("mlp_ratio", self.mlp_ratio, 0, 16, low_open=True)
        check_choice("act", self.act, ACTS)
        check_choice("layer", self.layer, LAYERS)
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads!r} must divide width={self.width}; allowed: a divisor of {self.width}")
        if (self.width * self.mlp_ratio) % 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must make width*mlp_ratio an integer (width={self.width})")

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)


PRESETS = {
    "sd-v1": TextEncoderConfig(),
    "sd-v2": TextEncoderConfig(kind="openclip", width=1024, layers=24, heads=16, act="gelu", layer="penultimate"),
}


def hf_text_kwargs(config: TextEncoderConfig, layers: int | None = None) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs with ``config``'s architecture (``layers`` overrides the depth)."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.intermediate_size,
        projection_dim=config.width,
        num_hidden_layers=config.layers if layers is None else layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
    )


class TextEncoder(nn.Module):
    """``TextEncoder(config)(token_ids (B, max_length)) -> context (B, max_length, width)``."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        if config.kind == "clip":
            from transformers import CLIPTextConfig, CLIPTextModel  # here: importing it costs ~1 s

            model = CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config)))
            # transformers >= 5.6 flattened CLIPTextModel; older ones wrap it in `.text_model`.
            self.text_model = getattr(model, "text_model", model)
        else:
            self._adopt_open_clip_tower(config)

    def _adopt_open_clip_tower(self, config: TextEncoderConfig) -> None:
        """Build open_clip's text tower and register its parts at top level (SD v2 key layout)."""
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer  # ~4 s to import: only when used

        tower = TextTransformer(
            context_length=config.max_length, vocab_size=config.vocab_size, width=config.width,
            heads=config.heads, layers=config.layers, mlp_ratio=config.mlp_ratio, output_dim=config.width,
            act_layer=QuickGELU if config.act == "quick_gelu" else nn.GELU, norm_layer=LayerNorm,
        )
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection  # unused for the context; kept for SD v2 files
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # as open_clip's CLIP
        self.optional_keys = ("text_projection", "logit_scale")  # a file without them loads (they keep their init)
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)  # causal, -inf above diagonal

    @property
    def token_embedding_layer(self) -> nn.Embedding:
        """The token embedding (rows ≥ ``config.vocab_size`` are appended textual-inversion tokens)."""
        return self.text_model.embeddings.token_embedding if self.config.kind == "clip" else self.token_embedding

    def append_token_embeddings(self, vectors: Tensor) -> list[int]:
        """Append ``vectors`` (n, width) as rows of the token embedding (on its device and dtype); their ids."""
        layer = self.token_embedding_layer
        if vectors.ndim != 2 or vectors.shape[1] != self.config.width:
            raise ValueError(f"vectors of shape {tuple(vectors.shape)}; allowed: (n, {self.config.width})")
        old = layer.weight
        rows = torch.cat([old.detach(), vectors.detach().to(old.device, old.dtype)])  # (V + n, width)
        layer.weight = nn.Parameter(rows, requires_grad=old.requires_grad)
        layer.num_embeddings = rows.shape[0]
        return list(range(old.shape[0], rows.shape[0]))

    def splice_token_embeddings(self, vectors: Tensor) -> list[int]:
        """Make ``vectors`` (n, width) trainable token rows after the embedding's own (textual-inversion training):
        the layer becomes a :class:`SplicedEmbedding` whose only parameter with a gradient is ``added``, so an
        optimizer holds n × width numbers, not the vocabulary. Returns the n new ids."""
        layer = self.token_embedding_layer
        if isinstance(layer, SplicedEmbedding):
            raise ValueError("the token embedding already has spliced rows; allowed: one spliced embedding")
        if vectors.ndim != 2 or vectors.shape[1] != self.config.width:
            raise ValueError(f"vectors of shape {tuple(vectors.shape)}; allowed: (n, {self.config.width})")
        spliced = SplicedEmbedding(layer, vectors)
        if self.config.kind == "clip":
            self.text_model.embeddings.token_embedding = spliced
        else:
            self.token_embedding = spliced
        return list(range(layer.num_embeddings, spliced.num_embeddings))

    def truncate_token_embeddings(self, rows: int | None = None) -> None:
        """Drop the token embedding's rows past ``rows`` (default: ``config.vocab_size``, the model's own)."""
        layer = self.token_embedding_layer
        rows = self.config.vocab_size if rows is None else check_int("rows", rows, self.config.vocab_size)
        if layer.weight.shape[0] > rows:
            layer.weight = nn.Parameter(layer.weight.detach()[:rows].clone(), requires_grad=layer.weight.requires_grad)
            layer.num_embeddings = rows

    def forward(self, token_ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """Context (B, L, width) of ``token_ids`` (B, L); ``clip_skip`` as in the module docstring."""
        skip = self.resolve_clip_skip(clip_skip)
        if self.config.kind == "clip":
            return self._forward_clip(token_ids, skip)
        return self._forward_openclip(token_ids, skip)

    def resolve_clip_skip(self, clip_skip: int | None) -> int:
        """``clip_skip`` checked against the depth; ``None`` -> the config's layer (last 1, penultimate 2)."""
        if clip_skip is None:
            return LAYERS.index(self.config.layer) + 1
        return check_int("clip_skip", clip_skip, 1, self.config.layers)

    def _forward_clip(self, token_ids: Tensor, skip: int) -> Tensor:
        if skip == 1:
            return self.text_model(input_ids=token_ids).last_hidden_state
        hidden = self.text_model(input_ids=token_ids, output_hidden_states=True).hidden_states  # layers + 1
        return self.text_model.final_layer_norm(hidden[-skip])  # as A1111's CLIP_stop_at_last_layers

    def _forward_openclip(self, token_ids: Tensor, skip: int) -> Tensor:
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]  # (B, L, width)
        blocks = self.transformer.resblocks
        if skip > 1:
            blocks = blocks[: len(blocks) - (skip - 1)]
        for block in blocks:
            x = block(x, attn_mask=self.attn_mask[:length, :length])
        return self.ln_final(x)


class SplicedEmbedding(nn.Module):
    """A frozen token embedding ``base`` (V, D) and trainable rows ``added`` (n, D) read as one table of V + n
    rows: ids < V look up ``base``, ids V … V+n-1 the rows of ``added`` (bit for bit the lookup into their
    concatenation, without copying the V rows at each call)."""

    def __init__(self, base: nn.Embedding, added: Tensor) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.added = nn.Parameter(added.detach().clone().to(base.weight.device, base.weight.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.added.shape[0]

    @property
    def weight(self) -> Tensor:
        """The whole table (V + n, D), for reading."""
        return torch.cat([self.base.weight, self.added])

    def forward(self, ids: Tensor) -> Tensor:
        vocab, n = self.base.num_embeddings, self.added.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab + n):
            raise IndexError(f"token ids must lie in [0, {vocab + n}); got {int(ids.min())}..{int(ids.max())}")
        new = ids >= vocab  # (B, L)
        rows = self.base(ids.clamp(max=vocab - 1))  # (B, L, D)
        return torch.where(new[..., None], nn.functional.embedding((ids - vocab).clamp(min=0), self.added), rows)


def clip_skip_from_diffusers(diffusers_clip_skip: int | None, config: TextEncoderConfig) -> int | None:
    """Our (A1111) ``clip_skip`` for diffusers' ``clip_skip`` argument on the same weights.

    diffusers takes ``hidden_states[-(k + 1)]`` of its text encoder (then the final layer norm), so
    its k is our k + 1 (diffusers 1 = A1111 2, the penultimate block); for SD v2 its text encoder
    already lacks the last block (see ``ldm.io.text_keys``), so there its k is our k + 2. ``None``
    (diffusers' default) -> ``None`` (the model's own layer).
    """
    if diffusers_clip_skip is None:
        return None
    check_int("clip_skip", diffusers_clip_skip, 0, None)
    dropped = config.kind == "openclip" and config.layer == "penultimate"  # as text_config_to_hf
    return diffusers_clip_skip + 1 + int(dropped)
