"""Pipelines users call with prompts; they assemble ldm's networks and the autoencoder."""

from pipelines.base import PipelineOutput
from pipelines.classifier_guided import ClassifierGuidedPipeline
from pipelines.controlnet import ControlNetPipeline
from pipelines.image_to_image import ImageToImagePipeline
from pipelines.inpaint import InpaintPipeline
from pipelines.models import Models, load_models
from pipelines.options import Conditioning, SamplingOptions
from pipelines.semantic_to_image import SemanticToImagePipeline
from pipelines.super_resolution import SuperResolutionPipeline
from pipelines.text_to_image import TextToImagePipeline

__all__ = [
    "ClassifierGuidedPipeline",
    "Conditioning",
    "ControlNetPipeline",
    "ImageToImagePipeline",
    "InpaintPipeline",
    "Models",
    "PipelineOutput",
    "SamplingOptions",
    "SemanticToImagePipeline",
    "SuperResolutionPipeline",
    "TextToImagePipeline",
    "load_models",
]
