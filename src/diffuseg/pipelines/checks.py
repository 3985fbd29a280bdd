"""Input checks shared by the text-to-image pipelines: wrong values fail at once with a clear
message, before any model runs, instead of producing empty masks or a late traceback."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def attention_heights(unet, latent_height: int) -> list[int]:
    """Heights of the UNet's cross-attention maps for latents ``latent_height`` high, coarsest last.

    Down block ``k`` works at ``ceil(h / 2**k)`` (stride-2 convolutions round up); the middle
    block at the coarsest level.
    """
    block_types = list(unet.config.down_block_types)
    heights = {math.ceil(latent_height / 2**k) for k, kind in enumerate(block_types) if "CrossAttn" in kind}
    if "CrossAttn" in str(getattr(unet.config, "mid_block_type", "") or ""):
        heights.add(math.ceil(latent_height / 2 ** (len(block_types) - 1)))
    return sorted(heights, reverse=True)


def default_size(pipe, height: int | None, width: int | None) -> tuple[int, int]:
    """``(height, width)``, each ``None`` replaced by the model's native side (and only ``None``:
    a 0 stays 0, for :func:`check_sampling_inputs` to refuse, rather than silently meaning the default)."""
    unet = getattr(pipe, "unet", None)
    native = (unet.config.sample_size if unet is not None else pipe.default_sample_size) * pipe.vae_scale_factor
    return (native if height is None else height, native if width is None else width)


def check_sampling_inputs(
    pipe,
    height: int,
    width: int,
    num_inference_steps: int | None,
    guidance_scale: float,
    resolutions: Sequence[int] | None = None,
) -> None:
    """Raise ``ValueError`` naming the argument when a sampling input cannot give a sensible result.

    Args:
        pipe: the pipeline (its UNet and VAE scale factor define valid sizes and resolutions).
        height, width: image size in pixels: positive multiples of 8 (and of the VAE scale factor).
        num_inference_steps: at least 1 (0 divides by zero in the schedulers); ``None`` with custom
            ``timesteps`` / ``sigmas``.
        guidance_scale: classifier-free guidance, 0 or more (at most 1 switches guidance off);
            a negative scale steers the image away from its prompt.
        resolutions: attention-map heights to record; each must exist at this image size.
    """
    factor = pipe.vae_scale_factor
    multiple = math.lcm(8, factor)  # diffusers' Stable Diffusion pipelines need multiples of 8 whatever the VAE
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < multiple or value % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple} pixels, got {name}={value!r}")
    # None: the schedule comes from custom ``timesteps`` / ``sigmas``, which diffusers checks.
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, numbers.Integral)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be 0 or more (1 or less: no guidance), got {guidance_scale!r}")
    if resolutions is not None and getattr(pipe, "unet", None) is not None:  # an MM-DiT has one grid
        available = sorted(attention_heights(pipe.unet, height // factor))
        unknown = sorted({int(r) for r in resolutions} - set(available))
        if not resolutions or unknown:
            raise ValueError(
                f"resolutions {unknown or list(resolutions)} are not cross-attention map heights of this model at "
                f"{height}x{width}; it has {available}: pass some of those, or None for all"
            )
