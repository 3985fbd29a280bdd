"""The pipelines registry: name -> (load the model, make samples from requests).

New pipelines plug in with :func:`register_pipeline` without touching the loop. The registry
depends on the samplers, never the other way round, and no pipeline module imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffuseg.generation import samplers


@dataclass(frozen=True)
class PipelineSpec:
    """How ``diffuseg generate --pipeline NAME`` makes samples.

    Attributes:
        name: the ``--pipeline`` value, also written in the ``pipeline`` column.
        load: ``load(config, device, dtype) -> pipe``.
        generate: ``generate(pipe, requests, config) -> samples``: one dict per request with
            ``image`` (uint8 HxWx3 or PIL), ``label`` (uint8 HxW in *dataset* ids: remap the
            pipeline's 1..k to ``request.class_ids``, keep 0 and 255) and every extra image
            column.
        extra_image_columns: further image columns (``negative_image`` for counterfactuals).
        scalar_columns: further per-sample columns ``generate`` returns (ints or strings), written
            with each row and kept in the skip records of rejected samples (Free-Mask's insertion
            counts, which the dataset card sums up).
    """

    name: str
    load: Callable[..., Any]
    generate: Callable[..., list[dict]]
    extra_image_columns: tuple[str, ...] = ()
    scalar_columns: tuple[str, ...] = ()


PIPELINES: dict[str, PipelineSpec] = {
    spec.name: spec
    for spec in (
        PipelineSpec("diffumask", samplers.load_diffumask, samplers.generate_diffumask),
        PipelineSpec("freemask", samplers.load_freemask, samplers.generate_freemask,
                     scalar_columns=samplers.FREEMASK_COLUMNS),
        PipelineSpec("counterfactual", samplers.load_counterfactual, samplers.generate_counterfactual,
                     extra_image_columns=("negative_image",)),
    )
}


def register_pipeline(spec: PipelineSpec) -> PipelineSpec:
    """Make ``spec`` available to :func:`~diffuseg.generation.generate_dataset` and ``--pipeline``."""
    PIPELINES[spec.name] = spec
    return spec


def get_pipeline(name: str) -> PipelineSpec:
    """The registered pipeline ``name``.

    Raises:
        ValueError: no pipeline has this name (the message lists those that do).
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINES))}")
    return PIPELINES[name]
