"""The training tasks of a whole model bundle (``pipelines.Models``): latent diffusion, the noise-aware classifier
and fine-tuning (full or LoRA). The loop they run in is the core's (``ldm.training.loop``)."""
