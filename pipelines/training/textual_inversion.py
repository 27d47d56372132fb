"""``ldm train-ti``: textual inversion (Gal et al. 2022, eq. 2: v* = argmin_v E ‖ε − ε_θ(z_t, t, c_θ(y; v))‖²).

A new token (``ti.token``) of ``ti.num_vectors`` vectors is added to the tokenizer and spliced into the text
encoder's token embedding as the only trainable rows (``TextEncoder.splice_token_embeddings``); the U-Net, the
autoencoder and the rest of the text encoder stay frozen. The vectors start from the embedding of
``ti.init_word``. Captions are the dataset's (each must hold the token) or, with ``ti.templates``, a template per
image drawn from the step's generator, with ``{}`` replaced by the token.

The run saves only the embedding: ``model/learned_embeds.safetensors`` in diffusers' layout (``{token: (D,)}``,
or ``(n, D)`` for n vectors), which diffusers' ``load_textual_inversion`` and ours load, beside
``model/textual_inversion.json`` (the settings and the base model's path, for resuming). Checkpoints hold the same.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ldm.config import ConfigError, config_from_dict
from ldm.io import CheckpointError, save_state_dict
from ldm.io.embeddings import read_textual_inversion
from ldm.training.config import TrainConfig
from ldm.training.ema import EMA
from ldm.training.loop import unwrap
from pipelines.models import Models
from pipelines.training.diffusion import DiffusionTask
from pipelines.training.settings import base_model_name, write_settings
from pipelines.training.settings import read_settings as read_settings_file

logger = logging.getLogger(__name__)

WEIGHTS, SETTINGS, FORMAT = "learned_embeds.safetensors", "textual_inversion.json", "ldm-textual-inversion"
DEFAULTS = {"objective.cond_dropout": 0.0}  # train-ti's own defaults (the file or --set may still change them)


@dataclasses.dataclass
class TextualInversionSettings:
    """The ``ti:`` section of a train-ti config."""

    token: str = ""  # the placeholder text, e.g. "<my-thing>"; not a word of the vocabulary
    init_word: str = ""  # the vectors start from this word's embedding (one BPE token, or num_vectors tokens)
    num_vectors: int = 1
    templates: tuple[str, ...] = ()  # e.g. ["a photo of {}"]; empty: the dataset's captions, which hold the token

    def __post_init__(self) -> None:
        if not self.token or self.token != self.token.strip() or " " in self.token:
            raise ValueError(f"token={self.token!r} is not allowed; allowed: a non-empty text without spaces, "
                             "e.g. '<my-thing>'")
        if not self.init_word.strip():
            raise ValueError(f"init_word={self.init_word!r} is not allowed; allowed: a word, e.g. 'square'")
        n = self.num_vectors
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 75:  # 75 slots between <start> and <end>
            raise ValueError(f"num_vectors={self.num_vectors!r} is out of range; allowed: an integer in 1..75")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates entry {bad[0]!r} is not allowed; allowed: texts with one '{{}}' "
                             "where the token goes, e.g. 'a photo of {}'")


def check_textual_inversion(config: TrainConfig, source: str) -> TextualInversionSettings:
    """Validate a train-ti config before anything is built."""
    if not config.model.init_from:
        raise ConfigError(f"{source}: train-ti needs model.init_from: our folder, a diffusers folder or an SD file")
    if config.ti is None:
        raise ConfigError(f"{source}: train-ti needs a ti: section, e.g. ti: {{token: '<my-thing>', "
                          "init_word: square}")
    if config.model.train_text_encoder or config.model.train_vae:
        raise ConfigError(f"{source}: train-ti trains the new token's vectors only; allowed: "
                          "model.train_text_encoder: false and model.train_vae: false")
    return config_from_dict(TextualInversionSettings, config.ti, source, "ti.")


def check_captions(dataset: Any, settings: TextualInversionSettings) -> None:
    """Without templates, every caption of an image folder must hold the token (checked before training)."""
    if settings.templates or not hasattr(dataset, "items"):
        return
    for path, caption in dataset.items:
        if settings.token not in caption:
            raise ValueError(f"{path}: caption {caption!r} does not contain ti.token {settings.token!r}; allowed: "
                             "captions that hold the token, or ti.templates such as ['a photo of {}']")


def initial_vectors(models: Models, settings: TextualInversionSettings) -> Tensor:
    """(n, D): the embedding rows of ``init_word``: its one token repeated n times, or its n tokens."""
    ids = models.tokenizer.encode(settings.init_word)
    n = settings.num_vectors
    if len(ids) not in (1, n):
        raise ConfigError(f"ti.init_word={settings.init_word!r} is {len(ids)} tokens; allowed: a word of one token "
                          f"(or of num_vectors={n} tokens)")
    weight = models.text_encoder.token_embedding_layer.weight.detach()
    return weight[ids * n if len(ids) == 1 else ids].clone()


class TextualInversionTask(DiffusionTask):
    """Trains the spliced rows of one new token; everything else of ``models`` is frozen."""

    def __init__(self, config: TrainConfig, models: Models, settings: TextualInversionSettings,
                 base_model: str | None) -> None:
        if models.text_encoder is None or models.tokenizer is None:
            raise ConfigError(f"model.init_from={config.model.init_from!r} has no text encoder; train-ti needs one")
        super().__init__(config, models)  # model.train_text_encoder is false: the encoder is frozen
        self.settings, self.base_model = settings, base_model
        models.unet.requires_grad_(False)
        self.contexts = None  # the contexts change with the vectors: computed at each step
        ids = models.text_encoder.splice_token_embeddings(initial_vectors(models, settings))
        models.tokenizer.add_token(settings.token, ids)
        logger.info("textual inversion: %d vector(s) of width %d for %r, from %r", len(ids),
                    models.text_encoder.config.width, settings.token, settings.init_word)
        if config.ema.enabled:
            logger.info("EMA is not kept for textual-inversion embeddings")

    @property
    def vectors(self) -> nn.Parameter:
        """The trained rows (n, D)."""
        return unwrap(self.models.text_encoder).token_embedding_layer.added

    def groups(self) -> list[list[nn.Module]]:
        # The text encoder whose only trainable parameter is the spliced rows (as LoraTask's U-Net).
        return [[self.models.text_encoder]]

    def lr_scale(self, module: nn.Module) -> float:
        return 1.0  # the vectors train at optim.lr (optim.text_encoder_lr_scale is for whole encoders)

    def prepare(self, accelerator: Accelerator) -> None:
        m, self.device = self.models, accelerator.device
        m.text_encoder = accelerator.prepare(m.text_encoder)  # several processes: DDP averages the rows' gradients
        m.unet.to(self.device)
        m.vae.to(self.device)

    def loss(self, index: int, batch: dict[str, Any], generator: torch.Generator, step: int) -> Tensor:
        if self.settings.templates:  # one template per image, drawn from the step's generator
            picks = torch.randint(len(self.settings.templates), (len(batch["image"]),), generator=generator)
            batch = {**batch, "caption": [self.settings.templates[i].format(self.settings.token)
                                          for i in picks.tolist()]}
        return super().loss(index, batch, generator, step)

    def ema_target(self) -> None:
        return None

    def write_model(self, path: Path, ema: EMA | None) -> None:
        save_embedding(self.vectors.detach().float().cpu(), Path(path), self.settings, self.base_model)

    def load_model(self, path: Path) -> None:
        settings, _ = read_settings(path)
        if settings != self.settings:
            raise CheckpointError(f"{path}: the embedding was trained with {settings}; this run uses {self.settings}")
        loaded = read_textual_inversion(Path(path) / WEIGHTS, width=self.vectors.shape[1])
        if loaded.token != self.settings.token or loaded.vectors.shape != self.vectors.shape:
            raise CheckpointError(f"{path}: embedding {loaded.token!r} {tuple(loaded.vectors.shape)}; this run "
                                  f"trains {self.settings.token!r} {tuple(self.vectors.shape)}")
        with torch.no_grad():
            self.vectors.copy_(loaded.vectors)


def save_embedding(vectors: Tensor, folder: Path, settings: TextualInversionSettings, base_model: str | None) -> None:
    """``learned_embeds.safetensors`` (diffusers' layout: ``{token: (D,)}`` for one vector, else ``(n, D)``) and
    ``textual_inversion.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict({settings.token: vectors[0] if len(vectors) == 1 else vectors}, folder / WEIGHTS)
    write_settings(folder / SETTINGS, FORMAT, "ti", settings, base_model)


def read_settings(folder: str | Path) -> tuple[TextualInversionSettings, str | None]:
    """The settings and the base model path of a folder ``ldm train-ti`` wrote."""
    return read_settings_file(Path(folder) / SETTINGS, FORMAT, "ti", TextualInversionSettings,
                              "not a textual-inversion folder (ldm train-ti writes one)")


def textual_inversion_task(config: TrainConfig, models: Models, source: str) -> TextualInversionTask:
    settings = check_textual_inversion(config, source)
    return TextualInversionTask(config, models, settings, base_model_name(config.model.init_from))


__all__ = ["TextualInversionSettings", "TextualInversionTask", "check_captions", "check_textual_inversion",
           "read_settings", "save_embedding", "textual_inversion_task"]
