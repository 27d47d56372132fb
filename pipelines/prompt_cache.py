"""Prompt embeddings kept across calls: a pipeline called again with the same prompts (a seed sweep, ``-n``
batches, a UI's re-runs) reuses their text encoding, as the WebUIs do. An entry is used only while the text
encoder is unchanged: the same parameter tensors at the same in-place versions, a sample of their values equal
(some in-place writes, e.g. a fused optimizer step, do not count as versions) and the same LoRA hooks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn

ENTRIES = 8  # distinct prompt lists kept
_PROBE = 8  # values sampled per parameter


def encoder_stamp(encoder: nn.Module, hooks: Hashable) -> tuple:
    """What changes when ``encoder`` may compute something else: its parameters' storage, in-place version and a
    few of their values, and ``hooks`` (e.g. the LoRA layers hooked into it)."""
    params = list(encoder.parameters())
    if not params:
        return (), hooks
    probes = [p.detach().reshape(-1)[:: max(1, p.numel() // _PROBE)][:_PROBE].float() for p in params]
    values = torch.cat(probes).cpu().numpy().tobytes()  # one copy from the device, not one per parameter
    return tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype) for p in params), values, hooks


class PromptCache:
    """A small LRU of prompt embeddings keyed by the prompts and the encoder's stamp."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[Tensor, Tensor | None]] = OrderedDict()

    def get(self, key: tuple, encode: Callable[[], tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
        """The embeddings for ``key``: kept ones, or ``encode()``'s, then kept (the oldest entry dropped)."""
        if torch.is_grad_enabled():  # the embeddings would carry a graph: never kept
            return encode()
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = encode()
        if len(self.entries) > ENTRIES:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()
