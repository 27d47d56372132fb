"""Textual-inversion embeddings on a pipeline, with diffusers' method names.

``pipe.load_textual_inversion("style.pt")`` adds the file's token to the tokenizer (ids after the vocabulary)
and its vectors as rows of the text encoder's token embedding, so that the prompt text ``"<style>"`` encodes
to them; ``pipe.unload_textual_inversion()`` removes them again. Both SD v1 (transformers' CLIP) and SD v2
(open_clip) text encoders take them. File layouts: :mod:`ldm.io.embeddings`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ldm.io.embeddings import read_textual_inversion

logger = logging.getLogger(__name__)


class TextualInversionMixin:
    """Mixed into :class:`pipelines.base.Pipeline` (which provides ``models``). The loaded tokens live in the
    tokenizer (``tokenizer.added_tokens``) and the rows in the text encoder, nowhere else."""

    models: Any

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Load an A1111 (``.pt``, ``.safetensors``) or diffusers (``learned_embeds.*``) embedding; ``token``
        replaces the file's own (the diffusers key, the A1111 ``name``, else the file name). A multi-vector
        embedding (n, D) makes ``token`` stand for n tokens, as diffusers' ``<tok> <tok>_1 …``. Returns the token."""
        encoder, tokenizer = self._textual_inversion_parts()
        embedding = read_textual_inversion(path, width=encoder.config.width)
        token = token if token is not None else embedding.token
        if token in tokenizer.added_tokens:
            raise ValueError(f"token={token!r} is already loaded; allowed: a new token, or "
                             f"unload_textual_inversion({token!r}) first")
        rows = encoder.token_embedding_layer.num_embeddings
        ids = encoder.append_token_embeddings(embedding.vectors)
        try:
            tokenizer.add_token(token, ids)
        except ValueError:
            encoder.truncate_token_embeddings(rows)  # a token the tokenizer refuses leaves the encoder as it was
            raise
        logger.info("textual inversion %r: %d vector(s) from %s (%s layout)", token, len(ids), embedding.path,
                    embedding.layout)
        return token

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove the loaded tokens (all of them by default) and their embedding rows; the rest keep working."""
        encoder, tokenizer = self._textual_inversion_parts()
        names = [tokens] if isinstance(tokens, str) else list(tokenizer.added_tokens if tokens is None else tokens)
        unknown = [t for t in names if t not in tokenizer.added_tokens]
        if unknown:
            raise ValueError(f"tokens={unknown!r} are not loaded; allowed: "
                             f"{', '.join(map(repr, tokenizer.added_tokens)) or 'none (nothing is loaded)'}")
        weight = encoder.token_embedding_layer.weight.detach()
        kept = {t: weight[list(ids)].clone() for t, ids in tokenizer.added_tokens.items() if t not in names}
        for t in list(tokenizer.added_tokens):
            tokenizer.remove_token(t)
        encoder.truncate_token_embeddings()
        for t, vectors in kept.items():  # renumbered right after the vocabulary, in loading order
            tokenizer.add_token(t, encoder.append_token_embeddings(vectors))

    def _textual_inversion_parts(self):
        encoder, tokenizer = self.models.text_encoder, self.models.tokenizer
        if encoder is None or tokenizer is None:
            raise ValueError("textual inversion needs a text encoder; this model has none")
        return encoder, tokenizer
