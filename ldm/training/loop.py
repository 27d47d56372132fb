"""The training loop under Accelerate, shared by every trainer.

A *task* owns the networks and says what to optimise: ``groups()`` gives one list of trainable
modules per optimizer, ``loss(i, batch, generator, step)`` the loss of optimizer i. Everything
random is a function of (seed, step, rank, micro-batch) and the data order of (seed, epoch), so a
run resumed from the checkpoint at step K continues bit for bit as if it had never stopped: the
only state is the weights, the EMA, the optimizers and the step.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from ldm.config import config_to_dict, flatten
from ldm.devices import has_accelerator
from ldm.training.checkpoints import (
    checkpoint_dir,
    latest_checkpoint,
    load_optimizer_state,
    load_state,
    save_checkpoint,
)
from ldm.training.config import TrainConfig, save_train_config
from ldm.training.ema import EMA
from ldm.training.stop import StopRequest, TrainingStopped

logger = logging.getLogger(__name__)


class DivergedError(ValueError):
    """Non-finite loss, gradients or weights: the run stops before they reach an optimizer step or a checkpoint."""


class Task(Protocol):
    def groups(self) -> list[list[nn.Module]]: ...
    def prepare(self, accelerator: Accelerator) -> None: ...
    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor: ...
    def ema_target(self) -> nn.Module | None: ...
    def write_model(self, path: Path, ema: EMA | None) -> None: ...
    def load_model(self, path: Path) -> None: ...
    # optional: lr_scale(item) -> float, the share of optim.lr for an item of groups() (1 where absent)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The generator of one micro-batch: a fixed function of its coordinates."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 97 + micro)


def stream_indices(num_items: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices at positions [start, start+count) of an endless stream of epochs, each a
    permutation drawn from (seed, epoch)."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        out.append(_epoch_order(num_items, seed, epoch)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    def stack(values: list) -> Any:
        if isinstance(values[0], Tensor):
            return torch.stack(values)
        return torch.tensor(values) if isinstance(values[0], int) else values

    return {key: stack([item[key] for item in items]) for key in items[0]}


def batch_field(batch: dict[str, Any], key: str, needed_by: str) -> Any:
    """``batch[key]``; a ``ValueError`` naming ``needed_by`` (the setting that needs it) when the dataset lacks it."""
    if key not in batch:
        raise ValueError(f"{needed_by} needs {key!r} in each training sample; this dataset gives "
                         f"{', '.join(sorted(batch))}; allowed: data.kind='shapes'")
    return batch[key]


def parameters(group: list[nn.Module | nn.Parameter]) -> list[nn.Parameter]:
    """Trainable parameters of a group of modules (and loose parameters)."""
    found = [p for item in group for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]
    return [p for p in found if p.requires_grad]


def param_groups(group: list[nn.Module | nn.Parameter], scale: Callable[[Any], float]) -> list[dict[str, Any]]:
    """One optimizer parameter group per item of ``group`` that has trainable parameters, with the item's
    learning-rate share ``scale(item)`` (a task's optional ``lr_scale``) under the key ``lr_scale``."""
    return [{"params": found, "lr_scale": scale(item)} for item in group if (found := parameters([item]))]


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``optim.lr`` over ``warmup_steps``, constant, then (with ``decay_steps``)
    linear decay towards 0 over the last ``decay_steps`` of ``max_steps``."""
    o = config.optim
    rate = o.lr * (min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
    if o.decay_steps:
        rate *= min(1.0, (o.max_steps - step) / o.decay_steps)
    return rate


class LatentCache:
    """Posterior moments (mean, logvar) per dataset index, so each image is encoded once.
    (A resumed run refills it in another order; bit-exact resume is only promised without it.)"""

    def __init__(self) -> None:
        self.moments: dict[int, Tensor] = {}

    def get(self, vae: nn.Module, images: Tensor, indices: list[int]) -> Tensor:
        if any(i not in self.moments for i in indices):
            fresh = unwrap(vae).encode_moments(images)
            for row, index in enumerate(indices):
                self.moments.setdefault(index, fresh[row].cpu())
        return torch.stack([self.moments[i] for i in indices]).to(images.device)


def encode_latents(vae: nn.Module, images: Tensor, mode: str, generator: torch.Generator,
                   cache: LatentCache | None = None, indices: Tensor | None = None) -> Tensor:
    """Scaled latents of the autoencoder: a posterior sample (LDM) or the posterior mean; with
    gradients only when the autoencoder is being trained."""
    trained = any(p.requires_grad for p in vae.parameters())
    with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
        if cache is not None and indices is not None and not trained:
            posterior = unwrap(vae).posterior(cache.get(vae, images, indices.tolist()))
        else:
            posterior = unwrap(vae).encode(images)
        latents = posterior.sample(generator) if mode == "sample" else posterior.mean
    return latents * unwrap(vae).config.scale_factor


def make_accelerator(config: TrainConfig) -> Accelerator:
    # Without an accelerator (cuda, mps, xpu), cpu=True lets a multi-process launch form gloo ranks (MULTI_CPU)
    # instead of each process running alone.
    accelerator = Accelerator(mixed_precision=config.optim.mixed_precision, cpu=not has_accelerator(),
                              gradient_accumulation_steps=config.optim.grad_accum, log_with=config.tracker,
                              project_dir=config.output_dir)
    if config.tracker:
        scalars = {k: v for k, v in flatten(config_to_dict(config)).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ldm", config=scalars)
    return accelerator


def run_training(config: TrainConfig, task: Task, dataset: Any, accelerator: Accelerator | None = None,
                 on_checkpoint: Callable[[int, Path, Accelerator], None] | None = None) -> Path:
    """Train ``task`` on ``dataset`` (resuming from the newest checkpoint); returns the model folder.

    ``on_checkpoint(step, folder, accelerator)`` runs on the main process after each checkpoint
    (the trainers' entry point writes a sample grid there)."""
    root = Path(config.output_dir)
    accelerator = accelerator or make_accelerator(config)
    o = config.optim
    scale = getattr(task, "lr_scale", lambda module: 1.0)
    optimizers = [torch.optim.AdamW(param_groups(group, scale), lr=o.lr, betas=tuple(o.betas),
                                    weight_decay=o.weight_decay) for group in task.groups()]
    target = task.ema_target()
    ema = EMA(target, config.ema.decay, config.ema.warmup) if config.ema.enabled and target is not None else None
    step = _resume(root, task, ema, optimizers)
    task.prepare(accelerator)
    optimizers = [accelerator.prepare(opt) for opt in optimizers]
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        save_train_config(config, root / "config.yaml")
    accelerator.wait_for_everyone()
    _loop(config, task, dataset, accelerator, optimizers, ema, step, on_checkpoint)
    final = root / "model"
    if accelerator.is_main_process:
        task.write_model(final, ema)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _resume(root: Path, task: Task, ema: EMA | None, optimizers: list[torch.optim.Optimizer]) -> int:
    found = latest_checkpoint(root)
    if found is None:
        return 0
    from ldm.io.files import load_state_dict

    task.load_model(found / "model")
    if ema is not None:
        ema.load_state_dict(load_state_dict(found / "ema.safetensors"))
    states = load_optimizer_state(found)
    for optimizer, state in zip(optimizers, states["optimizers"]):
        optimizer.load_state_dict(state)
    step = int(load_state(found)["step"])
    logger.info("resuming from %s (step %d)", found, step)
    return step


def _loop(config: TrainConfig, task: Task, dataset: Any, accelerator: Accelerator,
          optimizers: list[torch.optim.Optimizer], ema: EMA | None, step: int, on_checkpoint: Callable | None) -> None:
    bar = tqdm(total=config.optim.max_steps, initial=step, desc="train",
               disable=not accelerator.is_local_main_process)
    with bar, StopRequest() as stop:  # the bar closes before an error is printed, so the error is the last line
        while step < config.optim.max_steps:
            losses = [_optimizer_step(config, task, dataset, accelerator, index, optimizer, step)
                      for index, optimizer in enumerate(optimizers)]
            step += 1
            if ema is not None:
                ema.update(unwrap(task.ema_target()))
            means = _after_step(config, task, accelerator, optimizers, ema, step, losses, on_checkpoint, stop)
            bar.update(1)
            bar.set_postfix(loss=f"{means[0]:.4f}")
            if stop.received is not None:
                _stop(config, task, accelerator, optimizers, ema, step, means[0], on_checkpoint, stop)


def _optimizer_step(config: TrainConfig, task: Task, dataset: Any, accelerator: Accelerator, index: int,
                    optimizer: torch.optim.Optimizer, step: int) -> Tensor:
    """Optimizer ``index``'s update at ``step`` over its micro-batches; the last micro-batch's loss."""
    o, rank, world = config.optim, accelerator.process_index, accelerator.num_processes
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step) * group["lr_scale"]
    for micro in range(o.grad_accum):
        start = ((step * o.grad_accum + micro) * world + rank) * o.batch_size
        indices = stream_indices(len(dataset), config.seed, start, o.batch_size)
        batch = {**collate([dataset[i] for i in indices]), "index": torch.tensor(indices)}
        generator = step_generator(config.seed, step, rank, micro)
        modules = [m for m in task.groups()[index] if isinstance(m, nn.Module)]
        with accelerator.accumulate(*modules):
            loss = task.loss(index, batch, generator, step)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                _check_gradients(config, accelerator, optimizer, step, loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _check_gradients(config: TrainConfig, accelerator: Accelerator, optimizer: torch.optim.Optimizer, step: int,
                     loss: Tensor) -> None:
    """Clip to ``max_grad_norm`` (when > 0) and refuse a non-finite gradient before it reaches the weights. The
    gradients are already summed over processes here, so every process stops at the same step. (With float16
    mixed precision the loss scaler skips such steps itself.)"""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    limit = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(params, limit)
    if getattr(accelerator, "scaler", None) is None and not torch.isfinite(torch.as_tensor(norm)):
        _diverged(config, step + 1, f"the gradient norm is {float(norm)} (loss {loss.item():.4g})")


def _diverged(config: TrainConfig, step: int, what: str) -> None:
    """Raise ``DivergedError`` for ``step`` (counted from 1, as checkpoints and logs count)."""
    last = latest_checkpoint(Path(config.output_dir))
    kept = f"the newest checkpoint, {last.name}, is the last finite one" if last else "no checkpoint was written"
    raise DivergedError(f"training diverged at step {step}: {what}; {kept}; lower optim.lr "
                        f"(now {config.optim.lr:g}) or check the data, then run again")


def _reduce(losses: list[Tensor], stop: StopRequest, accelerator: Accelerator) -> list[float]:
    """The losses' means over processes, in the step's one collective, which also carries whether any process
    received SIGTERM / SIGINT: all processes must stop at the same step (those that did not receive one take
    SIGTERM as their reason)."""
    if accelerator.num_processes == 1:
        return [loss.item() for loss in losses]
    flag = torch.tensor([float(stop.received is not None)], device=losses[0].device)
    totals = accelerator.reduce(torch.cat([torch.stack([loss.float() for loss in losses]), flag]), reduction="sum")
    if totals[-1].item() and stop.received is None:
        stop.received = signal.SIGTERM
    return (totals[:-1] / accelerator.num_processes).tolist()


def _stop(config: TrainConfig, task: Task, accelerator: Accelerator, optimizers: list, ema: EMA | None,
          step: int, loss: float, on_checkpoint: Callable | None, stop: StopRequest) -> None:
    if step % config.checkpoint_every != 0:  # not saved by the step itself
        _checkpoint(config, task, accelerator, optimizers, ema, step, loss, on_checkpoint)
    raise TrainingStopped(f"stopped by {stop.name} after step {step}; its checkpoint is in "
                          f"{checkpoint_dir(Path(config.output_dir), step)}; run the same command again to resume",
                          int(stop.received))


def _after_step(config: TrainConfig, task: Task, accelerator: Accelerator, optimizers: list, ema: EMA | None,
                step: int, losses: list[Tensor], on_checkpoint: Callable | None, stop: StopRequest) -> list[float]:
    """Checksums, the finite check, the log and the checkpoint of ``step``; the losses' means over processes."""
    root = Path(config.output_dir)
    if config.param_checksums:
        total = sum(float(p.detach().double().sum()) for g in task.groups() for p in parameters(g))
        with open(root / f"checksums-rank{accelerator.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "sum": total}) + "\n")
    means = _reduce(losses, stop, accelerator)
    if not all(math.isfinite(m) for m in means):
        _diverged(config, step, f"the loss is {means}")
    if accelerator.is_main_process and (step % config.log_every == 0 or step == config.optim.max_steps):
        record = {"step": step, "loss": means[0], "lr": optimizers[0].param_groups[0]["lr"]}
        record.update({f"loss{i}": m for i, m in enumerate(means[1:], start=1)})
        record.update(getattr(task, "metrics", {}))  # e.g. the autoencoder's L1 reconstruction
        with open(root / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
    if step % config.checkpoint_every == 0 or step == config.optim.max_steps:
        _checkpoint(config, task, accelerator, optimizers, ema, step, means[0], on_checkpoint)
    return means


def _checkpoint(config: TrainConfig, task: Task, accelerator: Accelerator, optimizers: list, ema: EMA | None,
                step: int, loss: float, on_checkpoint: Callable | None) -> None:
    ema_state = ema.state_dict() if ema else {}
    weights = [p for group in task.groups() for p in parameters(group)] + list(ema_state.values())
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        _diverged(config, step, "the loss is finite but some weights are not")
    if accelerator.is_main_process:
        states = {"optimizers": [opt.state_dict() for opt in optimizers]}
        folder = save_checkpoint(Path(config.output_dir), step, lambda path: task.write_model(path, ema),
                                 ema_state, states, {"loss": loss}, config.keep_checkpoints)
        if on_checkpoint is not None:
            on_checkpoint(step, folder, accelerator)
    accelerator.wait_for_everyone()
