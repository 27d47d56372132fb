"""Nearest-neighbour ×2 upsampling followed by a 3×3 convolution, computed at the low resolution.

Both the SD U-Net (``ldm.modules.resnet.Upsample``) and the autoencoder's decoder
(``autoencoder.model.Upsample``) compute ``conv3x3(nearest_up2(x))`` with padding 1. Every
output pixel ``(2i+a, 2j+b)`` of that composition sees only the 2×2 low-resolution
neighbourhood rows ``{i-1, i}`` (phase ``a = 0``) or ``{i, i+1}`` (``a = 1``), and likewise for
columns, because the upsampled image repeats each input pixel twice. Summing the 3×3 kernel rows
that land on the same input row gives, for rows,

    phase 0:  row i-1 ← w[0],          row i   ← w[1] + w[2]
    phase 1:  row i   ← w[0] + w[1],   row i+1 ← w[2]

and the same for columns. So with ``xp`` the input zero-padded by one on every side,

    out[:, :, 2i+a, 2j+b] = conv2d(xp[:, :, a:a+H+1, b:b+W+1], W_ab, bias)[:, :, i, j]

an identity in exact arithmetic: four 2×2 convolutions at the input resolution (16 taps per
low-resolution pixel instead of 36) replace the 3×3 convolution at twice the resolution, and the
upsampled tensor is never materialised. In floating point only the rounding of the summed weights
and the accumulation order differ (about 1e-6 relative in float32).

The fast path runs on CPU tensors without autograd (``torch.is_grad_enabled()`` false: sampling
and evaluation); training keeps the plain path, so gradients are exactly those of the original
layers. :func:`set_subpixel_upsample` switches it off, e.g. to measure the difference.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SUBPIXEL_UPSAMPLE = True  # read at every call; see set_subpixel_upsample
_CACHE_ATTR = "_subpixel_phase_weights"  # a plain attribute of the conv: not a parameter or buffer
_PROBE_SIZE = 1024  # weight values compared on every call, to see changes the version counter misses


def set_subpixel_upsample(enabled: bool) -> bool:
    """Switch the low-resolution path of :func:`nearest_up2_conv3` on or off; returns the old setting."""
    global SUBPIXEL_UPSAMPLE
    previous, SUBPIXEL_UPSAMPLE = SUBPIXEL_UPSAMPLE, bool(enabled)
    logger.debug("subpixel upsample %s", "on" if SUBPIXEL_UPSAMPLE else "off")
    return previous


def _plain(x: Tensor, conv: nn.Conv2d) -> Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _fast_path_applies(x: Tensor, conv: nn.Conv2d) -> bool:
    """The identity holds for a plain 3×3, stride-1, padding-1 convolution of a 4-D input; the
    path is taken only on CPU, without autograd or autocast, with no forward hooks or subclassed forward."""
    return (
        SUBPIXEL_UPSAMPLE
        and not torch.is_grad_enabled()
        and type(conv) is nn.Conv2d  # a subclass (e.g. a LoRA-wrapped conv) may change the forward
        and x.ndim == 4
        and x.numel() > 0
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")  # autocast would cast the phase convs, not the result
        and conv.weight.device == x.device
        and conv.weight.dtype == x.dtype
        and x.dtype.is_floating_point
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
        and x.shape[1] == conv.in_channels
    )


def _phase_weights(weight: Tensor) -> tuple[Tensor, ...]:
    """(C_out, C_in, 3, 3) → four (C_out, C_in, 2, 2) kernels, of phases (0,0), (0,1), (1,0), (1,1).
    Summed in at least float32 and cast back, in the weight's memory format."""
    w = weight.detach()
    w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),  # phase 0: rows i-1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))  # phase 1: rows i, i+1
    phases = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if b == 0  # cols j-1, j
              else torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1)  # cols j, j+1
              for r in rows for b in (0, 1)]
    fmt = torch.channels_last if _is_channels_last(weight) else torch.contiguous_format
    return tuple(p.to(weight.dtype).contiguous(memory_format=fmt) for p in phases)


def _probe(weight: Tensor) -> Tensor:
    """A copy of about ``_PROBE_SIZE`` weight values spread evenly over its storage (any order will do)."""
    w = weight.detach()
    step = max(1, w.numel() // _PROBE_SIZE)
    if w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last):  # dense: read the storage
        return torch.as_strided(w, (w.numel() // step,), (step,), w.storage_offset()).clone()
    return w.flatten()[::step].clone()


def _cached_phase_weights(conv: nn.Conv2d) -> tuple[Tensor, ...]:
    """The phase kernels of ``conv.weight``, recomputed when the weight changes.

    The key is the weight's data pointer, version counter (bumped by every in-place change made
    through the parameter, e.g. ``load_state_dict``, a foreach or for-loop optimizer step or
    ``p.add_`` under ``no_grad``), dtype, device and shape. The cache holds a reference to the
    weight's storage, so that after ``p.data = other`` a later tensor cannot reuse the address and
    look unchanged. Changes that bypass the version counter (in place through ``p.data``, a
    ``fused=True`` optimizer step) are caught by comparing ~1k values spread over the weight; one
    confined to a few values may not be: call :func:`clear_phase_weights` after such a change.
    """
    weight = conv.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
    cached = conv.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key and torch.equal(_probe(weight), cached[2]):
        return cached[3]
    with torch.no_grad():
        phases = _phase_weights(weight)
        probe = _probe(weight)
    conv.__dict__[_CACHE_ATTR] = (key, weight.detach(), probe, phases)  # bypasses nn.Module.__setattr__
    return phases


def clear_phase_weights(module: nn.Module) -> None:
    """Drop the cached phase kernels of every conv in ``module`` (after changing a few weight values
    through ``.data``, which the cache may not see, or to free their memory)."""
    for m in module.modules():
        m.__dict__.pop(_CACHE_ATTR, None)


def _is_channels_last(t: Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def nearest_up2_conv3(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3×3, padding-1 ``conv``.

    Uses the identity of the module docstring: for each output phase ``(a, b)`` in {0, 1}²,
    ``out[:, :, 2i+a, 2j+b] = conv2d(pad(x, 1)[:, :, a:a+H+1, b:b+W+1], W_ab, bias)``, written
    into a preallocated (B, C, H, 2, W, 2) view of the (B, C, 2H, 2W) result (channels-last when
    ``x`` or the weight is). Falls back to the plain composition when grad is enabled, the switch
    is off, the tensors are not on the CPU or the conv is of another shape.
    """
    if not _fast_path_applies(x, conv):
        return _plain(x, conv)
    phases = _cached_phase_weights(conv)
    b, _, h, w = x.shape
    channels_last = _is_channels_last(x) or _is_channels_last(conv.weight)
    out = torch.empty(
        (b, conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    interleaved = out.view(b, conv.out_channels, h, 2, w, 2)  # out[:, :, 2i+a, 2j+c] = interleaved[:, :, i, a, j, c]
    xp = F.pad(x, (1, 1, 1, 1))
    for a in (0, 1):
        for c in (0, 1):
            interleaved[:, :, :, a, :, c] = F.conv2d(xp[:, :, a:a + h + 1, c:c + w + 1], phases[2 * a + c], conv.bias)
    return out
