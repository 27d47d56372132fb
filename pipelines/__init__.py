"""Pipelines users call with prompts; they assemble ldm's networks and the autoencoder."""

from pipelines.models import Models, load_models

__all__ = ["Models", "load_models"]
