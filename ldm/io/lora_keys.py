"""LoRA files of the ecosystem, read into our parameter names (Hu et al. 2021, eq. 3: W' = W + (α / r) · B A).

Two layouts are read, for the U-Net and the text encoder of SD v1 and v2:

- kohya-ss / A1111 (``.safetensors``): ``lora_unet_<module path with _>.lora_down.weight`` (A, (r, in) or a conv
  (r, in, kh, kw)), ``.lora_up.weight`` (B, (out, r) or (out, r, 1, 1)), ``.alpha`` (absent: α = r);
  ``lora_te_text_model_encoder_layers_N_self_attn_q_proj...`` for the text encoder (transformers' names, also for
  SD v2's open_clip tower). U-Net paths are diffusers' (``down_blocks_0_attentions_0_...``) or, as some LyCORIS
  files have them, the original ones (``input_blocks_1_1_...``). Conv LoRA (LoCon) on any conv layer included.
- diffusers / peft (``pytorch_lora_weights.safetensors``): ``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.<module>.lora_A.weight``; the older ``<module>.processor.to_q_lora.down.weight`` and
  ``.lora.down.weight`` / ``.lora_linear_layer.down.weight`` spellings. α comes from the safetensors metadata
  diffusers writes (``lora_adapter_metadata``: ``unet.lora_alpha``, ``alpha_pattern``, ``use_rslora``), from
  ``.alpha`` keys, or is r (scale 1, peft's default). Keys without a component prefix are the U-Net's (also in our
  own layout, as ``ldm finetune`` saves them).

Every LoRA module is mapped to one of our parameters (open_clip keeps q, k, v in one ``in_proj_weight``: a q/k/v
LoRA updates its third of the rows) and checked against its shape. A key that does not fit (another base model,
an unknown module, a different shape, an unsupported LyCORIS kind) is a ``ValueError`` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.io.files import CheckpointError, load_state_dict
from ldm.io.unet_keys import unet_original_to_diffusers

COMPONENTS = ("unet", "text_encoder")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_UNSUPPORTED = re.compile(r"\.(hada_|lokr_|lora_mid|dora_scale|lora_magnitude_vector|oft_|diff_b$|diff$|w_norm$|"
                          r"b_norm$|lora_B\.bias$|lora_up\.bias$)")  # LyCORIS kinds, DoRA, LoRA biases, full diffs
_OLD_ATTN = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_ATTN_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_ROLES = {"lora_A": "down", "lora_B": "up", "lora.down": "down", "lora.up": "up", "lora_linear_layer.down": "down",
          "lora_linear_layer.up": "up", "lora_down": "down", "lora_up": "up"}
_OC_OTHER = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclasses.dataclass
class LoraLayer:
    """One low-rank update of a parameter: ΔW = scale · B A, with ``down`` A (r, in[, kh, kw]), ``up`` B
    (out, r[, 1, 1]); ``rows`` (start, stop) when it updates a slice of the parameter's rows (open_clip's q/k/v)."""

    down: Tensor
    up: Tensor
    scale: float  # α / r (rsLoRA: α / √r)
    rows: tuple[int, int] | None = None
    source: str = ""  # the file's key, for messages

    def delta(self, shape: torch.Size) -> Tensor:
        """ΔW (float32) in the shape of the whole parameter. A conv LoRA is the 1×1 ``up`` after ``down``, so its
        weight is B A over the flattened input axes: (out, r) @ (r, in·kh·kw) → (out, in, kh, kw)."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float() * self.scale  # (out, in·kh·kw)
        if self.rows is None:
            return product.reshape(shape)
        full = torch.zeros(shape, dtype=torch.float32)
        full[self.rows[0]:self.rows[1]] = product.reshape((self.rows[1] - self.rows[0], *shape[1:]))
        return full


@dataclasses.dataclass
class LoraAdapter:
    """A LoRA file in our names: component ("unet" / "text_encoder") → our parameter name → its updates."""

    source: str
    layers: dict[str, dict[str, list[LoraLayer]]]

    def delta(self, component: str, name: str, shape: torch.Size) -> Tensor:
        """Σ ΔW (float32) of this adapter for one parameter."""
        return sum((layer.delta(shape) for layer in self.layers[component][name]), torch.zeros(shape))

    def __len__(self) -> int:
        return sum(len(layers) for params in self.layers.values() for layers in params.values())


@dataclasses.dataclass
class _Target:
    param: str  # our parameter name
    shape: torch.Size
    rows: tuple[int, int] | None = None


def lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The LoRA weights file: ``path`` itself, or in a folder ``weight_name``, diffusers'
    ``pytorch_lora_weights.safetensors``, or the folder's only ``.safetensors`` file."""
    path = Path(path)
    if not path.is_dir():
        if weight_name is not None:
            raise ValueError(f"weight_name={weight_name!r} is only for a folder; {path} is not one")
        if not path.is_file():
            raise CheckpointError(f"LoRA file {str(path)!r} does not exist")
        return path
    if weight_name is not None:
        return path / weight_name
    if (path / DIFFUSERS_WEIGHT_NAME).is_file():
        return path / DIFFUSERS_WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise CheckpointError(f"{path}: {len(found)} .safetensors files and no {DIFFUSERS_WEIGHT_NAME}; "
                              "allowed: pass weight_name=")
    return found[0]


def read_metadata(path: Path) -> dict[str, Any]:
    """diffusers' LoRA metadata (the peft ``LoraConfig`` per component prefix) of a safetensors file, or {}."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(METADATA_KEY)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def read_lora(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None,
              weight_name: str | None = None) -> LoraAdapter:
    """Read a kohya or diffusers/peft LoRA file (or a folder holding one) into our parameter names of ``unet``
    (our ``UNet``) and ``text_encoder`` (our ``TextEncoder``, kind clip or openclip)."""
    path = lora_file(path, weight_name)
    state = load_state_dict(path)
    return lora_from_state_dict(state, unet, text_encoder, str(path), read_metadata(path) or _ldm_lora_alpha(path))


def _ldm_lora_alpha(path: Path) -> dict[str, Any]:
    """α of an adapter folder written by earlier ``ldm finetune`` runs (``lora.safetensors`` in our layout beside
    ``lora.json``, whose ``lora.alpha`` the file itself does not carry), as diffusers' metadata; {} otherwise."""
    settings = path.with_name("lora.json")
    if path.name != "lora.safetensors" or not settings.is_file():
        return {}
    from ldm.io.files import read_json_object

    meta = read_json_object(settings)
    alpha = (meta.get("lora") or {}).get("alpha") if meta.get("format") == "ldm-lora" else None
    return {} if alpha is None else {"unet.lora_alpha": float(alpha)}


def lora_from_state_dict(state: Mapping[str, Tensor], unet: nn.Module, text_encoder: nn.Module | None,
                         source: str = "LoRA", metadata: Mapping[str, Any] | None = None) -> LoraAdapter:
    """A LoRA state dict (kohya or diffusers/peft keys) → :class:`LoraAdapter`; ``ValueError`` on the first key that
    does not fit the models."""
    targets = {"unet": _unet_targets(unet), "text_encoder": _text_targets(text_encoder)}
    groups = _group(state, source)
    layers: dict[str, dict[str, list[LoraLayer]]] = {}
    for (component, module), parts in groups.items():
        key = parts["key"]
        if "down" not in parts or "up" not in parts:
            missing = "down (lora_A)" if "down" not in parts else "up (lora_B)"
            raise ValueError(f"{source}: {key}: no matching {missing} weight")
        target = targets[component].get(module)
        if target is None:
            where = "this model has no text encoder" if not targets[component] else f"no such layer in the {component}"
            raise ValueError(f"{source}: {key}: {where} (is the LoRA for another base model?)")
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        alpha = parts.get("alpha")
        alpha = float(alpha) if alpha is not None else _metadata_alpha(metadata, component, module, rank)
        scale = alpha / (math.sqrt(rank) if _rslora(metadata, component) else rank)
        _check_shapes(source, key, down, up, target)
        layer = LoraLayer(down, up, scale, target.rows, key)
        layers.setdefault(component, {}).setdefault(target.param, []).append(layer)
    if not layers:
        raise ValueError(f"{source}: holds no LoRA weights (keys such as {list(state)[:3]})")
    return LoraAdapter(source, layers)


def _check_shapes(source: str, key: str, down: Tensor, up: Tensor, target: _Target) -> None:
    shape = target.shape
    out = shape[0] if target.rows is None else target.rows[1] - target.rows[0]
    rank = down.shape[0]
    expected_down = (rank, *shape[1:])
    fits = (down.ndim == up.ndim == len(shape) and tuple(down.shape) == expected_down
            and tuple(up.shape[:2]) == (out, rank) and all(n == 1 for n in up.shape[2:]))
    if not fits:
        wanted = f"down {expected_down}, up {(out, rank, *([1] * (len(shape) - 2)))}"
        raise ValueError(f"{source}: {key}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit "
                         f"{target.param} {tuple(shape)}; expected {wanted} (is the LoRA for another base model?)")


def _group(state: Mapping[str, Tensor], source: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Keys → (component, module name as written, normalised) → {"down", "up", "alpha", "key"}."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state.items():
        if _UNSUPPORTED.search(key):
            raise ValueError(f"{source}: {key}: not a plain LoRA weight (LyCORIS LoHa/LoKr/DoRA, LoRA biases and "
                             "weight diffs are not supported); allowed: lora_down/lora_up/alpha, lora_A/lora_B")
        parsed = _parse_kohya(key) if key.startswith("lora_") else _parse_diffusers(key)
        if parsed is None:
            raise ValueError(f"{source}: {key}: not a LoRA key of a known layout; allowed: kohya "
                             "'lora_unet_…/lora_te_….lora_down.weight', diffusers 'unet.….lora_A.weight'")
        component, module, role = parsed
        entry = groups.setdefault((component, module), {"key": key})
        if role in entry:
            raise ValueError(f"{source}: {key}: a second {role} weight for the same layer")
        entry[role] = value.item() if role == "alpha" else value
    return groups


def _parse_kohya(key: str) -> tuple[str, str, str] | None:
    """``lora_unet_a_b_c.lora_down.weight`` → ("unet", "kohya:a_b_c", "down")."""
    name, _, rest = key.partition(".")
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
    for prefix, component in _KOHYA_PREFIX.items():
        if name.startswith(prefix) and role is not None:
            return component, "kohya:" + name.removeprefix(prefix), role
    return None


def _parse_diffusers(key: str) -> tuple[str, str, str] | None:
    """``unet.down_blocks….to_q.lora_A.weight`` → ("unet", "down_blocks….to_q", "down"); also the older spellings."""
    component = "unet"
    for prefix in COMPONENTS:
        if key.startswith(prefix + "."):
            component, key = prefix, key.removeprefix(prefix + ".")
    key = key.replace(".processor.", ".")
    if key.endswith(".alpha"):
        module, role = key.removesuffix(".alpha"), "alpha"
    else:
        body = re.sub(r"\.(to_[qkv]|to_out)_lora\.(down|up)$", r".\1_lora.lora.\2", key.removesuffix(".weight"))
        for suffix, role in _ROLES.items():
            if body.endswith("." + suffix):
                module = body.removesuffix("." + suffix)
                break
        else:
            return None
    parent, _, last = module.rpartition(".")
    old = _OLD_ATTN if component == "unet" else _OLD_ATTN_TEXT
    if last in old:  # the pre-peft attention processors: ….attn1.processor.to_q_lora.down.weight
        module = f"{parent}.{old[last]}"
    return component, module, role


def _metadata_alpha(metadata: Mapping[str, Any] | None, component: str, module: str, rank: int) -> float:
    """α of ``module`` from diffusers' metadata (peft LoraConfig: ``lora_alpha``, ``alpha_pattern``); r without it."""
    if not metadata:
        return float(rank)
    alpha = metadata.get(f"{component}.lora_alpha")
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, value in patterns.items():  # peft: the pattern matches the module name or a suffix of it
        if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
            return float(value)
    return float(alpha) if alpha is not None else float(rank)


def _rslora(metadata: Mapping[str, Any] | None, component: str) -> bool:
    return bool(metadata and metadata.get(f"{component}.use_rslora"))


def _kohya_names(table: dict[str, _Target]) -> dict[str, _Target]:
    return {"kohya:" + name.replace(".", "_"): target for name, target in table.items()}


def _unet_targets(unet: nn.Module) -> dict[str, _Target]:
    """Module names (ours, diffusers', and both in kohya spelling) → the weight they own, for every ≥2-D weight."""
    params = {name: p.shape for name, p in unet.named_parameters() if name.endswith(".weight") and p.ndim >= 2}
    ours = {name.removesuffix(".weight"): _Target(name, shape) for name, shape in params.items()}
    renamed = unet_original_to_diffusers({name: name for name in params}, unet.config)  # diffusers key → ours
    theirs = {key.removesuffix(".weight"): _Target(name, params[name]) for key, name in renamed.items()}
    table = {**ours, **theirs}
    return {**table, **_kohya_names(table)}


def _text_targets(text_encoder: nn.Module | None) -> dict[str, _Target]:
    """transformers' ``CLIPTextModel`` module names (with ``text_model.``, and without it, and in kohya spelling) →
    our weight: the same names for kind clip, open_clip's for kind openclip (q/k/v: rows of ``in_proj_weight``)."""
    if text_encoder is None:
        return {}
    params = {name: p.shape for name, p in text_encoder.named_parameters() if p.ndim >= 2}
    table: dict[str, _Target] = {}
    if text_encoder.config.kind == "clip":
        for name, shape in params.items():
            if name.endswith(".weight") and ".encoder." in name:
                table[name.removesuffix(".weight")] = _Target(name, shape)
    else:
        width = text_encoder.config.width
        layers = text_encoder.config.layers
        for index in range(layers):
            block = f"transformer.resblocks.{index}."
            qkv = params[block + "attn.in_proj_weight"]
            for i, proj in enumerate("qkv"):
                table[f"text_model.encoder.layers.{index}.self_attn.{proj}_proj"] = _Target(
                    block + "attn.in_proj_weight", qkv, (i * width, (i + 1) * width))
            for hf, oc in _OC_OTHER.items():
                table[f"text_model.encoder.layers.{index}.{hf}"] = _Target(block + oc + ".weight",
                                                                          params[block + oc + ".weight"])
    table |= {name.removeprefix("text_model."): target for name, target in table.items()}
    return {**table, **_kohya_names(table)}


__all__ = ["DIFFUSERS_WEIGHT_NAME", "LoraAdapter", "LoraLayer", "lora_file", "lora_from_state_dict", "read_lora",
           "read_metadata"]
