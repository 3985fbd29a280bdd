"""Where models come from: the embedded ShapesWorld model, a local folder or a Hub id.

Every command and the Space resolve their ``--model`` here, so loading rules live once:
weights only through safetensors, remote code never by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "shapesworld"
"""Name of the embedded default model; any other value is a local folder or a Hub id."""

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODELS = {"shapesworld": ASSETS / "shapesworld"}


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
            raise FileNotFoundError(
                f"the embedded model {model!r} is not in this install ({folder}); "
                "pass --model with a local pipeline folder or a Hub id"
            )
        return str(folder)
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise FileNotFoundError(f"{model!r} is a folder but has no model_index.json: not a diffusers pipeline folder")
        check_components(Path(expanded))
        return expanded
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a Hub id is "name" or "owner/name"
        raise FileNotFoundError(f"model folder {model!r} does not exist")
    return model  # a Hub id: from_pretrained resolves it (from the cache when offline)


def check_components(folder: Path) -> None:
    """Raise ``FileNotFoundError`` naming what a local pipeline folder lacks: a component its
    ``model_index.json`` lists, or the safetensors weights of a model component."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except ValueError as error:
        raise ValueError(f"{folder / 'model_index.json'} is not valid JSON ({error})") from None
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue  # settings, and optional components left out (safety checker)
        component = folder / name
        if not component.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r} lacks its {name!r} component ({name}/ is missing)")
        # Models (not schedulers or tokenizers) have a config.json and weights; diffuseg loads safetensors only.
        if (component / "config.json").is_file() and not any(component.glob("*.safetensors")):
            raise FileNotFoundError(
                f"model folder {str(folder)!r}: {name}/ has no .safetensors weights "
                "(diffuseg loads no pickled .bin weights; convert them to safetensors)"
            )


def load_pipeline(pipeline_class, model: str | os.PathLike | None = None, *, dtype=None, device=None, **kwargs):
    """``pipeline_class.from_pretrained`` of the resolved ``model``, safetensors only.

    Safety checker and feature extractor are dropped: the outputs are training data, and
    the checker is an extra download most segmentation users do not want.
    """
    kwargs.setdefault("safety_checker", None)
    kwargs.setdefault("requires_safety_checker", False)
    pipe = pipeline_class.from_pretrained(
        resolve_model(model), dtype=dtype or torch.float32, use_safetensors=True, **kwargs
    )
    if device is not None:
        pipe.to(device)
    return pipe


def load_default_model(pipeline_class=None, **kwargs):
    """The embedded ShapesWorld model as ``pipeline_class`` (default: :class:`DiffuMaskPipeline`), offline."""
    if pipeline_class is None:
        from diffuseg.pipelines import DiffuMaskPipeline

        pipeline_class = DiffuMaskPipeline
    return load_pipeline(pipeline_class, DEFAULT_MODEL, **kwargs)
