"""How each registered pipeline makes dataset samples: load ``config.model`` as the pipeline, and
turn a batch of :class:`~diffuseg.generation.plan.SampleRequest` into images and labels.

The pipelines themselves know nothing of datasets; this module is the only place where the
generation settings meet their arguments. Pipelines are imported when a sampler runs, so that
``diffuseg --help`` and the registry stay free of torch and diffusers imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffuseg.data import IGNORE_INDEX

if TYPE_CHECKING:
    from diffuseg.generation.config import GenerationConfig
    from diffuseg.generation.plan import SampleRequest


def remap_label(mask: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """A pipeline mask (0, 1..k, 255) in dataset ids: value ``k`` becomes ``class_ids[k - 1]``."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[1 : len(class_ids) + 1] = np.asarray(class_ids, dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[np.asarray(mask, dtype=np.uint8)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _load(method: str, config: GenerationConfig, device, dtype):
    """``config.model`` as the pipeline that runs ``method`` on its family (SD, SDXL, SD3, FLUX), safetensors only."""
    from diffuseg.families import pipeline_class_for
    from diffuseg.models import load_pipeline

    pipe = load_pipeline(pipeline_class_for(method, config.model), config.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- DiffuMask: text to image, masks from cross-attention -----------------------------


def load_diffumask(config: GenerationConfig, device, dtype):
    """``config.model`` as a :class:`~diffuseg.pipelines.DiffuMaskPipeline` (or its family's variant), safetensors only."""
    return _load("diffumask", config, device, dtype)


def generate_diffumask(pipe, requests: Sequence[SampleRequest], config: GenerationConfig) -> list[dict]:
    """Image and label (dataset ids) for each request."""
    out = pipe(**config.text_to_image_kwargs(requests))
    images = to_uint8(np.asarray(out.images))
    return [
        {"image": image, "label": remap_label(mask, r.class_ids)}
        for image, mask, r in zip(images, np.asarray(out.masks), requests)
    ]


# --- Free-Mask: a DiffuMask base, then one more instance of each class inserted ---------


FREEMASK_COLUMNS = ("objects_inserted", "objects_rejected", "rejection_reasons")
"""Free-Mask's per-sample columns: insertions accepted, rejected, and the checks that rejected them."""


def load_freemask(config: GenerationConfig, device, dtype):
    """``config.model`` as a :class:`~diffuseg.pipelines.FreeMaskEditPipeline` (or its family's variant), safetensors only."""
    return _load("freemask", config, device, dtype)


def generate_freemask(pipe, requests: Sequence[SampleRequest], config: GenerationConfig) -> list[dict]:
    """A DiffuMask base from each request's prompt, then one more instance of each named class
    inserted into a free region (multi-instance images).

    Labels are dataset ids (``config.classes.names``); an insertion that fails its
    consistency check is left out and the base sample stays. Each sample also has the columns
    ``objects_inserted``, ``objects_rejected`` and ``rejection_reasons`` (the failed checks,
    comma-separated), which the dataset card sums up.
    """
    from diffuseg.pipelines.freemask import FreeMaskObject, default_object_prompt

    names = list(config.classes.names)
    size = (
        config.height or pipe.unet.config.sample_size * pipe.vae_scale_factor,
        config.width or pipe.unet.config.sample_size * pipe.vae_scale_factor,
    )
    common = config.pipeline_kwargs(requests)
    generators = common.pop("generator")
    images, labels = pipe.render_base(
        [r.prompt for r in requests], [list(r.words) for r in requests], [list(r.class_ids) for r in requests],
        size, generator=generators, **common,
    )
    objects = [
        [FreeMaskObject(names[c - 1], prompt=default_object_prompt(phrase), word=w) for c, w, phrase in
         zip(r.class_ids, r.words, _object_phrases(r, config))]
        for r in requests
    ]
    out = pipe(
        image=(images + 1) / 2, label_map=labels, objects=objects, class_names=names, generator=generators,
        region_size=config.region_size, mode=config.freemask_mode, output_type="np", **common,
    )
    return [
        {"image": image, "label": label, "objects_inserted": len(inserted), "objects_rejected": len(rejected),
         "rejection_reasons": ",".join(record.check for record in rejected)}
        for image, label, inserted, rejected in zip(to_uint8(out.images), out.masks, out.inserted, out.rejected)
    ]


def _object_phrases(request: SampleRequest, config: GenerationConfig) -> list[str]:
    """Per class word of ``request``, the phrase its prompt names the object with ("red circle"), else the word.

    An inserted object's prompt is then a caption the model knows, e.g. "a picture of a red circle"
    for the embedded ShapesWorld model.
    """
    from diffuseg.models import modifier_phrases

    phrases = modifier_phrases(request.prompt, request.words, config.object_modifiers or ())
    return [next((p for p in phrases if p.split()[-1].lower() == w.lower()), w) for w in request.words]


# --- Counterfactual (MagicSeg): image, mask, and the same scene without the object ------


def load_counterfactual(config: GenerationConfig, device, dtype):
    """``config.model`` as a :class:`~diffuseg.pipelines.CounterfactualPipeline` (or its family's variant), safetensors only."""
    return _load("counterfactual", config, device, dtype)


def generate_counterfactual(pipe, requests: Sequence[SampleRequest], config: GenerationConfig) -> list[dict]:
    """Image, label (dataset ids) and ``negative_image`` for each request.

    The class words, and the modifiers that describe their objects (ShapesWorld's colours), become
    ``config.counterfactual_replacement`` in the counterfactual prompts, as the pipeline's own defaults
    do; injection and fusion are the pipeline's defaults.
    """
    from diffuseg.models import modifier_phrases

    out = pipe(
        **config.text_to_image_kwargs(requests),
        replacement=config.counterfactual_replacement,
        remove_phrases=[modifier_phrases(r.prompt, r.words, config.object_modifiers) for r in requests],
    )
    return [
        {"image": image, "negative_image": negative, "label": remap_label(mask, r.class_ids),
         "counterfactual_agreement": float(agreement)}
        for image, negative, mask, agreement, r in zip(
            to_uint8(out.images), to_uint8(out.negative_images), out.masks, out.agreement, requests
        )
    ]
