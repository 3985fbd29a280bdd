"""diffuseg: segmentation data and training-free segmentation from text-to-image diffusion models.

>>> import diffuseg
>>> with diffuseg.capture(pipe, words=["dog"]) as maps:   # SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1 pipeline
...     pipe("a photo of a dog on the grass")
>>> maps["dog"].shape                                      # (images, H, W)

The names below are imported on first use, so ``import diffuseg`` (and ``diffuseg --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from diffuseg.quiet import quiet_third_party

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "AttentionMaps": "diffuseg.attention",
    "AttentionStore": "diffuseg.attention",
    "attention_control": "diffuseg.attention",
    "capture": "diffuseg.attention",
    "DEFAULT_MODEL": "diffuseg.models",
    "community_pipeline": "diffuseg.models",
    "load_default_model": "diffuseg.models",
    "load_pipeline": "diffuseg.models",
    "model_defaults": "diffuseg.models",
    "resolve_model": "diffuseg.models",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from diffuseg.attention import AttentionMaps, AttentionStore, attention_control, capture
    from diffuseg.models import (
        DEFAULT_MODEL,
        community_pipeline,
        load_default_model,
        load_pipeline,
        model_defaults,
        resolve_model,
    )

quiet_third_party()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffuseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
