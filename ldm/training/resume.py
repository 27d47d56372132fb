"""A resumed run continues the run it resumes: its config may differ from the saved ``config.yaml`` only in
settings that do not change what the steps compute (where and how often it writes, how far it goes), unless
the user names the change (``--allow-config-change KEY``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldm.config import ConfigError, config_to_dict, flatten, load_yaml
from ldm.training.checkpoints import latest_checkpoint
from ldm.training.config import TrainConfig

# settings a resume may change freely: bookkeeping, and how far the run goes
FREE = ("output_dir", "optim.max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
        "eval_count", "eval_seed", "sample_prompts", "sample_steps", "tracker", "param_checksums")


def check_resume_config(config: TrainConfig, allowed: Sequence[str] = ()) -> None:
    """Raise ``ConfigError`` naming each changed key (saved → now) when ``config`` would resume a run whose
    saved config differs in a setting outside ``FREE`` and ``allowed`` (keys or their parents)."""
    root = Path(config.output_dir)
    if latest_checkpoint(root) is None or not (root / "config.yaml").is_file():
        return  # nothing to resume
    saved, now = flatten(load_yaml(root / "config.yaml")), flatten(config_to_dict(config))
    exempt = tuple(FREE) + tuple(allowed)
    changed = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)
               and not any(key == name or key.startswith(name + ".") for name in exempt)]
    if changed:
        shown = "; ".join(f"{key}: {saved.get(key)!r} → {now.get(key)!r}" for key in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"{root}: resuming with a config that differs from its config.yaml at {shown}{more}; "
                          f"allowed: the saved values, or --allow-config-change {changed[0]} (repeatable)")
