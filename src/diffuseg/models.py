"""Where models come from: the embedded ShapesWorld model, a local folder or a Hub id.

Every command and the Space resolve their ``--model`` here, so loading rules live once:
weights only through safetensors, remote code never by default. A model folder may also
carry ``diffuseg.json``, the settings that suit it (:func:`model_defaults`).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

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
    the checker is an extra download most segmentation users do not want. Components a local
    folder saved as null (an SD3 folder without T5: ``text_encoder_3``) load as ``None``.
    """
    import torch

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
    from diffuseg.pipelines import DiffuMaskPipeline, DiffuMaskSD3Pipeline

    return DiffuMaskSD3Pipeline if model == "shapesworld-dit" else DiffuMaskPipeline


def load_default_model(pipeline_class=None, *, model: str = DEFAULT_MODEL, **kwargs):
    """An embedded model, offline: ``model`` is ``"shapesworld"`` (the UNet model, loaded as
    :class:`DiffuMaskPipeline` by default) or ``"shapesworld-dit"`` (the SD3-architecture model, loaded
    as :class:`DiffuMaskSD3Pipeline` by default). ``load_default_model("shapesworld-dit")`` also works.

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


# --------------------------------------------------------------------------- per-model defaults
MODEL_DEFAULTS_FILE = "diffuseg.json"
"""The file in a model folder whose keys override :class:`ModelDefaults` (unknown keys are an error)."""


@dataclass(frozen=True)
class ModelDefaults:
    """Settings that suit a model, read from its folder's ``diffuseg.json``.

    A model without the file (any Hub checkpoint) gets Stable Diffusion's usual values.

    Attributes:
        num_inference_steps, guidance_scale: sampling defaults of ``diffuseg generate``.
        segment_item: how a MaskDiffusion prompt names one class (``{}`` is the name),
            e.g. ``"a {}"``; ``None``: the bare name.
        segment_separator: what joins the named classes (" and ").
        segment_prompt: the MaskDiffusion prompt around the joined classes (``{classes}``), e.g.
            ``"a picture of {classes}"``; ``None``: the bare names joined by " and ", as in the paper.
        segment_background: how the background word is added to ``segment_prompt``
            (``{}`` is the word), e.g. ``" on a {}"``.
        counterfactual_replacement: what a counterfactual prompt says in place of the objects.
        object_modifiers: words that describe an object right before its class word (ShapesWorld's
            colours); a counterfactual removes "modifier word" together with the word.
        region_size: ``(min, max)`` area of a Free-Mask insertion region, as fractions of the
            image, sized to the objects the model draws: a region smaller than them gets a
            fragment whose word's attention spills out of it.
        source: where these values come from (for cards and messages).
    """

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    segment_item: str | None = None
    segment_separator: str = " and "
    segment_prompt: str | None = None
    segment_background: str | None = None
    counterfactual_replacement: str = "nothing"
    object_modifiers: tuple[str, ...] = ()
    region_size: tuple[float, float] = (0.05, 0.25)
    source: str = "Stable Diffusion defaults"

    def segment_caption(self, class_names: Sequence[str], background: str | None = None) -> str | None:
        """The MaskDiffusion prompt naming ``class_names`` (and ``background``), or None for the " and " join."""
        if self.segment_prompt is None:
            return None
        listed = self.segment_separator.join((self.segment_item or "{}").format(name) for name in class_names)
        text = self.segment_prompt.format(classes=listed)
        if background:
            text += (self.segment_background or " and {}").format(background)
        return text

    def remove_phrases(self, prompt: str, class_words: Sequence[str]) -> list[str]:
        """The "modifier word" phrases of ``prompt`` that a counterfactual removes with its class words."""
        return modifier_phrases(prompt, class_words, self.object_modifiers)


def modifier_phrases(prompt: str, words: Sequence[str], modifiers: Sequence[str]) -> list[str]:
    """Each "modifier word" of ``prompt`` (whole words, any case), for ``words`` and ``modifiers``."""
    return [
        f"{modifier} {word}"
        for word in words
        for modifier in modifiers
        if re.search(rf"\b{re.escape(modifier)}\s+{re.escape(word)}\b", prompt, flags=re.IGNORECASE)
    ]


def model_defaults(model: str | os.PathLike | None = None) -> ModelDefaults:
    """The :class:`ModelDefaults` of ``model`` (a name, folder or Hub id; default: the embedded model).

    Only local folders are read (nothing is downloaded): a Hub id, or a folder without
    ``diffuseg.json``, gets Stable Diffusion's defaults.

    Raises:
        ValueError: the file exists but is not valid JSON or has keys :class:`ModelDefaults` does not know.
    """
    name = os.fspath(model) if model is not None else DEFAULT_MODEL
    if not name:
        return ModelDefaults()
    folder = EMBEDDED_MODELS.get(name, Path(os.path.expanduser(name)))
    path = folder / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    known = {f.name for f in fields(ModelDefaults)} - {"source"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; known: {sorted(known)}")
    for name in ("object_modifiers", "region_size"):  # JSON lists as the tuples of the dataclass
        if name in values:
            values[name] = tuple(values[name])
    return ModelDefaults(**values, source=str(path))


def pipeline_defaults(pipe) -> ModelDefaults:
    """The :class:`ModelDefaults` of the folder a loaded pipeline came from (``pipe.name_or_path``)."""
    return model_defaults(getattr(pipe, "name_or_path", None) or "")  # "": built in code, no folder


# --------------------------------------------------------------------------- community pipelines
COMMUNITY_PIPELINES = (
    "counterfactual", "counterfactual_flux", "counterfactual_sd3", "counterfactual_xl", "diffumask", "diffumask_flux", "diffumask_sd3",
    "diffumask_xl", "freemask", "maskdiffusion",
)
"""The pipelines that load as diffusers community pipelines (``custom_pipeline=``)."""


def community_pipeline(name: str) -> str:
    """The absolute path of the installed community-pipeline folder ``name``, for ``custom_pipeline=``.

    >>> DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("diffumask"),
    ...                                   trust_remote_code=True)

    Works from any working directory (a relative ``"pipelines/diffumask"`` only from the repository root).

    Raises:
        ValueError: ``name`` is not one of :data:`COMMUNITY_PIPELINES`.
    """
    if name not in COMMUNITY_PIPELINES:
        raise ValueError(f"no community pipeline {name!r}; there are {', '.join(COMMUNITY_PIPELINES)}")
    return str(Path(__file__).parent / "community" / name)
