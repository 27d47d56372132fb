"""CLIP BPE tokenizer built offline from the vocabulary open_clip ships.

The BPE itself is open_clip's ``SimpleTokenizer`` (ftfy + html clean-up, lower case), so ids
equal ``open_clip.tokenize``. Layout per prompt: ``<start> ids <end> pad…`` with
``max_length`` slots. SD v1 (transformers' CLIPTokenizer) pads with the end token 49407;
SD v2 (open_clip) pads with 0, which is the token ``"!"``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from types import ModuleType

import torch

from ldm.io.files import read_json_object, write_text_atomic
from ldm.validation import check_choice, check_int

logger = logging.getLogger(__name__)


def _open_clip_tokenizer() -> ModuleType:
    """open_clip's ``tokenizer`` module, loaded from its file without running ``open_clip/__init__``
    (which imports torchvision and every model: ~4 s of a cold ``ldm generate``)."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary")
    name = "_ldm_open_clip_tokenizer"
    if name not in sys.modules:
        path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def default_bpe() -> str:
    """Path of the CLIP BPE vocabulary file inside open_clip."""
    return _open_clip_tokenizer().default_bpe()


START, END = "<|startoftext|>", "<|endoftext|>"  # transformers' names for open_clip's specials
_OPEN_CLIP_SPECIALS = {"<start_of_text>": START, "<end_of_text>": END}
# The pad token of each text-encoder kind: SD v1 / transformers' CLIP pad with the end token, SD v2 / open_clip with 0.
PAD_TOKEN_IDS = {"clip": 49407, "openclip": 0}


def pad_token_id_for(kind: str) -> int:
    """The pad token id a CLIP tokenizer uses for a text encoder of ``kind`` ("clip" or "openclip")."""
    return PAD_TOKEN_IDS[check_choice("kind", kind, PAD_TOKEN_IDS)]


class ClipTokenizer:
    """``ClipTokenizer(max_length=77, pad_token_id=49407)(prompts) -> LongTensor (B, max_length)``."""

    def __init__(self, max_length: int = 77, pad_token_id: int = PAD_TOKEN_IDS["clip"]) -> None:
        self.bpe = _open_clip_tokenizer().SimpleTokenizer(context_length=max_length)
        self.max_length = check_int("max_length", max_length, low=2)
        self.pad_token_id = check_int("pad_token_id", pad_token_id, low=0, high=self.bpe.vocab_size - 1)
        self.start_token_id = self.bpe.sot_token_id  # 49406
        self.end_token_id = self.bpe.eot_token_id  # 49407
        self.added_tokens: dict[str, tuple[int, ...]] = {}  # textual inversion: token -> its ids (after the vocab)
        self._added_pattern: re.Pattern[str] | None = None

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of ``prompt`` without start/end tokens and without truncation; an added token (matched
        exactly, anywhere in the text, longest first, as transformers' added tokens) gives its ids."""
        if self._added_pattern is None:
            return self.bpe.encode(prompt)
        ids: list[int] = []
        for i, piece in enumerate(self._added_pattern.split(prompt)):  # text, token, text, token, …
            ids.extend(self.added_tokens[piece] if i % 2 else self.bpe.encode(piece))
        return ids

    def add_token(self, token: str, ids: list[int] | tuple[int, ...]) -> None:
        """Make the text ``token`` encode to ``ids`` (a textual-inversion token: n ids past the vocabulary)."""
        if not isinstance(token, str) or not token or token != token.strip():
            raise ValueError(f"token={token!r} is not allowed; allowed: a non-empty string without outer spaces")
        if token in self.added_tokens or token in self.bpe.encoder:
            raise ValueError(f"token={token!r} is already in the tokenizer's vocabulary; allowed: a new token "
                             "(unload the old one first, or pass another token)")
        if not ids or any(not isinstance(i, int) or i < self.vocab_size for i in ids):
            raise ValueError(f"ids={list(ids)!r} for token {token!r}; allowed: one or more ids >= {self.vocab_size}")
        self.added_tokens[token] = tuple(ids)
        self._compile_added()

    def remove_token(self, token: str) -> tuple[int, ...]:
        """Forget an added token; returns its ids."""
        if token not in self.added_tokens:
            added = ", ".join(map(repr, self.added_tokens)) or "none"
            raise ValueError(f"token={token!r} was not added; allowed: {added}")
        ids = self.added_tokens.pop(token)
        self._compile_added()
        return ids

    def _compile_added(self) -> None:
        tokens = sorted(self.added_tokens, key=len, reverse=True)  # longest first: "<t>_1" before "<t>"
        self._added_pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """Tokenize, truncate (keeping the end token, with a logged warning) and pad."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = self._truncate(prompt, self.encode(prompt))
            ids = [self.start_token_id, *ids, self.end_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def _truncate(self, prompt: str, ids: list[int]) -> list[int]:
        room = self.max_length - 2  # slots left beside <start> and <end>
        if len(ids) > room:
            shown = prompt if len(prompt) <= 100 else prompt[:100] + "…"
            logger.warning(
                "prompt %r is too long: dropped its last %d of %d tokens (max_length=%d)",
                shown, len(ids) - room, len(ids), self.max_length,
            )
        return ids[:room]

    def hf_vocab(self) -> dict[str, int]:
        """The vocabulary with transformers' names for the two special tokens."""
        return {_OPEN_CLIP_SPECIALS.get(tok, tok): i for tok, i in self.bpe.encoder.items()}

    def save_hf(self, folder: str | Path) -> Path:
        """Write a folder ``transformers.CLIPTokenizer.from_pretrained`` loads offline with equal ids.

        Two known differences on transformers' side, for any CLIP tokenizer folder: transformers >= 5
        runs no ftfy (curly quotes, ligatures, full-width letters, html entities tokenize otherwise),
        and with SD v2's pad token "!" it splits "!" runs into pad tokens (as diffusers' SD v2 does).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "vocab.json", self.hf_vocab())
        merges = [" ".join(pair) for pair, _ in sorted(self.bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        pad = self.bpe.decoder[self.pad_token_id]
        specials = {"bos_token": START, "eos_token": END, "unk_token": END,
                    "pad_token": _OPEN_CLIP_SPECIALS.get(pad, pad)}  # SD v2: "!" (id 0)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **specials}
        _write_json(folder / "tokenizer_config.json", config)
        _write_json(folder / "special_tokens_map.json", specials)
        return folder

    @classmethod
    def from_hf(cls, folder: str | Path) -> "ClipTokenizer":
        """Load from a transformers/diffusers tokenizer folder whose vocabulary is CLIP's."""
        folder = Path(folder)
        config = read_json_object(folder / "tokenizer_config.json")
        vocab = _read_vocab(folder)
        pad = config.get("pad_token", END)
        pad = pad["content"] if isinstance(pad, dict) else pad  # older files store AddedToken dicts
        if pad not in vocab:
            raise ValueError(f"pad_token={pad!r} in {folder} is not in its vocab.json")
        tokenizer = cls(max_length=int(config.get("model_max_length", 77)), pad_token_id=vocab[pad])
        if vocab != tokenizer.hf_vocab():
            raise ValueError(f"{folder / 'vocab.json'} is not the CLIP vocabulary ({default_bpe()})")
        return tokenizer


def _read_vocab(folder: Path) -> dict[str, int]:
    """vocab.json (slow-tokenizer files), or the vocab inside tokenizer.json (transformers >= 5 saves only that)."""
    if (folder / "vocab.json").is_file():
        return read_json_object(folder / "vocab.json")
    if (folder / "tokenizer.json").is_file():
        return read_json_object(folder / "tokenizer.json").get("model", {}).get("vocab", {})
    raise ValueError(f"{folder}: no vocab.json or tokenizer.json; a CLIP tokenizer folder needs one of them")


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))
