"""Text-to-image under ControlNet control (Zhang, Rao & Agrawala 2023): a control image (edges, depth, pose, ...)
steers the layout through one or more ControlNets whose residuals are added to the U-Net's skips, as diffusers'
StableDiffusionControlNetPipeline does."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.diffusion import ClassifierFreeGuidance, Denoiser
from ldm.diffusion.denoiser import DenoiserLike
from ldm.diffusion.samplers import sampler_grid
from ldm.io.controlnet_keys import controlnet_from_diffusers_model, read_controlnet
from ldm.modules.controlnet import ControlNet
from ldm.validation import check_float, check_int
from pipelines.base import PipelineOutput, resolve_source
from pipelines.images import _open
from pipelines.options import Conditioning, SamplingOptions
from pipelines.text_to_image import TextToImagePipeline

ControlNetLike = ControlNet | str | Path | Any  # ours, a diffusers ControlNetModel, a folder or an original file
ControlImage = Image.Image | np.ndarray | Tensor | str | Path


def as_controlnet(net: ControlNetLike) -> ControlNet:
    """Our :class:`ControlNet` from itself, a diffusers ``ControlNetModel`` (its weights converted), a diffusers
    ControlNet folder, an original ControlNet file (``control_model.`` prefix or none) or a shipped demo
    ControlNet's name ("demo-controlnet")."""
    if isinstance(net, ControlNet):
        return net
    if isinstance(net, (str, Path)):
        return read_controlnet(resolve_source(net))
    if type(net).__name__ == "ControlNetModel" and hasattr(net, "config"):
        return controlnet_from_diffusers_model(net)
    raise ValueError(f"controlnet={type(net).__name__} is not allowed; allowed: a ControlNet, a diffusers "
                     "ControlNetModel, a diffusers ControlNet folder or an original ControlNet file")


def control_image(image: ControlImage | list, height: int | None, width: int | None, factor: int,
                  channels: int = 3, name: str = "image") -> Tensor:
    """A control image as diffusers' control image processor gives it (``do_normalize=False``): (B, C, H, W)
    float32 in [0, 1], resized to ``height`` × ``width`` (None: its own size rounded down to a multiple of
    ``factor``), PIL images (converted to RGB) with Lanczos, arrays and tensors with nearest-neighbour.

    Takes a PIL image or path, a float array (H, W, C) / (B, H, W, C) in [0, 1] (uint8: /255), a float tensor
    (C, H, W) / (B, C, H, W) in [0, 1], or a list of one kind."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list; allowed: a control image or a list of them")
    items = [_open(i, name) if isinstance(i, (str, Path)) else i for i in items]
    if all(isinstance(i, Image.Image) for i in items):
        h, w = _size(height, width, items[0].height, items[0].width, factor, name)
        arrays = [np.asarray(i.resize((w, h), Image.LANCZOS).convert("RGB"), dtype=np.float32) / 255 for i in items]
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, H, W, 3) → (B, 3, H, W)
    elif all(isinstance(i, np.ndarray) for i in items):
        arrays = [i.astype(np.float32) / 255 if i.dtype == np.uint8 else i.astype(np.float32) for i in items]
        if any(a.ndim not in (3, 4) for a in arrays):
            raise ValueError(f"{name} has an array of shape {arrays[0].shape}; allowed: (H, W, C) or (B, H, W, C)")
        tensor = torch.from_numpy(np.concatenate([a if a.ndim == 4 else a[None] for a in arrays]))
        tensor = tensor.permute(0, 3, 1, 2)  # (B, H, W, C) → (B, C, H, W)
    elif all(isinstance(i, Tensor) for i in items):
        if any(i.ndim not in (3, 4) for i in items):
            raise ValueError(f"{name} has a tensor of shape {tuple(items[0].shape)}; allowed: (C, H, W) or "
                             "(B, C, H, W)")
        tensor = torch.cat([i if i.ndim == 4 else i[None] for i in items]).float().cpu()
    else:
        kinds = sorted({type(i).__name__ for i in items})
        raise ValueError(f"{name} holds {', '.join(kinds)}; allowed: PIL images, file paths, arrays or tensors, "
                         "one kind per list")
    if tensor.shape[1] != channels:
        raise ValueError(f"{name} has {tensor.shape[1]} channels (shape {tuple(tensor.shape)}); allowed: "
                         f"{channels}, the ControlNet's hint channels")
    if not bool(((tensor >= 0) & (tensor <= 1)).all()):
        raise ValueError(f"{name} has values in [{tensor.min().item():g}, {tensor.max().item():g}]; allowed: [0, 1]")
    h, w = _size(height, width, tensor.shape[2], tensor.shape[3], factor, name)
    if (h, w) != tuple(tensor.shape[2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=(h, w))  # nearest, as diffusers
    return tensor


def _size(height: int | None, width: int | None, h: int, w: int, factor: int, name: str) -> tuple[int, int]:
    """The output size: as given, or the image's own rounded down to a multiple of ``factor``."""
    if (height is None and h < factor) or (width is None and w < factor):
        raise ValueError(f"{name} is {w}x{h} pixels; allowed: at least {factor}x{factor} (the autoencoder's "
                         "downsampling factor), or pass height= and width=")
    return (h // factor * factor if height is None else height), (w // factor * factor if width is None else width)


@dataclasses.dataclass
class _ControlCall:
    """One call's control: hints (B_k, C, H, W) in [0, 1], per net scale and [start, end) fraction of the steps,
    guess mode; ``timesteps``: the sampler's grid (set when sampling starts)."""

    hints: list[Tensor]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    timesteps: Tensor | None = None

    def step(self, t: Tensor) -> int:
        """The index i of the sampler step at timestep ``t`` (B,): the grid's t_i, or the step a point between
        t_i and t_{i+1} lies in (second-order and SDE samplers' midpoints)."""
        grid = self.timesteps
        i = int((grid >= t.flatten()[0].to(grid.dtype).cpu()).sum()) - 1
        return min(max(i, 0), len(grid) - 1)

    def scale(self, k: int, i: int) -> float:
        """Net k's conditioning scale at step i: 0 outside its [start, end) share of the steps, exactly as
        diffusers' controlnet_keep (1 - [i/n < start or (i+1)/n > end])."""
        n = len(self.timesteps)
        keep = 1.0 - float(i / n < self.starts[k] or (i + 1) / n > self.ends[k])
        return self.scales[k] * keep


class ControlNetPipeline(TextToImagePipeline):
    """``pipe(prompt, image=control_image, ...)`` → ``PipelineOutput(images)``; ``pipe.controlnet``: one
    ControlNet or a list of them (their residuals add up). See ``__call__``."""

    def __init__(self, models: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 controlnet: ControlNetLike | list[ControlNetLike] | None = None) -> None:
        self._nets: list[ControlNet] = []
        self._control: _ControlCall | None = None
        super().__init__(models, device, dtype)
        if controlnet is not None:
            self.controlnet = controlnet

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, controlnet: ControlNetLike | list | None = None,
                        torch_dtype: torch.dtype | None = None, **options: Any) -> ControlNetPipeline:
        """As :meth:`Pipeline.from_pretrained`, with ``controlnet``: one or a list of ControlNets, diffusers
        ControlNetModels, diffusers ControlNet folders or original ControlNet files (also settable later as
        ``pipe.controlnet``)."""
        pipe = super().from_pretrained(source, device, dtype, torch_dtype=torch_dtype, **options)
        if controlnet is not None:
            pipe.controlnet = controlnet
        return pipe

    @property
    def controlnet(self) -> ControlNet | list[ControlNet] | None:
        """The ControlNet, or the list of them (None: not set yet)."""
        if not self._nets:
            return None
        return self._nets[0] if len(self._nets) == 1 else list(self._nets)

    @controlnet.setter
    def controlnet(self, nets: ControlNetLike | list[ControlNetLike] | None) -> None:
        nets = [] if nets is None else [as_controlnet(n) for n in (nets if isinstance(nets, (list, tuple)) else [nets])]
        for k, net in enumerate(nets):
            self._check_fits(net, k)
        self._nets = [net.to(self.device, self.dtype).eval() for net in nets]

    def _check_fits(self, net: ControlNet, k: int) -> None:
        unet, c = self.models.unet, net.control_config
        factor = self.models.vae.downsample_factor
        if c.hint_factor != factor:
            raise ValueError(f"controlnet {k} embeds its hint at 1/{c.hint_factor} of the image size; allowed: 1/"
                             f"{factor}, the autoencoder's downsampling factor (hint_block_channels of "
                             f"{factor.bit_length()} widths)")
        mine, theirs = (unet.config.context_dim, unet.skip_channels), (c.unet.context_dim, net.skip_channels)
        if mine != theirs or c.unet.in_channels != self.models.vae.config.latent_channels:
            raise ValueError(f"controlnet {k} (context_dim, skip channels) = {theirs}, in_channels "
                             f"{c.unet.in_channels}; allowed: the U-Net's {mine} and the latents' "
                             f"{self.models.vae.config.latent_channels} channels")

    def sampling_modules(self) -> list[torch.nn.Module]:
        return [*super().sampling_modules(), *self._nets]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ControlNetPipeline:
        super().to(device, dtype)
        for net in getattr(self, "_nets", []):
            net.to(self.device, self.dtype)
        return self

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ControlImage | list | None = None,
        *,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        height: int | None = None,
        width: int | None = None,
        **options: Any,
    ) -> PipelineOutput:
        """Generate images whose layout follows ``image`` (diffusers' StableDiffusionControlNetPipeline).

        ``image``: the control image(s) of the ControlNet (a PIL image, path, array or tensor in [0, 1], or a
        list of them: one per prompt); with several ControlNets a list with one entry per net. It is resized to
        ``height`` × ``width``, which default to the (first) control image's size rounded down to the
        autoencoder's factor. Per net (one value or a list): ``controlnet_conditioning_scale`` multiplies its
        residuals, which are applied only in the steps i of n with start ≤ i/n and (i+1)/n ≤ end
        (``control_guidance_start`` / ``_end``). ``guess_mode``: the ControlNet sees only the conditional half of
        classifier-free guidance, its residuals scaled from 0.1 (first skip) to 1 (middle). ``options``: the
        arguments of :meth:`TextToImagePipeline.__call__` (negative_prompt, num_inference_steps, sampler, ...)."""
        nets = self._nets
        if not nets:
            raise ValueError("this pipeline has no controlnet; allowed: set pipe.controlnet or pass controlnet= to "
                             "from_pretrained")
        scales, starts, ends = self._per_net(controlnet_conditioning_scale, control_guidance_start,
                                             control_guidance_end)
        if image is None:
            raise ValueError("image=None is not allowed; allowed: a control image (or one per ControlNet)")
        images = [image] if len(nets) == 1 else image
        if len(nets) > 1 and (not isinstance(images, (list, tuple)) or len(images) != len(nets)):
            raise ValueError(f"image must be a list of {len(nets)} control images, one per ControlNet; got "
                             f"{type(image).__name__}{f' of {len(image)}' if isinstance(image, list) else ''}")
        factor = self.models.vae.downsample_factor
        hints = []
        for k, (img, net) in enumerate(zip(images, nets)):
            name = "image" if len(nets) == 1 else f"image[{k}]"
            hints.append(control_image(img, height, width, factor, net.control_config.hint_channels, name))
            height, width = hints[0].shape[2:]
        guess_mode = bool(guess_mode) or nets[0].control_config.global_pool_conditions
        self._control = _ControlCall(hints, scales, starts, ends, guess_mode)
        try:
            return super().__call__(prompt, height=int(height), width=int(width), **options)
        finally:
            self._control = None

    def _per_net(self, scale: float | list[float], start: float | list[float],
                 end: float | list[float]) -> tuple[list[float], list[float], list[float]]:
        """Scale, start and end as one value per ControlNet, checked (0 ≤ start < end ≤ 1)."""
        n = len(self._nets)
        out = []
        for name, value in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                            ("control_guidance_end", end)):
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values; allowed: one, or one per ControlNet ({n})")
            out.append([check_float(name, v, 0.0, None if name.endswith("scale") else 1.0) for v in values])
        for s, e in zip(out[1], out[2]):
            if s >= e:
                raise ValueError(f"control_guidance_start={s} is not below control_guidance_end={e}; allowed: "
                                 "0 <= start < end <= 1")
        return out[0], out[1], out[2]

    def prepare(self, conditioning: Conditioning, n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The U-Net's inputs (see Pipeline.prepare) plus the control: each net's hint (P·n, C, H, W) as
        ``control{k}``, the same in both branches (so guidance duplicates it), and ``is_cond`` (True in the
        conditional branch), which tells guess mode which rows to control."""
        cond, uncond = super().prepare(conditioning, n)
        call = self._control
        if call is None:
            return cond, uncond
        batch = cond["context"].shape[0]
        for k, hint in enumerate(call.hints):
            if hint.shape[0] not in (1, batch // n):
                allowed = "1" if batch == n else f"1 or {batch // n} (one per prompt)"
                raise ValueError(f"image{'' if len(call.hints) == 1 else f'[{k}]'} has {hint.shape[0]} images; "
                                 f"allowed: {allowed}")
            hint = hint.repeat(batch, 1, 1, 1) if hint.shape[0] == 1 else hint.repeat_interleave(n, dim=0)
            cond[f"control{k}"] = uncond[f"control{k}"] = hint.to(self.device, self.dtype)
        cond["is_cond"] = torch.ones(batch, dtype=torch.bool, device=self.device)
        uncond["is_cond"] = torch.zeros(batch, dtype=torch.bool, device=self.device)
        return cond, uncond

    def denoiser(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], conditioning: Conditioning,
                 options: SamplingOptions) -> DenoiserLike:
        """As Pipeline.denoiser; first lays out the sampler's timestep grid, which numbers the steps for
        control_guidance_start / _end."""
        if self._control is not None:
            steps = check_int("num_inference_steps", options.num_inference_steps, 1, self.schedule.num_train_timesteps)
            cfg = self.models.schedule
            self._control.timesteps, _ = sampler_grid(options.sampler, self.schedule, steps, cfg.timestep_spacing,
                                                      cfg.steps_offset, options.sigma_spacing)
        return super().denoiser(cond, uncond, conditioning, options)

    def guided(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float,
               rescale: float = 0.0, interval: tuple[float, float | None] | None = None) -> DenoiserLike:
        """Pipeline.guided with a network that runs the ControlNet(s) and then the U-Net with their residuals."""
        call = self._control
        if call is None:
            return super().guided(cond, uncond, scale, rescale, interval)
        unet, nets = self.models.unet, self._nets

        def net(x: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
            x, context, i = x.to(self.dtype), inputs["context"], call.step(t)
            rows = inputs["is_cond"] if call.guess_mode else None  # guess mode: the conditional rows only
            if rows is not None and bool(rows.all()):
                rows = None
            down = mid = None
            for k, control in enumerate(nets):
                s = call.scale(k, i)
                if s == 0:  # outside its steps: residuals of 0, which change nothing
                    continue
                pick = (lambda v: v) if rows is None else (lambda v: v[rows])
                d, m = control(pick(x), pick(inputs[f"control{k}"]), pick(t), pick(context),
                               conditioning_scale=s, guess_mode=call.guess_mode)
                if rows is not None:  # zero residuals for the unconditional rows, as diffusers
                    d, m = [_scatter(v, rows) for v in d], _scatter(m, rows)
                down = d if down is None else [a + b for a, b in zip(down, d)]
                mid = m if mid is None else mid + m
            if "concat" in inputs:
                x = torch.cat([x, inputs["concat"].to(x.dtype)], dim=1)  # (B, C + C_cond, h, w)
            return unet(x, t, context, down_residuals=down, mid_residual=mid).float()

        prediction_type = self.models.schedule.prediction_type
        if scale == 1.0 and rescale == 0.0:
            return Denoiser(lambda x, t: net(x, t, cond), self.schedule, prediction_type)
        return ClassifierFreeGuidance(Denoiser(net, self.schedule, prediction_type), cond, uncond, scale, rescale,
                                      interval=interval)


def _scatter(values: Tensor, rows: Tensor) -> Tensor:
    """``values`` (b, ...) of the rows where ``rows`` (B,) is True, zeros elsewhere: (B, ...)."""
    out = values.new_zeros((rows.shape[0], *values.shape[1:]))
    out[rows] = values
    return out
