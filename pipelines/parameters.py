"""How an image was made, in the A1111 "parameters" text that PNGs carry and the SD WebUIs read back:

    a red circle in the top left
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 1234, Size: 64x64, Model: demo

Values holding a comma, a quote or a line break are written as JSON strings, as the WebUI does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ldm.diffusion.samplers import a1111_name, canonical_sampler

_PAIR = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclasses.dataclass
class GenerationParameters:
    """``sampler``: ours or an A1111 name, written under its A1111 name ("DPM++ 2M Karras"); ``extra`` holds the
    other ``Key: value`` pairs as text (e.g. "Batch size", "Batch pos", "Guidance interval")."""

    prompt: str
    negative_prompt: str | None
    steps: int
    sampler: str
    guidance_scale: float
    seed: int | None
    width: int
    height: int
    model: str
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_text(self) -> str:
        sampler, spacing = canonical_sampler(self.sampler)
        pairs: dict[str, Any] = {
            "Steps": self.steps, "Sampler": a1111_name(sampler, spacing),
            "CFG scale": f"{self.guidance_scale:g}", "Seed": self.seed, "Size": f"{self.width}x{self.height}",
            "Model": self.model, **self.extra,
        }
        lines = [self.prompt] + ([f"Negative prompt: {self.negative_prompt}"] if self.negative_prompt else [])
        return "\n".join(lines + [", ".join(f"{k}: {_quote(str(v))}" for k, v in pairs.items() if v is not None)])

    @classmethod
    def from_text(cls, text: str, source: str = "parameters") -> GenerationParameters:
        """Parse the text ``to_text`` writes (and the WebUI's); ``ValueError`` naming ``source`` when the
        steps, sampler, scale, seed or size are missing or malformed."""
        lines = text.strip().split("\n")
        pairs = {k: _unquote(v) for k, v in _PAIR.findall(lines[-1])} if len(lines) > 1 or "Steps:" in text else {}
        body = lines[:-1] if pairs else lines
        prompt, negative = [], []
        for line in body:
            (negative if negative or line.startswith("Negative prompt:") else prompt).append(line)
        negative_text = "\n".join(negative)[len("Negative prompt:"):].strip() if negative else None
        try:
            width, height = (int(v) for v in pairs.pop("Size").split("x"))
            sampler = pairs.pop("Sampler")
            if pairs.get("Schedule type", "").lower() == "karras" and not sampler.lower().endswith("karras"):
                sampler = f"{sampler} Karras"  # the WebUI's newer form: the σ spacing in its own field
            return cls("\n".join(prompt), negative_text or None, int(pairs.pop("Steps")), sampler,
                       float(pairs.pop("CFG scale")), int(pairs.pop("Seed")), width, height,
                       pairs.pop("Model", ""), pairs)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{source}: not generation parameters this toolkit wrote or can redo (needs Steps, "
                             f"Sampler, CFG scale, Seed and Size; {type(err).__name__}: {err})") from None


def _quote(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',"\n') else value


def _unquote(value: str) -> str:
    value = value.strip()
    return json.loads(value) if value.startswith('"') else value

