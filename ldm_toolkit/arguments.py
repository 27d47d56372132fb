"""Command-line options shared by several ``ldm`` commands, and checks made before any model is loaded."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def interval(text: str) -> tuple[float, float | None]:
    """``LOW,HIGH`` (HIGH may be inf or empty) as (low, high or None)."""
    low, sep, high = text.partition(",")
    try:
        bounds = float(low), (None if high.strip() in ("", "inf") else float(high))
    except ValueError:
        bounds = None
    if not sep or bounds is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (numbers; HIGH may be inf)")
    return bounds


def add_sampler_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="dpmpp_2m",
                   help="a name `ldm samplers` lists, ours or the WebUI's, e.g. dpmpp_2m, euler_a, "
                   "\"DPM++ 2M Karras\" (default: %(default)s)")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device: auto (the first available of cuda, mps, xpu, "
                   "cpu), cpu, cuda, cuda:1, mps or xpu (default: %(default)s)")


def add_sampling_options(p: argparse.ArgumentParser, model: str, guidance: float) -> None:
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write; with -n N also OUT-1.png … OUT-N.png beside the grid (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help=f"demo name, our folder, diffusers folder or SD file (default: {model})")
    p.set_defaults(default_model=model)
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=guidance,
                   help="classifier-free guidance scale (default: %(default)s)")
    add_sampler_option(p)
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the initial noise; -1 or none: a random one, printed and stored in the PNG")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="allow up to N output pixels (images x height x width) in one call; default: the "
                   "pipeline's bound (4 MP; upscale 0.26 MP), so that a large input does not exhaust memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: the first image of a size pays a warm-up (logged; minutes on a CPU, "
                   "less from the second process on, which reuses PyTorch's cache), later ones run compiled")
    p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                   help="approximate, faster: after 7 full model calls, the U-Net in full every N calls and only "
                   "its outer blocks in between (DeepCache; 6 on the demo: 2.2x faster, quality cost in "
                   "docs/performance.md) (default: off)")
    add_device_option(p)


def check_writable_folder(folder: Path, what: str) -> None:
    """A file can be created in ``folder`` (tried, not guessed from permission bits: /proc or a read-only mount
    pass os.access)."""
    folder = folder if str(folder) else Path(".")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{what}: the folder {str(folder)!r} does not exist or is not writable "
                         f"({err.strerror or err})") from None


def check_png_output(output: str) -> None:
    out = Path(output)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"-o/--output={output!r} is not allowed; allowed: a .png file path (not a folder)")
    check_writable_folder(out.parent, f"-o/--output={output!r}")
