"""The latent diffusion training loop under Accelerate.

Everything random is a function of (seed, step, rank, micro-batch) and the data order of
(seed, epoch), so a run resumed from the checkpoint at step K continues bit for bit as if it had
never stopped: the only state is the weights, the EMA, the optimizer and the step.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from ldm.conditioning.spatial import image_condition, semantic_condition
from ldm.diffusion import NoiseSchedule, diffusion_loss
from ldm.io.checkpoint import write_folder
from ldm.io.files import load_state_dict
from ldm.training.checkpoints import latest_checkpoint, load_optimizer_state, load_state, save_checkpoint
from ldm.training.config import TrainConfig, save_train_config
from ldm.training.ema import EMA

logger = logging.getLogger(__name__)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch: a fixed function of its coordinates."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 97 + micro)


def stream_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at positions [start, start+count) of an endless stream of epochs, each a
    permutation drawn from (seed, epoch)."""
    out, cache = [], {}
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        if epoch not in cache:
            cache[epoch] = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(cache[epoch][offset]))
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: (torch.stack([i[k] for i in items]) if isinstance(items[0][k], Tensor) else
                torch.tensor([i[k] for i in items]) if isinstance(items[0][k], int) else [i[k] for i in items])
            for k in items[0]}


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by the empty (unconditional) prompt with probability ``p``."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def conditioning(models: Any, batch: dict[str, Any], latents: Tensor, generator: torch.Generator, p: float) -> dict:
    """U-Net inputs beside x_t: the text context (or a zero one), a concat condition, labels."""
    unet, device = models.unet, latents.device
    if models.text_encoder is not None:
        ids = models.tokenizer(drop_captions(batch["caption"], p, generator)).to(device)
        context = models.text_encoder(ids)
    else:
        context = torch.zeros(latents.shape[0], 1, _unwrap(unet).config.context_dim, device=device)
    out: dict[str, Tensor] = {"context": context}
    kind = (models.concat or {}).get("kind")
    if kind == "image":
        out["concat"] = image_condition(batch["low_res"].to(device), tuple(latents.shape[-2:]))
    elif kind == "semantic":
        out["concat"] = semantic_condition(batch["semantic"].to(device), int(models.concat["num_classes"]),
                                           tuple(latents.shape[-2:]))
    if _unwrap(unet).config.num_classes is not None:
        out["y"] = batch["label"].to(device)
    return out


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def micro_loss(models: Any, batch: dict[str, Any], schedule: NoiseSchedule, config: TrainConfig,
               generator: torch.Generator, device: torch.device) -> Tensor:
    vae = models.vae
    with torch.no_grad():
        latents = vae.encode(batch["image"].to(device)).sample(generator) * vae.config.scale_factor
    cond = conditioning(models, batch, latents, generator, config.objective.cond_dropout)

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        x = torch.cat([x_t, cond["concat"]], dim=1) if "concat" in cond else x_t
        return models.unet(x, t, cond["context"], cond.get("y"))

    obj = config.objective
    return diffusion_loss(model, latents, schedule, prediction_type=models.schedule.prediction_type,
                          generator=generator, min_snr_gamma=obj.min_snr_gamma, offset_noise=obj.offset_noise)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``optim.lr`` over ``warmup_steps``, then constant."""
    warmup = config.optim.warmup_steps
    return config.optim.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


def trainable_modules(models: Any, config: TrainConfig) -> list[torch.nn.Module]:
    models.vae.requires_grad_(False).eval()
    trainable = [models.unet]
    if models.text_encoder is not None:
        models.text_encoder.requires_grad_(config.model.train_text_encoder)
        if config.model.train_text_encoder:
            trainable.append(models.text_encoder)
    for module in trainable:
        module.train()
    return trainable


def train(config: TrainConfig, models: Any, dataset: Any, log: Callable[[dict], None] | None = None) -> Path:
    """Train ``models`` (a ``pipelines.Models``) on ``dataset``; returns the final model folder."""
    root = Path(config.output_dir)
    # Without CUDA, cpu=True lets a multi-process launch form gloo ranks (MULTI_CPU) instead of
    # each process running alone.
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=config.optim.grad_accum)
    models.unet.config.gradient_checkpointing = config.gradient_checkpointing
    trainable = trainable_modules(models, config)
    params = [p for m in trainable for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay)
    ema = EMA(models.unet, config.ema.decay, config.ema.warmup) if config.ema.enabled else None
    step = _resume(root, models, ema, optimizer, config)
    prepared = accelerator.prepare(*trainable, optimizer)
    models.unet = prepared[0]
    if config.model.train_text_encoder and models.text_encoder is not None:
        models.text_encoder = prepared[1]
    optimizer = prepared[-1]
    models.vae.to(accelerator.device)
    if models.text_encoder is not None:
        models.text_encoder.to(accelerator.device)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        save_train_config(config, root / "config.yaml")
    _loop(config, models, dataset, accelerator, optimizer, ema, step, log)
    return _finish(config, models, ema, accelerator)


def _resume(root: Path, models: Any, ema: EMA | None, optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    found = latest_checkpoint(root)
    if found is None:
        return 0
    models.unet.load_state_dict(load_state_dict(found / "model" / "unet.safetensors"))
    models.vae.load_state_dict(load_state_dict(found / "model" / "vae.safetensors"))
    if models.text_encoder is not None:
        models.text_encoder.load_state_dict(load_state_dict(found / "model" / "text_encoder.safetensors"))
    if ema is not None:
        ema.load_state_dict(load_state_dict(found / "ema.safetensors"))
    optimizer.load_state_dict(load_optimizer_state(found))
    step = int(load_state(found)["step"])
    logger.info("resuming from %s (step %d)", found, step)
    return step


def _loop(config: TrainConfig, models: Any, dataset: Any, accelerator: Accelerator,
          optimizer: torch.optim.Optimizer, ema: EMA | None, step: int, log: Callable | None) -> None:
    schedule = NoiseSchedule.from_config(models.schedule)
    o, rank, world = config.optim, accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=o.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    while step < o.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        for micro in range(o.grad_accum):
            start = ((step * o.grad_accum + micro) * world + rank) * o.batch_size
            batch = collate([dataset[i] for i in stream_indices(len(dataset), config.seed, start, o.batch_size)])
            generator = step_generator(config.seed, step, rank, micro)
            with accelerator.accumulate(models.unet):
                loss = micro_loss(models, batch, schedule, config, generator, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], o.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(_unwrap(models.unet))
        _after_step(config, models, accelerator, optimizer, ema, step, loss.detach(), log)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()


def _after_step(config: TrainConfig, models: Any, accelerator: Accelerator, optimizer: torch.optim.Optimizer,
                ema: EMA | None, step: int, loss: Tensor, log: Callable | None) -> None:
    root = Path(config.output_dir)
    if config.param_checksums:
        total = sum(float(p.detach().double().sum()) for p in _unwrap(models.unet).parameters())
        with open(root / f"checksums-rank{accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "sum": total}) + "\n")
    mean_loss = accelerator.reduce(loss, reduction="mean").item()
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss is {mean_loss} at step {step}; lower optim.lr or check the data")
    if accelerator.is_main_process and (step % config.log_every == 0 or step == config.optim.max_steps):
        record = {"step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]}
        with open(root / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if log is not None:
            log(record)
    if step % config.checkpoint_every == 0 or step == config.optim.max_steps:
        if accelerator.is_main_process:
            save_checkpoint(root, step, lambda path: _write_model(models, ema, path), ema.state_dict() if ema else {},
                            optimizer.state_dict(), {"loss": mean_loss}, config.keep_checkpoints)
        accelerator.wait_for_everyone()


def _write_model(models: Any, ema: EMA | None, path: Path) -> None:
    unet, text = _unwrap(models.unet), models.text_encoder and _unwrap(models.text_encoder)
    original = models.unet, models.text_encoder
    models.unet, models.text_encoder = unet, text
    try:
        checkpoint = models.to_checkpoint()
    finally:
        models.unet, models.text_encoder = original
    if ema is not None:
        checkpoint.ema = ema.averaged_state_dict(unet)
    write_folder(checkpoint, path)


def _finish(config: TrainConfig, models: Any, ema: EMA | None, accelerator: Accelerator) -> Path:
    final = Path(config.output_dir) / "model"
    if accelerator.is_main_process:
        _write_model(models, ema, final)
    accelerator.wait_for_everyone()
    return final
