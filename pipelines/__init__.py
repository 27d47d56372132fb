"""Pipelines users call with prompts; they assemble ldm's networks and the autoencoder."""

from pipelines.base import PipelineOutput
from pipelines.models import Models, load_models
from pipelines.text_to_image import TextToImagePipeline

__all__ = ["Models", "PipelineOutput", "TextToImagePipeline", "load_models"]
