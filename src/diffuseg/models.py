"""Where models come from: the embedded ShapesWorld model, a local folder or a Hub id.

Every command and the Space resolve their ``--model`` here, so loading rules live once:
weights only through safetensors, remote code never by default.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "shapesworld"
"""Name of the embedded default model; any other value is a local folder or a Hub id."""

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODELS = {"shapesworld": ASSETS / "shapesworld", "shapesworld-dit": ASSETS / "shapesworld-dit"}
"""The models shipped in the package: the ShapesWorld UNet (SD 1.x architecture) and ShapesWorld-DiT
(SD3 architecture, trained with ``python -m diffuseg.shapesworld.train --architecture sd3``)."""


def resolve_model(model: str | os.PathLike | None = None) -> str:
    """The folder or Hub id to load for ``model`` (default: the embedded ShapesWorld model).

    Raises:
        FileNotFoundError: the embedded model is named but not present in this install, or
            ``model`` looks like a local path (starts with ``.``, ``/`` or ``~``) that does not exist.
    """
    model = os.fspath(model) if model is not None else DEFAULT_MODEL
    if model in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            train = "python -m diffuseg.shapesworld.train" + (" --architecture sd3" if model == "shapesworld-dit" else "")
            raise FileNotFoundError(
                f"the embedded model {model!r} is not in this install ({folder}); "
                f"pass --model with a local pipeline folder or a Hub id, or train it ({train})"
            )
        return str(folder)
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise FileNotFoundError(f"{model!r} is a folder but has no model_index.json: not a diffusers pipeline folder")
        return expanded
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a Hub id is "name" or "owner/name"
        raise FileNotFoundError(f"model folder {model!r} does not exist")
    return model  # a Hub id: from_pretrained resolves it (from the cache when offline)


def load_pipeline(pipeline_class, model: str | os.PathLike | None = None, *, dtype=None, device=None, **kwargs):
    """``pipeline_class.from_pretrained`` of the resolved ``model``, safetensors only.

    Safety checker and feature extractor are dropped: the outputs are training data, and
    the checker is an extra download most segmentation users do not want. Components a local
    folder saved as null (an SD3 folder without T5: ``text_encoder_3``) load as ``None``.
    """
    source = resolve_model(model)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    if "safety_checker" in accepted:
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
    index = Path(source) / "model_index.json"
    if index.is_file():
        # diffusers refuses a null component the pipeline class does not list as optional,
        # although its __init__ accepts None (StableDiffusion3Pipeline's T5 encoder and tokenizer)
        for name, value in json.loads(index.read_text()).items():
            if isinstance(value, list) and value[0] is None and name in accepted:
                kwargs.setdefault(name, None)
    pipe = pipeline_class.from_pretrained(source, dtype=dtype or torch.float32, use_safetensors=True, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def _default_pipeline_class(model: str):
    if model == "shapesworld-dit":
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline
    from diffuseg.pipelines import DiffuMaskPipeline

    return DiffuMaskPipeline


def load_default_model(pipeline_class=None, *, model: str = DEFAULT_MODEL, **kwargs):
    """An embedded model, offline: ``model`` is ``"shapesworld"`` (the UNet model, loaded as
    :class:`DiffuMaskPipeline` by default) or ``"shapesworld-dit"`` (the SD3-architecture model, loaded
    as ``StableDiffusion3Pipeline`` by default). ``load_default_model("shapesworld-dit")`` also works.

    Raises:
        ValueError: ``model`` is not an embedded model's name.
        FileNotFoundError: the embedded model is not in this install (ShapesWorld-DiT ships once a
            training snapshot is committed).
    """
    if isinstance(pipeline_class, str):  # load_default_model("shapesworld-dit")
        pipeline_class, model = None, pipeline_class
    if model not in EMBEDDED_MODELS:
        raise ValueError(f"{model!r} is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)} "
                         "(load_pipeline() takes a folder or a Hub id)")
    return load_pipeline(pipeline_class or _default_pipeline_class(model), model, **kwargs)
