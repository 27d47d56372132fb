"""What ``ldm eval`` writes: the JSON report, the adherence plot and sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.io.files import write_text_atomic
from pipelines.images import make_grid


def write_json(report: dict[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


def plot_adherence(report: dict[str, Any], path: Path) -> None:
    """Adherence against guidance scale (one-object attributes and whole prompts, two-object relations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = report["by_guidance"]
    scales = [float(s) for s in by]
    curves = {"one object: attributes": [by[s]["one_object"].get("attributes", np.nan) for s in by],
              "one object: whole prompt": [by[s]["one_object"].get("whole", np.nan) for s in by],
              "two objects: relation": [by[s]["two_object"].get("relation", np.nan) for s in by]}
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for label, values in curves.items():
        ax.plot(scales, values, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xticks(scales, [f"{s:g}" for s in scales])
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("accuracy (detector)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Prompt adherence, {report['prompts']} held-out prompts")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(rows: list[list[np.ndarray]], scale: int = 2) -> Image.Image:
    """uint8 images (S, S, 3), one list per row, enlarged ``scale``× (nearest) into one PIL grid."""
    flat = [Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST)
            for row in rows for im in row]
    return make_grid(flat, columns=len(rows[0]))


def to_uint8(images: Any) -> list[np.ndarray]:
    """(B, 3, H, W) tensors in [0, 1] → uint8 arrays (H, W, 3)."""
    return [np.round(im.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for im in images]


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Adherence against training samples seen, one line per run (``curve.jsonl`` records of ``eval_every``):
    one-object attributes, position and whole prompt, two-object relation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {"one object: attributes": ("one_object", "attributes"),
               "one object: position": ("one_object", "position"), "one object: whole prompt": ("one_object", "whole"),
               "two objects: relation": ("two_object", "relation")}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), dpi=110, sharey=True)
    for ax, (title, (part, key)) in zip(axes, metrics.items()):
        for name, records in curves.items():
            ax.plot([r["samples"] / 1000 for r in records], [r[part].get(key, np.nan) for r in records], marker=".",
                    label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training samples (thousands)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (detector, guidance 7.5)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
