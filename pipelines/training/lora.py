"""``ldm finetune``: fine-tune a loaded model fully, or with LoRA adapters (Hu et al. 2021, eq. 3:
W x + (α / r) · B A x) on the U-Net's attention projections through peft.

A LoRA run trains only the adapters and saves only them: ``model/lora.safetensors`` (peft's
adapter state dict) beside ``model/lora.json`` (the LoRA settings and the base model's path).
After training, the adapters are merged into the base weights and the merged model is written
in our format (``merged/``) and exported to diffusers (``merged-diffusers/``); a full fine-tune
writes ``model/`` and ``model-diffusers/``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm.config import ConfigError, config_from_dict
from ldm.io import CheckpointError, export_checkpoint, load_state_dict, read_checkpoint, save_state_dict
from ldm.io.unet_keys import unet_original_to_diffusers
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.loop import unwrap
from pipelines.models import Models
from pipelines.training.diffusion import DiffusionTask
from pipelines.training.settings import base_model_name, read_settings, write_settings

logger = logging.getLogger(__name__)

WEIGHTS, SETTINGS, FORMAT = "lora.safetensors", "lora.json", "ldm-lora"
SHARED_WEIGHTS = "pytorch_lora_weights.safetensors"  # kohya-ss layout: diffusers and the WebUIs load it
ADAPTER = "default"  # peft's adapter name; one adapter per model


@dataclasses.dataclass
class LoraSettings:
    """The ``lora:`` section of a finetune config. No dropout: it would draw from the global RNG
    and break exact resume."""

    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # name suffixes in the U-Net

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank!r} is out of range; allowed: an integer >= 1")
        if not self.target_modules:
            raise ValueError("target_modules is empty; allowed: module name suffixes, e.g. ['to_q', 'to_v']")

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=0.0)


def check_finetune(config: TrainConfig, source: str) -> LoraSettings | None:
    """Validate a finetune config before anything is built; the LoRA settings, or None for a full run."""
    if not config.model.init_from:
        raise ConfigError(f"{source}: finetune needs model.init_from: our folder, a diffusers folder or an SD file")
    if config.lora is None:
        return None
    if config.model.train_text_encoder:
        raise ConfigError(f"{source}: lora adapts the U-Net only; set model.train_text_encoder: false (or lora: null)")
    return config_from_dict(LoraSettings, config.lora, source, "lora.")


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers inside ``module``, by qualified name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def inject_lora(unet: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap the target layers of ``unet`` (in place) in LoRA layers; only the adapters stay trainable.
    B starts at zero, so the model's output is unchanged; A is drawn from the global RNG."""
    from peft import inject_adapter_in_model

    if lora_layers(unet):
        raise ValueError("the U-Net already holds LoRA layers; merge_lora() them first")
    inject_adapter_in_model(settings.peft_config(), unet, adapter_name=ADAPTER)
    if not lora_layers(unet):
        raise ConfigError(f"lora.target_modules={list(settings.target_modules)} match no layer of the U-Net")
    return unet


def save_lora(unet: nn.Module, folder: str | Path, settings: LoraSettings, base_model: str | None) -> None:
    """Write only the adapters of ``unet``: ``lora.safetensors`` and ``lora.json`` (ours, for resuming and
    merging) and ``pytorch_lora_weights.safetensors``, the same adapters in the kohya-ss layout that diffusers'
    ``load_lora_weights(folder)`` and the SD WebUIs load."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    save_state_dict(state, folder / WEIGHTS)
    save_state_dict(kohya_state_dict(state, unet.config, settings.alpha), folder / SHARED_WEIGHTS)
    write_settings(folder / SETTINGS, FORMAT, "lora", settings, base_model)


def kohya_state_dict(peft_state: dict[str, Tensor], config: Any, alpha: float) -> dict[str, Tensor]:
    """Our peft adapters (keys ``input_blocks.1.1…to_q.lora_A.weight``, the original SD layout) as a kohya-ss
    LoRA: ``lora_unet_<diffusers module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    out: dict[str, Tensor] = {}
    for key, down in peft_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        (renamed,) = unet_original_to_diffusers({f"{module}.weight": down}, config)
        name = "lora_unet_" + renamed.removesuffix(".weight").replace(".", "_")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = peft_state[f"{module}.lora_B.weight"]
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def read_lora_settings(folder: str | Path) -> tuple[LoraSettings, str | None]:
    """The LoRA settings and the base model path (as written; may be relative) of an adapter folder."""
    return read_settings(Path(folder) / SETTINGS, FORMAT, "lora", LoraSettings,
                         "not a LoRA adapter folder (ldm finetune writes one)")


def set_lora_weights(unet: nn.Module, folder: str | Path) -> None:
    """Load ``folder``'s adapter weights into a U-Net that already holds matching LoRA layers."""
    from peft import set_peft_model_state_dict

    state = load_state_dict(Path(folder) / WEIGHTS)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{folder}: adapters do not fit the U-Net: {len(missing)} missing (e.g. {missing[:2]}), "
                              f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")


def load_lora(models: Models, folder: str | Path) -> Any:
    """Inject the adapters saved in ``folder`` into ``models.unet`` (the base model it was trained
    from; ``read_lora_settings(folder)[1]`` names it) and load their weights. Returns ``models``."""
    settings, _ = read_lora_settings(folder)
    inject_lora(models.unet, settings)
    set_lora_weights(models.unet, folder)
    return models


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (α/r) B A) and put the plain base layer back,
    so the state dict has the original keys again. In place; returns ``unet``."""
    for name, layer in lora_layers(unet).items():
        layer.merge(safe_merge=True)  # raises on non-finite merged weights
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    return unet.requires_grad_(True)  # as a freshly loaded model


class LoraTask(DiffusionTask):
    """The diffusion task with LoRA adapters in the U-Net: the base weights and the text encoder are
    frozen, the optimizer sees only the adapters, the model folder holds only the adapters. No EMA:
    the saved adapters are the trained ones."""

    def __init__(self, config: TrainConfig, models: Models, settings: LoraSettings, base_model: str | None) -> None:
        super().__init__(config, models)
        self.settings, self.base_model = settings, base_model
        if models.text_encoder is not None:
            self.train_text = False
            models.text_encoder.requires_grad_(False).eval()
        inject_lora(models.unet, settings)
        trainable = [n for n, p in models.unet.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable), trainable[:3]
        adapters = sum(p.numel() for p in models.unet.parameters() if p.requires_grad)
        total = sum(p.numel() for p in models.unet.parameters())
        logger.info("LoRA rank %d on %d layers: %d trainable parameters (%.2f%% of the U-Net's %d)",
                    settings.rank, len(lora_layers(models.unet)), adapters, 100 * adapters / total, total)
        if config.ema.enabled:
            logger.info("EMA is not kept for LoRA adapters")

    def groups(self) -> list[list[nn.Module]]:
        # The U-Net whose only trainable parameters are the adapters: the loop's parameters() hands
        # the optimizer just those, and accumulate() still sees the (DDP-wrapped) module.
        return [[self.models.unet]]

    def ema_target(self) -> None:
        return None

    def write_model(self, path: Path, ema: EMA | None) -> None:
        save_lora(unwrap(self.models.unet), path, self.settings, self.base_model)

    def load_model(self, path: Path) -> None:
        settings, _ = read_lora_settings(path)
        if settings != self.settings:
            raise CheckpointError(f"{path}: adapters were trained with {settings}; this run uses {self.settings}")
        set_lora_weights(unwrap(self.models.unet), path)


def finetune_task(config: TrainConfig, models: Models, source: str) -> DiffusionTask:
    """The task of ``ldm finetune``: LoRA when ``config.lora`` is set, else the full diffusion task."""
    native = models.sample_size * models.vae.downsample_factor
    if config.data.image_size != native:
        logger.warning("data.image_size=%d but the model's native size is %d (sample_size %d × VAE factor %d)",
                       config.data.image_size, native, models.sample_size, models.vae.downsample_factor)
    settings = check_finetune(config, source)
    if settings is None:
        return DiffusionTask(config, models)
    return LoraTask(config, models, settings, base_model_name(config.model.init_from))


def export_finetuned(task: DiffusionTask, output_dir: str | Path) -> list[Path]:
    """After training (main process only): LoRA runs merge the adapters and write ``merged/`` (our
    format) and ``merged-diffusers/``; full runs export ``model/`` to ``model-diffusers/``. A model
    diffusers cannot hold (concat or classifier parts) is left in our format, with a warning."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return []
    root = Path(output_dir)
    if isinstance(task, LoraTask):
        m = task.models
        m.unet = merge_lora(unwrap(m.unet)).cpu().eval()
        m.vae.cpu()
        if m.text_encoder is not None:
            m.text_encoder = unwrap(m.text_encoder).cpu().eval()
        ours = root / "merged"
        m.save(ours)
        checkpoint = m.to_checkpoint()
    else:
        ours = root / "model"
        checkpoint = read_checkpoint(ours)  # its EMA weights are exported, as from_pretrained loads them
    written = [ours]
    target = ours.with_name(ours.name + "-diffusers")
    try:
        export_checkpoint(checkpoint, target, "diffusers")
        written.append(target)
    except ValueError as err:
        logger.warning("not exported to diffusers: %s", err)
    logger.info("fine-tuned model written to %s", ", ".join(map(str, written)))
    return written


__all__ = ["LoraSettings", "LoraTask", "check_finetune", "export_finetuned", "finetune_task", "inject_lora",
           "load_lora", "merge_lora", "read_lora_settings", "save_lora"]
