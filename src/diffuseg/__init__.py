"""diffuseg: segmentation data and training-free segmentation from text-to-image diffusion models.

>>> import diffuseg
>>> with diffuseg.capture(pipe, words=["dog"]) as maps:   # SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 pipeline
...     pipe("a photo of a dog on the grass")
>>> maps["dog"].shape                                      # (images, H, W)
"""

from diffuseg.attention import AttentionMaps, AttentionStore, attention_control, capture
from diffuseg.models import DEFAULT_MODEL, load_default_model, load_pipeline, resolve_model

__version__ = "0.1.0"

__all__ = [
    "AttentionMaps",
    "AttentionStore",
    "DEFAULT_MODEL",
    "attention_control",
    "capture",
    "load_default_model",
    "load_pipeline",
    "resolve_model",
]
