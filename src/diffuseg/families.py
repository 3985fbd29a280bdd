"""Which model family a checkpoint is, and which pipeline class serves a method on it.

A family is named after the diffusers pipeline a checkpoint's ``model_index.json`` names
(or a subclass of it, such as diffuseg's own pipelines):

========  ===============================  =====================================
family    diffusers pipeline               denoiser (backend)
========  ===============================  =====================================
``sd``    ``StableDiffusionPipeline``      UNet (SD 1.x, 2.x)
``sdxl``  ``StableDiffusionXLPipeline``    UNet, two CLIP encoders
``sd3``   ``StableDiffusion3Pipeline``     MM-DiT, CLIP-L + CLIP-G + T5 (SD3, 3.5)
``flux``  ``FluxPipeline``                 MM-DiT, T5 in the sequence (FLUX.1)
========  ===============================  =====================================

The commands call :func:`pipeline_class_for` with the method and the ``--model``.
"""

from __future__ import annotations

import json
import os

FAMILY_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def method_pipelines() -> dict[str, dict[str, type]]:
    """``{method: {family: pipeline class}}`` for every method and the families it serves."""
    from diffuseg import pipelines

    return {
        "diffumask": {
            "sd": pipelines.DiffuMaskPipeline,
            "sdxl": pipelines.DiffuMaskXLPipeline,
            "sd3": pipelines.DiffuMaskSD3Pipeline,
            "flux": pipelines.DiffuMaskFluxPipeline,
        },
        "counterfactual": {
            "sd": pipelines.CounterfactualPipeline,
            "sdxl": pipelines.CounterfactualXLPipeline,
            "sd3": pipelines.CounterfactualSD3Pipeline,
            "flux": pipelines.CounterfactualFluxPipeline,
        },
        "freemask": {"sd": pipelines.FreeMaskEditPipeline},
        "maskdiffusion": {"sd": pipelines.MaskDiffusionSegPipeline},
    }


def family_of_class(class_name: str) -> str:
    """The family of a pipeline class named ``class_name`` (a diffusers class or a diffuseg subclass of one).

    Raises:
        ValueError: the class is unknown or belongs to none of the families.
    """
    import diffusers

    from diffuseg import pipelines

    cls = getattr(pipelines, class_name, None) or getattr(diffusers, class_name, None)
    if isinstance(cls, type):
        for family, base_name in FAMILY_PIPELINES.items():
            if issubclass(cls, getattr(diffusers, base_name)):
                return family
    raise ValueError(
        f"{class_name} is not a pipeline of a family diffuseg serves: "
        + ", ".join(f"{family} ({name})" for family, name in FAMILY_PIPELINES.items())
    )


def model_family(model: str | os.PathLike | None = None) -> str:
    """The family of ``model`` (a ``--model`` value: embedded name, folder or Hub id) from its ``model_index.json``."""
    from diffuseg.models import resolve_model

    resolved = resolve_model(model)
    if os.path.isdir(resolved):
        path = os.path.join(resolved, "model_index.json")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(resolved, "model_index.json")
    with open(path, encoding="utf-8") as f:
        return family_of_class(json.load(f)["_class_name"])


def pipeline_class_for(method: str, model: str | os.PathLike | None = None) -> type:
    """The pipeline class that runs ``method`` on ``model``'s family.

    Raises:
        ValueError: unknown method, or a family the method cannot serve (the message names those it can).
    """
    table = method_pipelines()
    if method not in table:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(table)}")
    family = model_family(model)
    if family not in table[method]:
        raise ValueError(f"{method} does not run on {family} models ({model}); it runs on: {', '.join(table[method])}")
    return table[method][family]
