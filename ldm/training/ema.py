"""Exponential moving average of parameters with warm-up, as CompVis' LitEma: the decay used at
update n is min(decay, (1 + n) / (10 + n)), so early averages are not dominated by the init."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay!r} is out of range; allowed: [0, 1)")
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)  # s ← d·s + (1-d)·p
        self.updates += 1

    def averaged_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with the averaged values in place of the trained parameters."""
        state = model.state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:2]}")
        self.shadow = {k: state[k].clone().float() for k in self.shadow}
        self.updates = int(state["__updates__"])
