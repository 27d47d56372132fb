"""Prompts as the SD WebUIs encode them: no 77-token cut, ``(word:1.3)`` weights, clip skip.

As AUTOMATIC1111's ``FrozenCLIPEmbedderWithCustomWords`` (``modules/sd_hijack_clip.py``):

- A prompt is parsed (:func:`~ldm.conditioning.prompt_weights.parse_prompt_attention`), each run
  tokenized on its own, and the tokens cut into chunks of ``max_length - 2`` (75) tokens; when a
  chunk is full and a comma lies within its last ``comma_backtrack`` (20) tokens, the chunk ends
  after that comma and the rest moves to the next chunk; ``BREAK`` ends a chunk early.
- Each chunk is ``<start> tokens <end> pad…`` (77 ids, the tokenizer's pad id) and goes through the
  text encoder on its own; the chunk contexts are concatenated: (B, 77·k, D). In a batch, a prompt
  with fewer chunks gets empty chunks (the ids of ``""``); cond and uncond are brought to the same
  k the same way (:func:`encode_prompt_pair`, :func:`pad_to_same_chunks`).
- Weights ("Original" emphasis): each token's context row is multiplied by its weight, then the
  chunk is rescaled so that its mean equals the unweighted chunk's mean. Here the mean is taken
  per prompt and chunk (A1111 takes it over the batch of one chunk index; A1111 encodes one prompt
  at a time, so this differs only for batches of different prompts). A chunk whose weights are
  all 1 is left exactly as the encoder gave it, so a prompt of at most 75 tokens without weighting
  syntax gives bit for bit the context of ``text_encoder(tokenizer(prompts))``.

Textual-inversion tokens (``pipe.load_textual_inversion``) are tokens like any other here; unlike A1111, a
multi-vector one at a chunk's end may be split across two chunks. Not supported: prompt editing ``[a:b:0.5]``, ``AND``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.conditioning.prompt_weights import BREAK, parse_prompt_attention
from ldm.conditioning.text import TextEncoder
from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.validation import check_int

COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`


@dataclass(frozen=True)
class PromptChunk:
    """One chunk of a prompt: ``max_length`` token ids (``<start> … <end> pad…``) and their weights."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]


def chunk_prompt(tokenizer: ClipTokenizer, prompt: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """The chunks of ``prompt`` (at least one; ``""`` gives the empty chunk), as A1111's ``tokenize_line``."""
    room = tokenizer.max_length - 2  # tokens per chunk beside <start> and <end>
    comma = tokenizer.encode(",")[0]
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_chunk(tokenizer, ids, weights))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if (text, weight) == BREAK:
            close()
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif comma_backtrack and len(ids) == room and last_comma != -1 and len(ids) - last_comma <= comma_backtrack:
                cut = last_comma + 1  # the chunk ends after the comma; the rest opens the next one
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == room:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def empty_chunk(tokenizer: ClipTokenizer) -> PromptChunk:
    """The chunk of ``""``: what pads a prompt with fewer chunks than the others."""
    return _chunk(tokenizer, [], [])


def _chunk(tokenizer: ClipTokenizer, ids: list[int], weights: list[float]) -> PromptChunk:
    pad = tokenizer.max_length - 2 - len(ids)
    return PromptChunk(
        token_ids=(tokenizer.start_token_id, *ids, tokenizer.end_token_id, *[tokenizer.pad_token_id] * pad),
        weights=(1.0, *weights, 1.0, *[1.0] * pad),
    )


def encode_prompts(text_encoder: TextEncoder, tokenizer: ClipTokenizer, prompts: str | list[str],
                   clip_skip: int | None = None, min_chunks: int = 1,
                   comma_backtrack: int = COMMA_BACKTRACK) -> Tensor:
    """Context (B, max_length·k, D) of ``prompts``: k is the most chunks any prompt needs (at least
    ``min_chunks``); shorter prompts are padded with empty chunks. ``clip_skip``: A1111's count (1 = the
    last block, 2 = the penultimate; None = the model's own layer), see :mod:`ldm.conditioning.text`.
    Runs under the caller's grad mode, on the text encoder's device and dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return encode_chunks(text_encoder, [chunk_prompt(tokenizer, p, comma_backtrack) for p in prompts],
                         empty_chunk(tokenizer), clip_skip, min_chunks)


def encode_prompt_pair(text_encoder: TextEncoder, tokenizer: ClipTokenizer, prompts: str | list[str],
                       negatives: str | list[str], clip_skip: int | None = None,
                       comma_backtrack: int = COMMA_BACKTRACK) -> tuple[Tensor, Tensor]:
    """``(cond, uncond)`` contexts of ``prompts`` and ``negatives`` with the same number of chunks:
    whichever needs fewer is padded with empty chunks (A1111's "pad prompt/negative prompt")."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negatives] if isinstance(negatives, str) else list(negatives)
    cond = [chunk_prompt(tokenizer, p, comma_backtrack) for p in prompts]
    uncond = [chunk_prompt(tokenizer, p, comma_backtrack) for p in negatives]
    k = max(len(c) for c in cond + uncond)
    empty = empty_chunk(tokenizer)
    return (encode_chunks(text_encoder, cond, empty, clip_skip, k),
            encode_chunks(text_encoder, uncond, empty, clip_skip, k))


def encode_chunks(text_encoder: TextEncoder, chunked: list[list[PromptChunk]], empty: PromptChunk,
                  clip_skip: int | None = None, min_chunks: int = 1) -> Tensor:
    """Context (B, L·k, D) of B chunked prompts: one text-encoder call per chunk index (B, L)."""
    check_int("min_chunks", min_chunks, 1)
    if not chunked:
        raise ValueError("prompts is empty; allowed: one or more prompts")
    device = next(text_encoder.parameters()).device
    contexts = []
    for i in range(max(min_chunks, *(len(c) for c in chunked))):
        batch = [c[i] if i < len(c) else empty for c in chunked]
        ids = torch.tensor([chunk.token_ids for chunk in batch], dtype=torch.long, device=device)  # (B, L)
        context = text_encoder(ids, clip_skip=clip_skip)  # (B, L, D)
        contexts.append(apply_weights(context, [chunk.weights for chunk in batch]))
    return torch.cat(contexts, dim=1) if len(contexts) > 1 else contexts[0]


def apply_weights(context: Tensor, weights: list[tuple[float, ...]]) -> Tensor:
    """A1111's "Original" emphasis on one chunk index: row b of ``context`` (B, L, D) times
    ``weights[b]`` (L) per token, rescaled to its unweighted mean. Rows whose weights are all 1
    are returned untouched (bitwise). The arithmetic is float32, the result the context's dtype."""
    rows = [b for b, w in enumerate(weights) if any(x != 1.0 for x in w)]
    if not rows:
        return context
    out = context.clone()
    for b in rows:
        z = context[b].float()  # (L, D)
        original_mean = z.mean()
        z = z * torch.tensor(weights[b], dtype=torch.float32, device=z.device)[:, None]
        out[b] = (z * (original_mean / z.mean())).to(context.dtype)
    return out


def pad_to_same_chunks(cond: Tensor, uncond: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """Pad the shorter of ``cond`` / ``uncond`` (B, L·k, D) along the sequence with copies of ``empty``
    (1, L, D), the context of ``""`` (``encode_prompts(text_encoder, tokenizer, [""])``), up to the
    other's k. For contexts given as tensors (``prompt_embeds=``); :func:`encode_prompt_pair` does this
    when it encodes text."""
    chunk = empty.shape[1]
    for name, tensor in (("cond", cond), ("uncond", uncond)):
        if tensor.ndim != 3 or tensor.shape[1] % chunk or tensor.shape[2] != empty.shape[2]:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (B, {chunk}·k, {empty.shape[2]})")

    def pad(tensor: Tensor, length: int) -> Tensor:
        repeats = (length - tensor.shape[1]) // chunk
        if repeats == 0:
            return tensor
        filler = empty.to(tensor.device, tensor.dtype).expand(tensor.shape[0], -1, -1).repeat(1, repeats, 1)
        return torch.cat([tensor, filler], dim=1)

    length = max(cond.shape[1], uncond.shape[1])
    return pad(cond, length), pad(uncond, length)
