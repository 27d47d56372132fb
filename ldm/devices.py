"""Which torch device to run on: ``auto`` picks the first available of cuda, mps, xpu, cpu."""

from __future__ import annotations

import torch

AUTO = "auto"


def available_devices() -> list[str]:
    """The device types usable here, best first; ``cpu`` is always last."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found.append("xpu")
    return [*found, "cpu"]


def default_device() -> str:
    """What ``auto`` means here: the first of cuda, mps, xpu that is available, else cpu."""
    return available_devices()[0]


def has_accelerator() -> bool:
    """Whether any device besides the CPU is available."""
    return default_device() != "cpu"


def resolve_device(device: str | torch.device | None, param: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; None or ``auto`` is :func:`default_device`.

    A device that is not available here (``cuda`` without a GPU, an index past the last GPU, a name torch does
    not know) raises ``ValueError`` naming ``param`` and the available devices."""
    if device is None or str(device) == AUTO:
        return torch.device(default_device())
    available = available_devices()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in available or not _index_exists(resolved):
        raise ValueError(f"{param}={device} is not available here; allowed: {', '.join([AUTO, *available])}")
    return resolved


def _index_exists(device: torch.device) -> bool:
    if device.index is None or device.type == "cpu":
        return device.index in (None, 0)
    module = getattr(torch, device.type, None)
    count = module.device_count() if module is not None and hasattr(module, "device_count") else 1
    return device.index < count
