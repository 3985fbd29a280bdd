"""What every denoiser backend shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place: no second buffer of the probabilities' size."""
    scores -= scores.amax(dim=-1, keepdim=True)
    scores.exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


# Explicit probabilities of one query-row slice may always hold this many elements per image
# (1 MiB in float32), however small the layer's activations: each slice costs a dozen op
# dispatches, which dominate a layer of a few hundred positions.
MIN_SLICE_ELEMENTS = 2**18


def slice_rows(activations: int, batch: int, per_image_row: int) -> int:
    """Query rows per slice of explicit probabilities.

    No more elements than the layer's ``activations`` (so probabilities never dominate peak
    memory), or :data:`MIN_SLICE_ELEMENTS` per image where that is more; ``per_image_row``
    elements per query row of one image (heads × keys). The count does not depend on ``batch``,
    so an image's maps are the same bits in any batch.
    """
    return max(1, max(activations // batch, MIN_SLICE_ELEMENTS) // per_image_row)


@contextmanager
def processors_swapped(
    denoiser: torch.nn.Module, layers: Sequence, processor_for: Callable, on_call: Callable
) -> Iterator[None]:
    """Inside the ``with`` block, ``layers`` run ``processor_for(original)`` and ``on_call(module, args,
    kwargs)`` runs before every call of ``denoiser``; the original processors come back after it, also
    after an error."""
    originals = [layer.processor for layer in layers]
    for layer, original in zip(layers, originals):
        layer.set_processor(processor_for(original))
    handle = denoiser.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, original in zip(layers, originals):
            layer.set_processor(original)
