"""Family backends: how each kind of denoiser is driven and how its attention is read.

A backend is a module with four functions; the methods (DiffuMask, ...) never look inside:

* ``control(denoiser, controller, blocks)``: a context manager that installs the controller
  on the layers recorded and restores every processor on exit, also after an error;
* ``text_segments(pipe, prompts, arguments)``: the tokenizers' stretches that make up the
  denoiser's text sequence (see :class:`diffuseg.tokens.TextSegment`);
* ``pixels_per_position(pipe)``: image pixels per map position along a side.

:mod:`diffuseg.backends.unet` serves UNets (SD 1.x, 2.x, SDXL), :mod:`diffuseg.backends.mmdit`
serves MM-DiTs (SD3/3.5, FLUX.1).
"""

from __future__ import annotations

from types import ModuleType

import torch


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: its ``unet`` or its ``transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise TypeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`: no attention to read")


def backend_for(denoiser: torch.nn.Module) -> ModuleType:
    """The backend module that serves ``denoiser``."""
    from diffuseg.backends import mmdit, unet

    if hasattr(denoiser, "transformer_blocks") and hasattr(denoiser.config, "joint_attention_dim"):
        return mmdit
    if type(denoiser).__name__.endswith("Transformer2DModel"):
        raise TypeError(
            f"{type(denoiser).__name__} is not a supported denoiser; diffuseg reads UNets (SD 1.x, 2.x, SDXL) "
            "and MM-DiTs (SD3/3.5, FLUX.1)"
        )
    return unet
