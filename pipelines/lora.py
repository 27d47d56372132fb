"""LoRA adapters at inference, with diffusers' pipeline methods (``load_lora_weights``, ``set_adapters``,
``fuse_lora``, ``unfuse_lora``, ``unload_lora_weights``), without peft.

Each loaded file is a named adapter: our parameter name → low-rank updates (see ``ldm.io.lora_keys``). A
component (U-Net, text encoder) holding adapters gets a forward pre-hook that swaps each adapted weight for
W + Σᵢ sᵢ ΔWᵢ (the active, unfused adapters at their scales; the sum is cached until adapters or scales change) and
a hook after its forward that puts the very same W tensors back, so that outside a forward the parameters are the
loaded ones, bit for bit, as with diffusers' unfused peft layers. Hooking the whole component, not each layer, holds
however a layer's weight is read (our ``proj_in`` reads ``weight`` through ``F.linear``, ``nn.MultiheadAttention``
reads ``out_proj.weight``); the cost is one addition per adapted weight per network call and, during the call, a
second copy of those weights. ``fuse_lora`` writes W + s ΔW into the parameters (no work per call) and keeps W,
which ``unfuse_lora`` puts back unchanged. ``unload_lora_weights`` drops the adapters and hooks; fused updates stay
in the weights, as in diffusers.

The swap writes ``param.data``: meant for inference (the pipelines run under ``torch.no_grad``), not for training
through the adapters (``ldm finetune`` trains LoRA through peft).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.io.lora_keys import COMPONENTS, LoraAdapter, read_lora

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (component, our parameter name)
AdapterWeights = float | dict[str, float] | Sequence[float | dict[str, float] | None] | None


class LoraState:
    """The adapters of one pipeline, their scales, what is fused, and the hooks that apply the rest."""

    def __init__(self) -> None:
        self.adapters: dict[str, LoraAdapter] = {}
        self.weights: dict[str, dict[str, float]] = {}  # active adapters → component → scale
        self.enabled = True
        self.fused: dict[tuple[str, str], float] = {}  # (adapter, component) → the scale fused into the weights
        self.originals: dict[Key, Tensor] = {}  # the weights before fusing
        self.handles: list[Any] = []
        self.cache: dict[Key, Tensor | None] = {}
        self.swapped: list[list[tuple[nn.Parameter, Tensor]]] = []

    def delta(self, key: Key, like: Tensor) -> Tensor | None:
        """Σ sᵢ ΔWᵢ of the active, unfused adapters for one parameter (None: nothing to add), as ``like``."""
        if key not in self.cache:
            component, name = key
            total = None
            for adapter_name, scales in self.weights.items():
                adapter = self.adapters[adapter_name]
                if (adapter_name, component) in self.fused or name not in adapter.layers.get(component, {}):
                    continue
                update = scales[component] * adapter.delta(component, name, like.shape)
                total = update if total is None else total + update
            self.cache[key] = total
        delta = self.cache[key]
        if delta is not None and (delta.device != like.device or delta.dtype != like.dtype):
            delta = self.cache[key] = delta.to(like.device, like.dtype)
        return delta


class LoraMixin:
    """LoRA methods of :class:`pipelines.base.Pipeline` (which provides ``models``), with diffusers' names."""

    models: Any

    @property
    def lora_state(self) -> LoraState:
        if "_lora_state" not in self.__dict__:
            self.__dict__["_lora_state"] = LoraState()
        return self.__dict__["_lora_state"]

    def _lora_modules(self) -> dict[str, nn.Module]:
        modules = {"unet": self.models.unet, "text_encoder": self.models.text_encoder}
        return {name: module for name, module in modules.items() if module is not None}

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, weight_name: str | None = None,
                          adapter_weight: float = 1.0) -> str:
        """Load a kohya/A1111 or diffusers/peft LoRA file (or a folder with one: ``weight_name``, else
        ``pytorch_lora_weights.safetensors``) as adapter ``adapter_name`` (default ``default_<n>``), then the only
        active one, at ``adapter_weight`` (as in diffusers; ``set_adapters`` combines several). Returns the adapter's
        name. ``ValueError`` (naming the file and the first key) when the file does not fit this model."""
        state = self.lora_state
        if adapter_name is None:
            adapter_name = f"default_{len(state.adapters)}"
            while adapter_name in state.adapters:
                adapter_name += "_"
        if adapter_name in state.adapters:
            raise ValueError(f"adapter_name={adapter_name!r} is already loaded; allowed: a new name "
                             f"(loaded: {sorted(state.adapters)}), or delete_adapters({adapter_name!r}) first")
        adapter = read_lora(path, self.models.unet, self.models.text_encoder, weight_name)
        state.adapters[adapter_name] = adapter
        state.weights = {adapter_name: {component: float(adapter_weight) for component in COMPONENTS}}
        self._lora_changed()
        logger.info("LoRA %s: %d layers from %s", adapter_name, len(adapter), adapter.source)
        return adapter_name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: AdapterWeights = None) -> None:
        """Make exactly ``adapter_names`` active, at ``adapter_weights`` (one for all, or one each; a dict gives
        ``unet`` and ``text_encoder`` their own, missing ones 1.0; None: 1.0)."""
        state = self.lora_state
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in state.adapters]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} is not loaded; allowed: {sorted(state.adapters)}")
        if adapter_weights is None or isinstance(adapter_weights, (int, float, dict)):
            adapter_weights = [adapter_weights] * len(names)
        weights = list(adapter_weights)
        if len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapters; allowed: one each")
        state.weights = {name: _component_weights(weight) for name, weight in zip(names, weights)}
        self._lora_changed()

    def get_active_adapters(self) -> list[str]:
        """The adapters applied now (none while disabled)."""
        state = self.lora_state
        return list(state.weights) if state.enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component → the loaded adapters that change it."""
        state = self.lora_state
        return {component: [name for name, adapter in state.adapters.items() if component in adapter.layers]
                for component in COMPONENTS}

    def disable_lora(self) -> None:
        """Run without the (unfused) adapters until ``enable_lora``."""
        self.lora_state.enabled = False
        self._lora_changed()

    def enable_lora(self) -> None:
        self.lora_state.enabled = True
        self._lora_changed()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Forget adapters (not while fused: ``unfuse_lora()`` first)."""
        state = self.lora_state
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in state.adapters:
                raise ValueError(f"adapter {name!r} is not loaded; allowed: {sorted(state.adapters)}")
            if any(fused == name for fused, _ in state.fused):
                raise ValueError(f"adapter {name!r} is fused into the weights; call unfuse_lora() first")
        for name in names:
            del state.adapters[name]
            state.weights.pop(name, None)
        self._lora_changed()

    @torch.no_grad()
    def fuse_lora(self, lora_scale: float = 1.0, components: Sequence[str] = COMPONENTS,
                  adapter_names: Sequence[str] | None = None, safe_fusing: bool = False) -> None:
        """Write W + lora_scale · Σᵢ wᵢ ΔWᵢ into the weights of ``components`` for ``adapter_names`` (default: the
        active ones, at their ``set_adapters`` weights wᵢ), keeping W for ``unfuse_lora``. ``safe_fusing``: raise
        instead of writing non-finite weights."""
        state, modules = self.lora_state, self._lora_modules()
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"components={list(components)!r}: {unknown[0]!r} is not allowed; allowed: {COMPONENTS}")
        names = list(state.weights) if adapter_names is None else list(adapter_names)
        missing = [name for name in names if name not in state.adapters]
        if missing:
            raise ValueError(f"adapter {missing[0]!r} is not loaded; allowed: {sorted(state.adapters)}")
        for component in components:
            if component not in modules:
                continue
            todo = [(name, lora_scale * state.weights.get(name, {}).get(component, 1.0)) for name in names
                    if (name, component) not in state.fused and component in state.adapters[name].layers]
            params = {param for name, _ in todo for param in state.adapters[name].layers[component]}
            module = modules[component]
            for param_name in sorted(params):
                p = module.get_parameter(param_name)
                total = sum((scale * state.adapters[name].delta(component, param_name, p.shape) for name, scale in todo
                             if param_name in state.adapters[name].layers[component]), torch.zeros(p.shape))
                fused = p.data + total.to(p.device, p.dtype)
                if safe_fusing and not bool(torch.isfinite(fused).all()):
                    raise ValueError(f"fusing {[n for n, _ in todo]} makes {component} {param_name} non-finite")
                state.originals.setdefault((component, param_name), p.data)
                p.data = fused
            state.fused.update({(name, component): scale for name, scale in todo})
        self._lora_changed()

    @torch.no_grad()
    def unfuse_lora(self, components: Sequence[str] = COMPONENTS) -> None:
        """Put back the weights ``fuse_lora`` changed (the same tensors, unchanged); the adapters stay loaded and
        apply unfused again."""
        state, modules = self.lora_state, self._lora_modules()
        for (component, param_name), original in list(state.originals.items()):
            if component not in components:
                continue
            p = modules[component].get_parameter(param_name)
            p.data = original if (original.device, original.dtype) == (p.device, p.dtype) else original.to(p)
            del state.originals[(component, param_name)]
        state.fused = {key: scale for key, scale in state.fused.items() if key[1] not in components}
        self._lora_changed()

    def unload_lora_weights(self) -> None:
        """Drop every adapter and hook; what ``fuse_lora`` wrote stays in the weights (as in diffusers)."""
        state = self.lora_state
        for handle in state.handles:
            handle.remove()
        del self.__dict__["_lora_state"]

    def _lora_changed(self) -> None:
        """After any change: forget the cached sums, and hook exactly the layers some adapter changes."""
        state = self.lora_state
        state.cache.clear()
        for handle in state.handles:
            handle.remove()
        state.handles = []
        for component, module in self._lora_modules().items():
            params = sorted({name for adapter in state.adapters.values() for name in adapter.layers.get(component, {})})
            if params:
                keys = [(name, (component, name)) for name in params]
                state.handles.append(module.register_forward_pre_hook(_swap_in(state, keys)))
                state.handles.append(module.register_forward_hook(_swap_out(state), always_call=True))


def _component_weights(weight: float | dict[str, float] | None) -> dict[str, float]:
    if weight is None:
        return {component: 1.0 for component in COMPONENTS}
    if isinstance(weight, dict):
        unknown = [key for key in weight if key not in COMPONENTS]
        if unknown:
            raise ValueError(f"adapter_weights key {unknown[0]!r} is not allowed; allowed: {COMPONENTS}")
        return {component: float(weight.get(component, 1.0)) for component in COMPONENTS}
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"adapter_weights entry {weight!r} is not allowed; allowed: a number or a dict by component")
    return {component: float(weight) for component in COMPONENTS}


def _swap_in(state: LoraState, attrs: list[tuple[str, Key]]):
    def hook(module: nn.Module, args: Any) -> None:
        swapped = []
        if state.enabled:
            for attr, key in attrs:
                p = module.get_parameter(attr)
                delta = state.delta(key, p.data)
                if delta is not None:
                    swapped.append((p, p.data))
                    p.data = p.data + delta  # W + Σ sᵢ ΔWᵢ, in a new tensor: W itself is kept unchanged
        state.swapped.append(swapped)
    return hook


def _swap_out(state: LoraState):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        for p, original in state.swapped.pop() if state.swapped else ():
            p.data = original
    return hook


__all__ = ["LoraMixin", "LoraState"]
