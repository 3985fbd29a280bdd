"""Synthetic segmentation datasets from a text-to-image pipeline: the logic behind ``diffuseg generate``.

The pieces, top to bottom:

* **classes**: presets (``voc20``, ``coco80``, ``shapes``), comma lists or files, each class
  with the words that may name it in a prompt (synonyms) and context phrases;
* **prompts**: templates, or MagicSeg-style descriptions written by a local causal language
  model; every prompt is checked to contain its class words within the text encoder's limit;
* **pipelines**: a registry, name -> (load the model, generate samples from requests), so
  new pipelines plug in without touching the loop;
* **filters**: mask area, ignore fraction, agreement with a segmentation model (a minimum
  IoU as in Free-Mask, and/or the best fraction of each shard as in DiffuMask's noise
  learning), every measurement recorded per sample;
* **mosaic**: 2×2 / 3×3 tiles of images and their label maps;
* **the loop**: :func:`generate_dataset` streams samples into a :class:`~diffuseg.data.DatasetWriter`,
  resumes after any interruption, and splits the work between ``accelerate`` processes.

Determinism. Sample ``i`` of a run with ``seed`` uses ``sample_seed(seed, i)`` for its prompt,
its class choice and its latents (a CPU ``torch.Generator``), and the work is cut into
blocks of ``samples_per_shard`` consecutive samples that are produced whole, in a fixed
batch order, by one process. A block's content therefore depends only on the settings: the
dataset is the same after a ``kill -9`` and a rerun, and with any number of processes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffuseg.data import IGNORE_INDEX, DatasetWriter, encode_png, split_files

# =====================================================================================
# classes


@dataclass(frozen=True)
class ClassSpec:
    """A dataset class and how prompts name it.

    Attributes:
        name: the label name (``id2label``), e.g. ``"pottedplant"``.
        synonyms: words that may name the class in a prompt, e.g. ``("potted plant",
            "houseplant")``; default: the name itself.
        contexts: phrases a template may add (``{context}``), e.g. ``("on a windowsill",)``.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    contexts: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """The words that may stand for the class in a prompt."""
        return self.synonyms or (self.name,)


_VOC_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (synonyms, contexts)
    "aeroplane": (("aeroplane", "airplane", "plane"), ("in the sky", "on the runway", "at the airport", "above the clouds")),
    "bicycle": (("bicycle", "bike"), ("on the street", "leaning against a wall", "in a park", "on a country road")),
    "bird": (("bird",), ("on a branch", "in the sky", "on the grass", "by the water")),
    "boat": (("boat",), ("on a lake", "in a harbour", "on the sea", "on a river")),
    "bottle": (("bottle",), ("on a table", "on a shelf", "in a kitchen", "on a bar counter")),
    "bus": (("bus",), ("on the street", "at a bus stop", "in the city", "on a highway")),
    "car": (("car",), ("on the street", "in a parking lot", "on a highway", "in front of a house")),
    "cat": (("cat",), ("on a sofa", "on the floor", "in a garden", "on a bed")),
    "chair": (("chair",), ("in a room", "in an office", "on a terrace", "next to a table")),
    "cow": (("cow",), ("in a field", "on a farm", "on a meadow", "in a barn")),
    "diningtable": (("dining table", "table"), ("in a dining room", "in a kitchen", "in a restaurant", "set for dinner")),
    "dog": (("dog", "puppy"), ("on the grass", "in a park", "on a beach", "in a living room")),
    "horse": (("horse",), ("in a field", "on a farm", "in a paddock", "on a trail")),
    "motorbike": (("motorbike", "motorcycle"), ("on the street", "on a road", "in a parking lot", "in front of a shop")),
    "person": (("person", "man", "woman", "child"), ("on the street", "in a park", "in a room", "at the beach")),
    "pottedplant": (("potted plant", "houseplant"), ("on a windowsill", "in a room", "on a table", "on a balcony")),
    "sheep": (("sheep",), ("in a field", "on a hill", "on a farm", "on a meadow")),
    "sofa": (("sofa", "couch"), ("in a living room", "in a lounge", "by a window", "in an apartment")),
    "train": (("train",), ("at a station", "on the tracks", "in the countryside", "on a bridge")),
    "tvmonitor": (("tv monitor", "television", "monitor"), ("in a living room", "on a desk", "on a wall", "in an office")),
}

_COCO_CONTEXTS = {
    "street": ("on the street", "in the city", "on a road", "in a parking lot"),
    "animal": ("in a field", "on the grass", "in the wild", "in a park"),
    "outdoor": ("in a park", "outdoors", "on a sunny day", "in the city"),
    "sport": ("at a sports field", "outdoors", "on the beach", "in the snow"),
    "table": ("on a table", "in a kitchen", "on a counter", "on a plate"),
    "indoor": ("in a room", "in a living room", "in a house", "in an apartment"),
    "personal": ("on a table", "in a bag", "on a shelf", "held in a hand"),
}
_COCO_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (context group, synonyms)
    "person": ("outdoor", ("person", "man", "woman", "child")),
    "bicycle": ("street", ("bicycle", "bike")),
    "car": ("street", ()),
    "motorcycle": ("street", ("motorcycle", "motorbike")),
    "airplane": ("outdoor", ("airplane", "aeroplane", "plane")),
    "bus": ("street", ()),
    "train": ("outdoor", ()),
    "truck": ("street", ()),
    "boat": ("outdoor", ()),
    "traffic light": ("street", ()),
    "fire hydrant": ("street", ()),
    "stop sign": ("street", ()),
    "parking meter": ("street", ()),
    "bench": ("outdoor", ()),
    "bird": ("animal", ()),
    "cat": ("indoor", ()),
    "dog": ("outdoor", ("dog", "puppy")),
    "horse": ("animal", ()),
    "sheep": ("animal", ()),
    "cow": ("animal", ()),
    "elephant": ("animal", ()),
    "bear": ("animal", ()),
    "zebra": ("animal", ()),
    "giraffe": ("animal", ()),
    "backpack": ("personal", ()),
    "umbrella": ("outdoor", ()),
    "handbag": ("personal", ()),
    "tie": ("personal", ()),
    "suitcase": ("personal", ()),
    "frisbee": ("sport", ()),
    "skis": ("sport", ()),
    "snowboard": ("sport", ()),
    "sports ball": ("sport", ("sports ball", "ball")),
    "kite": ("sport", ()),
    "baseball bat": ("sport", ()),
    "baseball glove": ("sport", ()),
    "skateboard": ("sport", ()),
    "surfboard": ("sport", ()),
    "tennis racket": ("sport", ()),
    "bottle": ("table", ()),
    "wine glass": ("table", ()),
    "cup": ("table", ()),
    "fork": ("table", ()),
    "knife": ("table", ()),
    "spoon": ("table", ()),
    "bowl": ("table", ()),
    "banana": ("table", ()),
    "apple": ("table", ()),
    "sandwich": ("table", ()),
    "orange": ("table", ()),
    "broccoli": ("table", ()),
    "carrot": ("table", ()),
    "hot dog": ("table", ()),
    "pizza": ("table", ()),
    "donut": ("table", ()),
    "cake": ("table", ()),
    "chair": ("indoor", ()),
    "couch": ("indoor", ("couch", "sofa")),
    "potted plant": ("indoor", ()),
    "bed": ("indoor", ()),
    "dining table": ("indoor", ()),
    "toilet": ("indoor", ()),
    "tv": ("indoor", ("tv", "television")),
    "laptop": ("indoor", ()),
    "mouse": ("table", ("computer mouse", "mouse")),
    "remote": ("indoor", ("remote control", "remote")),
    "keyboard": ("table", ()),
    "cell phone": ("personal", ("cell phone", "smartphone")),
    "microwave": ("indoor", ()),
    "oven": ("indoor", ()),
    "toaster": ("table", ()),
    "sink": ("indoor", ()),
    "refrigerator": ("indoor", ()),
    "book": ("personal", ()),
    "clock": ("indoor", ()),
    "vase": ("indoor", ()),
    "scissors": ("personal", ()),
    "teddy bear": ("indoor", ()),
    "hair drier": ("indoor", ("hair drier", "hair dryer")),
    "toothbrush": ("personal", ()),
}


@dataclass(frozen=True)
class ClassSet:
    """Classes, plus the templates that suit them (``None``: :data:`DEFAULT_TEMPLATES`).

    Attributes:
        object_contexts: the classes' contexts describe the object itself (ShapesWorld's colours:
            "a red circle"), not its surroundings, so a counterfactual removes them with the class word.
        absence: what a counterfactual prompt says in place of a removed object: MagicSeg's
            "nothing"; for ShapesWorld, the word its empty scenes are captioned with.
    """

    classes: tuple[ClassSpec, ...]
    templates: tuple[str, ...] | None = None
    source: str = "list"
    object_contexts: bool = False
    absence: str = "nothing"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def object_phrases(self, request: SampleRequest) -> list[str]:
        """What a counterfactual of ``request`` removes besides its class words: each word with its object context."""
        from diffuseg.tokens import find_word_spans

        if not self.object_contexts:
            return []
        phrases = (f"{context} {word}" for class_id, word in zip(request.class_ids, request.words)
                   for context in self.classes[class_id - 1].contexts)
        return [phrase for phrase in phrases if find_word_spans(request.prompt, phrase)]


def _voc20() -> ClassSet:
    classes = tuple(ClassSpec(name, syn, ctx) for name, (syn, ctx) in _VOC_CLASSES.items())
    return ClassSet(classes, source="voc20")


def _coco80() -> ClassSet:
    classes = tuple(ClassSpec(name, syn, _COCO_CONTEXTS[group]) for name, (group, syn) in _COCO_CLASSES.items())
    return ClassSet(classes, source="coco80")


def _shapes() -> ClassSet:
    # The embedded model knows ShapesWorld captions only: reuse their templates, with the
    # colours as context words ("a picture of a red circle"), and its empty scenes' caption
    # for counterfactuals ("a picture of a background").
    from diffuseg.shapesworld.render import CAPTION_TEMPLATES, DEFAULT_COLORS, DEFAULT_SHAPES, EMPTY_SCENE_WORD

    classes = tuple(ClassSpec(shape, (), tuple(DEFAULT_COLORS)) for shape in DEFAULT_SHAPES)
    templates = tuple(t.replace("{0}", "{context} {class}") for t in CAPTION_TEMPLATES[1])
    return ClassSet(classes, templates, source="shapes", object_contexts=True, absence=EMPTY_SCENE_WORD)


PRESETS: dict[str, Callable[[], ClassSet]] = {"voc20": _voc20, "coco80": _coco80, "shapes": _shapes}
"""Class presets: Pascal VOC's 20, COCO's 80, and the ShapesWorld shapes of the embedded model."""


def _parse_entry(entry: str) -> ClassSpec:
    name, _, synonyms = entry.partition("=")
    name = " ".join(name.split())
    if not name:
        raise ValueError(f"empty class name in {entry!r}")
    words = tuple(" ".join(w.split()) for w in synonyms.split("|") if w.strip()) if synonyms else ()
    return ClassSpec(name, words)


def parse_classes(spec: str) -> ClassSet:
    """Classes from a preset name, a file, or a comma list.

    A list entry is ``name`` or ``name=synonym|synonym`` (the words that may name the class
    in prompts; the name itself is used only if listed). A file holds the same entries, one
    per line or comma-separated, ``#`` starting a comment; a ``.json`` file maps each name
    to ``{"synonyms": [...], "contexts": [...]}``.

    Raises:
        ValueError: unknown preset, empty or duplicate classes.
        FileNotFoundError: ``spec`` looks like a path that does not exist.
    """
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            classes = tuple(
                ClassSpec(name, tuple(v.get("synonyms", ())), tuple(v.get("contexts", ()))) for name, v in data.items()
            )
        else:
            lines = (line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
            classes = tuple(_parse_entry(e) for line in lines for e in line.split(",") if e.strip())
        return _checked(ClassSet(classes, source=path.name))
    if os.sep in spec or spec.endswith((".txt", ".json")):
        raise FileNotFoundError(f"class file {spec!r} does not exist")
    entries = [e for e in spec.split(",") if e.strip()]
    if len(entries) == 1 and "," not in spec and _looks_like_preset(spec):
        raise ValueError(
            f"unknown class preset {spec!r} (presets: {', '.join(PRESETS)}); "
            f"for a single class with this name write {spec + ','!r}"
        )
    return _checked(ClassSet(tuple(_parse_entry(e) for e in entries)))


def _looks_like_preset(name: str) -> bool:
    import difflib

    return bool(re.fullmatch(r"[a-z]+\d+", name) or difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.75))


def _checked(class_set: ClassSet) -> ClassSet:
    if not class_set.classes:
        raise ValueError("no classes given: use a preset (voc20, coco80, shapes), a comma list or a file")
    names = class_set.names
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate classes: {duplicates}")
    return class_set


# =====================================================================================
# prompts

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {class}",
    "a photo of {a} {class} {context}",
    "a photograph of {a} {class} {context}",
    "a realistic photo of {a} {class} {context}",
    "a close-up photo of {a} {class}",
    "a picture of {a} {class} {context}",
    "a high quality photo of {a} {class} {context}",
)
"""Templates: ``{class}`` the class word(s) (required), ``{context}`` one of the class's
context phrases (empty when it has none), ``{a}`` "a" or "an" for the word that follows."""

_PLACEHOLDERS = {"class", "context", "a"}
_ARTICLE = "\x00a\x00"


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` validated: each names ``{class}`` and uses no other placeholder than ``{context}``, ``{a}``."""
    import string

    templates = tuple(t.strip() for t in templates if t.strip())
    if not templates:
        raise ValueError("no templates given")
    for template in templates:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as error:
            raise ValueError(f"template {template!r} is malformed: {error}") from None
        if "class" not in fields:
            raise ValueError(
                f"template {template!r} does not contain {{class}}: every prompt must name its class "
                "(write e.g. 'a photo of {a} {class} {context}')"
            )
        unknown = fields - _PLACEHOLDERS
        if unknown:
            raise ValueError(f"template {template!r} uses unknown placeholders {sorted(unknown)} (known: class, context, a)")
    return templates


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Templates from a text file, one per line (``#`` comments)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"template file {str(path)!r} does not exist")
    lines = (line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
    return check_templates([line for line in lines if line.strip()])


def _fill_articles(text: str) -> str:
    def article(match: re.Match) -> str:
        return "an" if match.group(1).lower() in "aeiou" else "a"

    text = re.sub(re.escape(_ARTICLE) + r"(?=\s*(\w))", lambda m: article(m), text)
    return text.replace(_ARTICLE, "a")


def format_prompt(template: str, words: Sequence[str], context: str = "") -> str:
    """``template`` filled with one or two class words (``"dog and a cat"``) and a context."""
    phrase = words[0] if len(words) == 1 else f"{words[0]} and {_ARTICLE} {words[1]}"
    text = template.format(**{"class": phrase, "context": context, "a": _ARTICLE})
    return " ".join(_fill_articles(text).split())


def check_prompt(prompt: str, words: Sequence[str], tokenizer=None) -> None:
    """Raise ``ValueError`` unless every class word is in ``prompt`` (whole word, before the token limit)."""
    from diffuseg.tokens import find_word_spans, word_token_positions

    for word in words:
        if tokenizer is not None:
            word_token_positions(tokenizer, prompt, word)
        elif not find_word_spans(prompt, word):
            raise ValueError(f"class word {word!r} does not appear in the prompt {prompt!r}")


class TemplatePrompter:
    """Prompts from templates: a random template, synonym and context per sample."""

    def __init__(self, class_set: ClassSet, templates: Sequence[str] | None = None) -> None:
        self.classes = class_set.classes
        self.templates = check_templates(templates or class_set.templates or DEFAULT_TEMPLATES)

    def words_and_context(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[list[str], str]:
        words = [self.classes[c - 1].words[int(rng.integers(len(self.classes[c - 1].words)))] for c in class_ids]
        contexts = self.classes[class_ids[0] - 1].contexts
        context = contexts[int(rng.integers(len(contexts)))] if contexts else ""
        return words, context

    def __call__(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[str, list[str]]:
        """(prompt, class words in the order of ``class_ids``) for one sample."""
        template = self.templates[int(rng.integers(len(self.templates)))]
        words, context = self.words_and_context(class_ids, rng)
        return format_prompt(template, words, context), words


class DescriptionPrompter(TemplatePrompter):
    """MagicSeg-style descriptions written by a local causal language model (transformers).

    The model is asked for a one-sentence description of a photo showing the sample's
    classes, and its answer is made to start with a template prompt (``"a photo of a dog
    and a cat"``), so the class words are there by construction; the model writes the
    rest of the scene. The continuation is cut at the end of the first sentence and sampled
    with the sample's seed, so descriptions are reproducible.

    Args:
        folder: a local transformers model folder (``AutoModelForCausalLM``; safetensors,
            no remote code).
        class_set, templates: as :class:`TemplatePrompter` (the forced beginnings).
        max_new_tokens: length limit of the continuation.
        device: where the language model runs.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        class_set: ClassSet,
        templates: Sequence[str] | None = None,
        max_new_tokens: int = 24,
        device=None,
    ) -> None:
        super().__init__(class_set, templates)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"prompt model folder {str(folder)!r} does not exist (--prompt-model takes a local folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens

    def instruction(self, words: Sequence[str]) -> str:
        named = " and ".join(f"{_fill_articles(_ARTICLE + ' ' + w)}" for w in words)
        return f"Write one sentence describing a realistic photo that shows {named}."

    def __call__(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[str, list[str]]:
        import torch

        beginning, words = super().__call__(class_ids, rng)
        instruction = self.instruction(words)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = f"{instruction}\n"
        inputs = self.tokenizer(text + beginning, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        seed = int(rng.integers(2**31))
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs,
                do_sample=True,
                top_p=0.9,
                temperature=0.8,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        continuation = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.complete(beginning, continuation), words

    @staticmethod
    def complete(beginning: str, continuation: str) -> str:
        """``beginning`` + the first sentence of ``continuation``, white space normalised."""
        continuation = continuation.split("\n", 1)[0]
        end = re.search(r"[.!?](\s|$)", continuation)
        if end:
            continuation = continuation[: end.start() + 1]
        glue = "" if continuation[:1] in ",.;:!?" else " "
        return " ".join((beginning + glue + continuation).split())


# =====================================================================================
# the work plan: which sample is what


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of sample ``index`` of a run with ``seed`` (independent streams per sample).

    ``stream`` separates other random choices (1: mosaics) from the samples' own.
    """
    entropy = [int(seed), int(index)] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) | (int(state[1]) >> 1))


@dataclass
class SampleRequest:
    """One sample to generate.

    Attributes:
        index: the sample's index in the run.
        seed: its seed (latents, prompt choices); recorded in the ``seed`` column.
        prompt: the text prompt.
        class_ids: dataset label ids of the classes named in the prompt.
        words: the word naming each class in ``prompt`` (same order as ``class_ids``); mask
            value ``k`` of a pipeline's output is ``class_ids[k - 1]``.
    """

    index: int
    seed: int
    prompt: str
    class_ids: list[int]
    words: list[str]


# =====================================================================================
# pipelines registry


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
    """

    name: str
    load: Callable[..., Any]
    generate: Callable[..., list[dict]]
    extra_image_columns: tuple[str, ...] = ()


PIPELINES: dict[str, PipelineSpec] = {}
# Pipelines whose module registers itself on import (register_pipeline), loaded on demand.
_PIPELINE_MODULES = {
    "freemask": "diffuseg.pipelines.freemask",
    "counterfactual": "diffuseg.pipelines.counterfactual",
}


def register_pipeline(spec: PipelineSpec) -> PipelineSpec:
    """Make ``spec`` available to :func:`generate_dataset` and ``--pipeline``."""
    PIPELINES[spec.name] = spec
    return spec


def get_pipeline(name: str) -> PipelineSpec:
    """The registered pipeline ``name``, importing its module when it registers itself."""
    if name not in PIPELINES and name in _PIPELINE_MODULES:
        import importlib

        try:
            importlib.import_module(_PIPELINE_MODULES[name])
        except ModuleNotFoundError as error:
            if error.name != _PIPELINE_MODULES[name]:
                raise
    if name not in PIPELINES:
        pending = [n for n in _PIPELINE_MODULES if n not in PIPELINES]
        raise ValueError(
            f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINES))}"
            + (f" ({', '.join(pending)} not in this version yet)" if pending else "")
        )
    return PIPELINES[name]


def remap_label(mask: np.ndarray, class_ids: Sequence[int]) -> np.ndarray:
    """A pipeline mask (0, 1..k, 255) in dataset ids: value ``k`` becomes ``class_ids[k - 1]``."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[1 : len(class_ids) + 1] = np.asarray(class_ids, dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut[np.asarray(mask, dtype=np.uint8)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _load_diffumask(config: GenerationConfig, device, dtype):
    from diffuseg.models import load_pipeline
    from diffuseg.pipelines import DiffuMaskPipeline

    pipe = load_pipeline(DiffuMaskPipeline, config.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate_diffumask(pipe, requests: Sequence[SampleRequest], config: GenerationConfig) -> list[dict]:
    out = pipe(**config.text_to_image_kwargs(requests))
    images = to_uint8(np.asarray(out.images))
    return [
        {"image": image, "label": remap_label(mask, r.class_ids)}
        for image, mask, r in zip(images, np.asarray(out.masks), requests)
    ]


register_pipeline(PipelineSpec("diffumask", _load_diffumask, _generate_diffumask))


# =====================================================================================
# quality filters


def mask_stats(label: np.ndarray, class_ids: Sequence[int]) -> dict[str, float]:
    """``mask_area``: area fraction of the smallest named class; ``ignore_fraction``: share of 255 pixels."""
    label = np.asarray(label)
    areas = [float((label == c).mean()) for c in class_ids] or [0.0]
    return {"mask_area": min(areas), "ignore_fraction": float((label == IGNORE_INDEX).mean())}


def agreement_iou(label: np.ndarray, predicted: np.ndarray, class_ids: Sequence[int]) -> float:
    """Mean IoU, over the named classes, of ``label`` against a segmenter's ``predicted`` map.

    Pixels the label marks as ignore (255) are left out. A class absent from both maps is
    skipped; with none left the agreement is 0.
    """
    valid = np.asarray(label) != IGNORE_INDEX
    ious = []
    for c in class_ids:
        ours, theirs = (np.asarray(label) == c) & valid, (np.asarray(predicted) == c) & valid
        union = (ours | theirs).sum()
        if union:
            ious.append((ours & theirs).sum() / union)
    return float(np.mean(ious)) if ious else 0.0


class SegmentationAgreement:
    """A transformers semantic-segmentation model whose predictions are compared with the masks.

    Any ``AutoModelForSemanticSegmentation`` (SegFormer, UperNet, ...) or
    ``AutoModelForUniversalSegmentation`` (Mask2Former, ...) folder or Hub id with an image
    processor. Its labels are matched to the dataset's classes by name ("background" = 0;
    labels that are none of the dataset's classes count as background).

    Raises:
        ValueError: the model does not know some dataset class.
    """

    def __init__(self, model: str | os.PathLike, class_names: Sequence[str], device=None) -> None:
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        path = os.fspath(model)
        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"agreement model folder {path!r} does not exist")
        config = AutoConfig.from_pretrained(os.path.expanduser(path))
        auto = transformers.AutoModelForSemanticSegmentation
        if type(config) not in auto._model_mapping:
            auto = transformers.AutoModelForUniversalSegmentation
        self.model = auto.from_pretrained(os.path.expanduser(path), use_safetensors=True).eval()
        if device is not None:
            self.model.to(device)
        self.processor = AutoImageProcessor.from_pretrained(os.path.expanduser(path))
        ids = {name: i for i, name in enumerate(class_names, start=1)}
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        missing = sorted(set(class_names) - set(id2label.values()))
        if missing:
            raise ValueError(f"the agreement model {path!r} does not predict {missing}; its labels: {sorted(id2label.values())}")
        self.lut = np.zeros(max(id2label) + 1, dtype=np.uint8)
        for model_id, name in id2label.items():
            self.lut[model_id] = ids.get(name, 0)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Label maps (dataset ids) of uint8 HxWx3 images."""
        import torch

        inputs = self.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[i.shape[:2] for i in images])
        return [self.lut[m.cpu().numpy().astype(np.int64)] for m in maps]


# =====================================================================================
# mosaic


def mosaic(images: Sequence[Image.Image | np.ndarray], labels: Sequence[Image.Image | np.ndarray], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``grid``×``grid`` tiles of images and their label maps, at the size of the first image.

    Images are resized with a smooth filter, labels with nearest neighbour (ids stay ids).
    """
    if grid < 2 or len(images) != grid * grid or len(labels) != grid * grid:
        raise ValueError(f"a {grid}x{grid} mosaic needs {grid * grid} images and labels, got {len(images)}, {len(labels)}")
    first = np.asarray(images[0])
    height, width = first.shape[:2]
    ys = [round(k * height / grid) for k in range(grid + 1)]
    xs = [round(k * width / grid) for k in range(grid + 1)]
    out_image = np.zeros((height, width, 3), np.uint8)
    out_label = np.zeros((height, width), np.uint8)
    for k, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(k, grid)
        size = (xs[c + 1] - xs[c], ys[r + 1] - ys[r])
        tile = Image.fromarray(np.asarray(image)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        tile_label = Image.fromarray(np.asarray(label, dtype=np.uint8)).resize(size, Image.Resampling.NEAREST)
        out_image[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = np.asarray(tile)
        out_label[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = np.asarray(tile_label)
    return out_image, out_label


# =====================================================================================
# configuration


@dataclass
class GenerationConfig:
    """Everything ``diffuseg generate`` needs; the fields marked below define the dataset.

    Attributes:
        out: the dataset folder.
        classes: the classes (see :func:`parse_classes`).
        images_per_class: samples generated per class (each class is the first class of
            that many prompts); filters may remove some.
        pipeline: a registered pipeline (:data:`PIPELINES`).
        model: ``"shapesworld"``, a local pipeline folder or a Hub id.
        seed: run seed; sample ``i`` uses ``sample_seed(seed, i)``.
        templates: prompt templates (default: the class set's or :data:`DEFAULT_TEMPLATES`).
        prompt_model: local causal LM folder for MagicSeg-style descriptions.
        prompt_max_new_tokens: description length limit.
        counterfactual_replacement: what counterfactual prompts say in place of their objects
            (``None``: the class set's :attr:`ClassSet.absence`).
        two_class_fraction: share of prompts naming a second, random class.
        height, width, num_inference_steps, guidance_scale, negative_prompt: generation.
        resolutions, threshold, ignore_band, refine, min_component_area: mask extraction
            (see :class:`~diffuseg.pipelines.DiffuMaskPipeline`).
        min_mask_area: reject samples whose smallest named class covers less than this
            fraction of the image.
        max_ignore_fraction: reject samples with more ignore (255) pixels than this.
        agreement_model: segmentation model to compare masks with (transformers).
        agreement_min_iou: reject samples whose agreement IoU is below this (Free-Mask: 0.5).
        agreement_keep: keep this best fraction of each shard by agreement IoU (DiffuMask: 0.3).
        mosaic: 2 or 3 for 2×2 / 3×3 mosaics of kept samples (``None``: none).
        mosaic_fraction: mosaics added per generated sample (per shard).
        batch_size: prompts per pipeline call (does not change the data on a given device).
        samples_per_shard: generated samples per shard (the unit of resumption).
        dtype: ``"auto"`` (float16 on CUDA, else float32), ``"float32"``, ``"float16"``, ``"bfloat16"``.
    """

    out: str
    classes: ClassSet
    images_per_class: int
    pipeline: str = "diffumask"
    model: str = "shapesworld"
    seed: int = 0
    templates: tuple[str, ...] | None = None
    prompt_model: str | None = None
    prompt_max_new_tokens: int = 24
    counterfactual_replacement: str | None = None
    two_class_fraction: float = 0.0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    resolutions: tuple[int, ...] | None = None
    threshold: str | float = "otsu"
    ignore_band: float = 0.0
    refine: bool = False
    min_component_area: int = 0
    min_mask_area: float = 0.0
    max_ignore_fraction: float = 1.0
    agreement_model: str | None = None
    agreement_min_iou: float | None = None
    agreement_keep: float | None = None
    mosaic: int | None = None
    mosaic_fraction: float = 0.25
    batch_size: int = 1
    samples_per_shard: int = 256
    dtype: str = "auto"
    # Runtime knobs: they do not change the dataset, so they stay out of the fingerprint.
    RUNTIME_FIELDS = ("out", "batch_size", "dtype")

    def validate(self) -> None:
        """Raise ``ValueError`` / ``FileNotFoundError`` on settings that cannot work."""
        positive = {"images_per_class": self.images_per_class, "batch_size": self.batch_size,
                    "samples_per_shard": self.samples_per_shard, "num_inference_steps": self.num_inference_steps,
                    "prompt_max_new_tokens": self.prompt_max_new_tokens}
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
        fractions = {"two_class_fraction": self.two_class_fraction, "min_mask_area": self.min_mask_area,
                     "max_ignore_fraction": self.max_ignore_fraction, "mosaic_fraction": self.mosaic_fraction,
                     "ignore_band": self.ignore_band}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.agreement_min_iou is not None and not 0.0 <= self.agreement_min_iou <= 1.0:
            raise ValueError(f"--agreement-min-iou must be in [0, 1], got {self.agreement_min_iou}")
        if self.agreement_keep is not None and not 0.0 < self.agreement_keep <= 1.0:
            raise ValueError(f"--agreement-keep must be in (0, 1], got {self.agreement_keep}")
        if (self.agreement_min_iou is not None or self.agreement_keep is not None) and not self.agreement_model:
            raise ValueError("--agreement-min-iou / --agreement-keep need --agreement-model")
        if self.mosaic is not None and self.mosaic not in (2, 3):
            raise ValueError(f"--mosaic must be 2 or 3, got {self.mosaic}")
        if self.two_class_fraction > 0 and len(self.classes.classes) < 2:
            raise ValueError("--two-class-fraction needs at least two classes")
        if isinstance(self.threshold, str) and self.threshold not in ("otsu", "adaptive"):
            raise ValueError(f"--threshold must be 'otsu', 'adaptive' or a number, got {self.threshold!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.templates is not None:
            check_templates(self.templates)
        if self.resolutions is not None and (not self.resolutions or min(self.resolutions) < 1):
            raise ValueError(f"--resolutions must be positive map heights, got {self.resolutions}")
        if self.prompt_model is not None and not Path(self.prompt_model).expanduser().is_dir():
            raise FileNotFoundError(f"prompt model folder {self.prompt_model!r} does not exist (--prompt-model takes a local folder)")
        get_pipeline(self.pipeline)
        from diffuseg.models import resolve_model

        resolve_model(self.model)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define the dataset (stored with it; a rerun must match to resume)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME_FIELDS}
        values["classes"] = [dataclasses.asdict(c) for c in self.classes.classes]
        values["templates"] = list(self.prompter_templates())
        values["counterfactual_replacement"] = self.absence
        values["object_contexts"] = self.classes.object_contexts
        if self.prompt_model is not None:
            values["prompt_model"] = os.path.basename(os.path.normpath(self.prompt_model))
        return json.loads(json.dumps(values))

    def pipeline_kwargs(self, requests: Sequence[SampleRequest]) -> dict[str, Any]:
        """The sampling and mask arguments every registered pipeline takes, for one call on ``requests``."""
        import torch

        return dict(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            # CPU generators: the same latents on any device, so a sample's seed regenerates it anywhere.
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            threshold=self.threshold,
            ignore_band=self.ignore_band,
            refine=self.refine,
            min_component_area=self.min_component_area,
        )

    def text_to_image_kwargs(self, requests: Sequence[SampleRequest]) -> dict[str, Any]:
        """A whole DiffuMask-style call on ``requests``: prompts, class words, size, maps and :meth:`pipeline_kwargs`."""
        return dict(
            prompt=[r.prompt for r in requests],
            class_names=[r.words for r in requests],
            height=self.height,
            width=self.width,
            resolutions=self.resolutions,
            output_type="np",
            **self.pipeline_kwargs(requests),
        )

    @property
    def absence(self) -> str:
        """What counterfactual prompts say in place of their objects."""
        return self.classes.absence if self.counterfactual_replacement is None else self.counterfactual_replacement

    def prompter_templates(self) -> tuple[str, ...]:
        return tuple(self.templates or self.classes.templates or DEFAULT_TEMPLATES)

    @property
    def num_samples(self) -> int:
        return self.images_per_class * len(self.classes.classes)

    @property
    def mosaic_slots(self) -> int:
        """Mosaic rows per full shard."""
        return round(self.mosaic_fraction * self.samples_per_shard) if self.mosaic else 0


# =====================================================================================
# the loop


class WorkPlan:
    """Which sample is what: seeds, classes, prompts, and writer slots of samples and mosaics.

    ``WorkPlan(config).request(i, prompter)`` reproduces sample ``i`` (prompt, seed, class
    words) exactly, e.g. to regenerate it.

    Block ``b`` holds generated samples ``b*S .. b*S+S-1`` and up to ``M`` mosaics; in the
    writer it occupies slots ``b*(S+M) ..``, so a block is one shard.
    """

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.S = config.samples_per_shard
        self.M = config.mosaic_slots
        self.num_samples = config.num_samples
        self.num_blocks = math.ceil(self.num_samples / self.S)

    def block_indices(self, block: int) -> range:
        return range(block * self.S, min((block + 1) * self.S, self.num_samples))

    def mosaic_count(self, block: int) -> int:
        return round(self.config.mosaic_fraction * len(self.block_indices(block))) if self.M else 0

    def slot(self, index: int) -> int:
        block, offset = divmod(index, self.S)
        return block * (self.S + self.M) + offset

    def mosaic_slot(self, block: int, j: int) -> int:
        return block * (self.S + self.M) + self.S + j

    def block_slots(self, block: int) -> set[int]:
        slots = {self.slot(i) for i in self.block_indices(block)}
        return slots | {self.mosaic_slot(block, j) for j in range(self.mosaic_count(block))}

    def request(self, index: int, prompter: TemplatePrompter, tokenizer=None) -> SampleRequest:
        """Sample ``index``: its seed, classes and prompt, checked against ``tokenizer``."""
        seed = sample_seed(self.config.seed, index)
        rng = np.random.default_rng(seed)
        class_ids = self.classes_of(index, rng)
        prompt, words = prompter(class_ids, rng)
        try:
            check_prompt(prompt, words, tokenizer)
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from None
        return SampleRequest(index, seed, prompt, class_ids, words)

    def classes_of(self, index: int, rng: np.random.Generator) -> list[int]:
        """Class ids named by sample ``index``: class ``index % C`` first (so every block mixes classes)."""
        num_classes = len(self.config.classes.classes)
        first = index % num_classes + 1
        if self.config.two_class_fraction and rng.random() < self.config.two_class_fraction:
            others = [c for c in range(1, num_classes + 1) if c != first]
            return [first, others[int(rng.integers(len(others)))]]
        return [first]


@dataclass
class GenerationSummary:
    """What :func:`generate_dataset` did (in this process) and what the folder holds."""

    folder: str
    generated: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    mosaics: int = 0
    total_rows: int = 0
    skipped_blocks: int = 0


def distributed_state():
    """accelerate's ``PartialState``, on CPU when there is no GPU (or ``ACCELERATE_USE_CPU`` is set).

    Without ``cpu=True`` accelerate treats CPU processes started by ``accelerate launch`` /
    ``torchrun`` as independent single processes; with it they form a gloo group.
    """
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=use_cpu)


def _resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    return getattr(torch, name)


def generate_dataset(config: GenerationConfig, pipe=None, progress: bool = True) -> GenerationSummary:
    """Generate (or resume) the dataset ``config`` describes, in this process's share of the work.

    Under ``accelerate launch`` each process takes every N-th unfinished shard block, writes
    its own shards, and the main process publishes the folder (``data/``, ``id2label.json``,
    the card) once all are done.

    Args:
        config: the settings.
        pipe: an already loaded pipeline for ``config.pipeline`` (default: load ``config.model``).
        progress: show a progress bar (main process only).

    Raises:
        DatasetMismatchError: ``config.out`` holds a different dataset.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    config.validate()
    spec = get_pipeline(config.pipeline)
    plan = WorkPlan(config)
    state = distributed_state()
    with state.main_process_first():
        writer = DatasetWriter(
            config.out,
            config.classes.names,
            split="train",
            fingerprint=config.fingerprint(),
            samples_per_shard=plan.S + plan.M,
            extra_image_columns=spec.extra_image_columns,
        )
    state.wait_for_everyone()  # every process has read the same finished blocks before anyone writes
    done = writer.completed_indices
    todo = [b for b in range(plan.num_blocks) if not plan.block_slots(b) <= done]
    mine = todo[state.process_index :: state.num_processes]
    summary = GenerationSummary(folder=str(config.out), skipped_blocks=plan.num_blocks - len(todo))

    if mine:
        dtype = _resolve_dtype(config.dtype, state.device)
        if pipe is None:
            pipe = spec.load(config, state.device, dtype)
        tokenizer = getattr(pipe, "tokenizer", None)
        if config.prompt_model:
            prompter = DescriptionPrompter(
                config.prompt_model, config.classes, config.templates, config.prompt_max_new_tokens, state.device
            )
        else:
            prompter = TemplatePrompter(config.classes, config.templates)
        agreement = (
            SegmentationAgreement(config.agreement_model, config.classes.names, state.device)
            if config.agreement_model
            else None
        )
        total = sum(len(plan.block_indices(b)) for b in mine)
        with tqdm(total=total, unit="img", desc="generate", disable=not (progress and state.is_main_process)) as bar:
            for block in mine:
                rows = _make_block(block, plan, spec, pipe, prompter, tokenizer, agreement, summary, bar)
                for slot, row, record in rows:
                    if slot in done:
                        continue
                    if row is None:
                        writer.skip(slot, record)
                    else:
                        writer.add(row, index=slot)
    writer.close(finalize=False)
    state.wait_for_everyone()
    if state.is_main_process:
        writer.finalize()  # publish the shards, then describe what was published
        writer.finalize(describe(config, collect_stats(writer)))
        summary.total_rows = sum(pq.read_metadata(p).num_rows for p in split_files(config.out).get("train", []))
    state.wait_for_everyone()
    if state.is_main_process and summary.total_rows == 0:
        raise ValueError(
            f"the filters rejected every sample ({config.num_samples} generated); loosen --min-mask-area, "
            "--max-ignore-fraction or the agreement filter"
        )
    return summary


_MOSAIC_SKIPPED = "mosaic_too_few_kept"  # a shard kept fewer samples than a mosaic has tiles


def _make_block(block, plan: WorkPlan, spec: PipelineSpec, pipe, prompter, tokenizer, agreement, summary, bar):
    """All rows of one block: (writer slot, encoded row or None, skip record)."""
    config = plan.config
    requests = [plan.request(index, prompter, tokenizer) for index in plan.block_indices(block)]

    results = []  # (request, sample dict with arrays, stats)
    for start in range(0, len(requests), config.batch_size):
        batch = requests[start : start + config.batch_size]
        samples = spec.generate(pipe, batch, config)
        predictions = agreement.predict([np.asarray(s["image"]) for s in samples]) if agreement else None
        for k, (request, sample) in enumerate(zip(batch, samples)):
            label = np.asarray(sample["label"], dtype=np.uint8)
            stats = mask_stats(label, request.class_ids)
            if predictions is not None:
                stats["agreement_iou"] = agreement_iou(label, predictions[k], request.class_ids)
            results.append((request, sample, stats))
        bar.update(len(batch))
    summary.generated += len(results)

    # Filters, in order; the first that fails is the recorded reason.
    rejected: dict[int, str] = {}
    for request, _, stats in results:
        if stats["mask_area"] < config.min_mask_area:
            rejected[request.index] = "min_mask_area"
        elif stats["ignore_fraction"] > config.max_ignore_fraction:
            rejected[request.index] = "max_ignore_fraction"
        elif config.agreement_min_iou is not None and stats["agreement_iou"] < config.agreement_min_iou:
            rejected[request.index] = "agreement_min_iou"
    if config.agreement_keep is not None:
        # DiffuMask's noise learning: keep the best-agreeing fraction (ranked within the block).
        passing = [(-stats["agreement_iou"], r.index) for r, _, stats in results if r.index not in rejected]
        keep = math.ceil(config.agreement_keep * len(passing) - 1e-9)
        for _, index in sorted(passing)[keep:]:
            rejected[index] = "agreement_keep"

    rows, kept = [], []
    for request, sample, stats in results:
        slot = plan.slot(request.index)
        if request.index in rejected:
            reason = rejected[request.index]
            summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
            rows.append((slot, None, {"reason": reason, "seed": request.seed, **stats}))
            continue
        row = _encode_row(sample, request.prompt, request.seed, config, spec, stats)
        rows.append((slot, row, None))
        kept.append((request, row, stats))
    summary.kept += len(kept)

    for j in range(plan.mosaic_count(block)):
        slot = plan.mosaic_slot(block, j)
        grid = config.mosaic
        if len(kept) < grid * grid:
            rows.append((slot, None, {"reason": _MOSAIC_SKIPPED}))
            continue
        # A mosaic's own seed picks its tiles; the tiles' seeds are recorded to regenerate them.
        seed = sample_seed(config.seed, slot, stream=1)
        rng = np.random.default_rng(seed)
        tiles = [kept[t] for t in rng.choice(len(kept), size=grid * grid, replace=False)]
        image, label = mosaic(
            [Image.open(io.BytesIO(row["image"])) for _, row, _ in tiles],
            [Image.open(io.BytesIO(row["label"])) for _, row, _ in tiles],
            grid,
        )
        class_ids = sorted({c for request, _, _ in tiles for c in request.class_ids})
        stats = mask_stats(label, [c for c in class_ids if (label == c).any()] or class_ids)
        if agreement is not None:
            stats["agreement_iou"] = float(np.mean([s["agreement_iou"] for _, _, s in tiles]))
        sample = {"image": image, "label": label}
        for name in spec.extra_image_columns:  # extra images are tiled like the images
            sample[name] = mosaic([Image.open(io.BytesIO(row[name])) for _, row, _ in tiles],
                                  [Image.open(io.BytesIO(row["label"])) for _, row, _ in tiles], grid)[0]
        prompt = " | ".join(row["prompt"] for _, row, _ in tiles)
        tile_seeds = ",".join(str(request.seed) for request, _, _ in tiles)
        rows.append((slot, _encode_row(sample, prompt, seed, config, spec, stats, grid, tile_seeds), None))
        summary.mosaics += 1
    return rows


def _encode_row(sample, prompt, seed, config, spec, stats, grid=0, tiles="") -> dict:
    label = np.asarray(sample["label"], dtype=np.uint8)
    row = {
        "image": encode_png(sample["image"], "RGB"),
        "label": encode_png(label, "L"),
        "classes": sorted(int(c) for c in np.unique(label) if c not in (0, IGNORE_INDEX)),
        "prompt": prompt,
        "seed": seed,
        "pipeline": spec.name,
        "model": config.model,
    }
    for name in spec.extra_image_columns:
        row[name] = encode_png(sample[name], "RGB")
    row.update(stats)
    if config.mosaic:
        row["mosaic"] = grid
        row["mosaic_tiles"] = tiles
    return row


# =====================================================================================
# the card


def collect_stats(writer: DatasetWriter) -> dict[str, Any]:
    """Rows per class, mosaics and rejections per filter, read back from the shards."""
    import pyarrow.parquet as pq

    per_class = {name: 0 for name in writer.class_names}
    rows = mosaics = 0
    for path in split_files(writer.folder).get(writer.split, []):
        columns = ["classes", "mosaic"] if "mosaic" in pq.read_schema(path).names else ["classes"]
        table = pq.read_table(path, columns=columns).to_pydict()
        for classes, is_mosaic in zip(table["classes"], table.get("mosaic") or [0] * len(table["classes"])):
            rows += 1
            if is_mosaic:
                mosaics += 1
                continue
            for c in classes:
                per_class[writer.class_names[c - 1]] += 1
    rejected: dict[str, int] = {}
    mosaics_skipped = 0
    for record in writer.skip_records().values():
        reason = record.get("reason", "unknown")
        if reason == _MOSAIC_SKIPPED:
            mosaics_skipped += 1
        else:
            rejected[reason] = rejected.get(reason, 0) + 1
    return {"per_class": per_class, "rows": rows, "mosaics": mosaics, "rejected": rejected,
            "mosaics_skipped": mosaics_skipped}


def describe(config: GenerationConfig, stats: Mapping[str, Any]) -> str:
    """Markdown for the card: how the set was made, with every setting and count."""
    size = f"{config.height or 'native'}×{config.width or 'native'}"
    lines = [
        f"Generated by `diffuseg generate` with the **{config.pipeline}** pipeline from the model "
        f"`{config.model}`: {stats['rows']} rows ({stats['mosaics']} of them mosaics), "
        f"{config.images_per_class} prompts per class, seed {config.seed}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| image size | {size} |",
        f"| denoising steps | {config.num_inference_steps} |",
        f"| guidance scale | {config.guidance_scale} |",
        f"| negative prompt | {config.negative_prompt or '—'} |",
        f"| cross-attention resolutions | {', '.join(map(str, config.resolutions)) if config.resolutions else 'all'} |",
        f"| mask threshold | {config.threshold} |",
        f"| ignore band (→ 255) | {config.ignore_band} |",
        f"| self-attention refinement | {'yes' if config.refine else 'no'} |",
        f"| smallest kept component | {config.min_component_area} px |",
        f"| prompts naming two classes | {config.two_class_fraction:.0%} |",
        *([f"| counterfactual prompts | the class words{' and their context' if config.classes.object_contexts else ''} "
           f"replaced by \"{config.absence}\" |"] if config.pipeline == "counterfactual" else []),
        f"| samples per shard | {config.samples_per_shard} |",
        "",
        "### Prompts",
        "",
    ]
    if config.prompt_model:
        lines.append(
            f"MagicSeg-style descriptions written by the local language model "
            f"`{os.path.basename(os.path.normpath(config.prompt_model))}` (at most {config.prompt_max_new_tokens} new "
            "tokens, sampled with each sample's seed), each starting with a template below so that it names its classes."
        )
    else:
        lines.append("Each prompt is a random template, class word (synonym) and context phrase:")
    lines += ["", *[f"- `{t}`" for t in config.prompter_templates()], ""]
    lines += ["| id | class | prompt words | context phrases | rows containing it |", "|---|---|---|---|---|"]
    for k, spec in enumerate(config.classes.classes, start=1):
        contexts = ", ".join(spec.contexts) or "—"
        lines.append(f"| {k} | {spec.name} | {', '.join(spec.words)} | {contexts} | {stats['per_class'][spec.name]} |")
    lines += ["", "### Quality filters", ""]
    filters = [
        f"- smallest named class covers at least {config.min_mask_area:.2%} of the image (`mask_area`)",
        f"- at most {config.max_ignore_fraction:.2%} ignore pixels (`ignore_fraction`)",
    ]
    if config.agreement_model:
        filters.append(
            f"- agreement with the segmentation model `{config.agreement_model}` (`agreement_iou`: mean IoU over "
            "the named classes, ignore pixels excluded)"
            + (f"; at least {config.agreement_min_iou}" if config.agreement_min_iou is not None else "")
            + (f"; best {config.agreement_keep:.0%} of each shard kept" if config.agreement_keep is not None else "")
        )
    lines += filters
    rejected = stats["rejected"]
    lines += ["", "Rejected samples: " + (", ".join(f"{n} by `{r}`" for r, n in sorted(rejected.items())) or "none") + "."]
    lines += [
        "",
        "Per-sample columns besides those of every diffuseg dataset: `mask_area` (area fraction of the smallest "
        "named class), `ignore_fraction` (share of 255 pixels)"
        + (", `agreement_iou`" if config.agreement_model else "")
        + (", `mosaic` (0, or the grid size of a mosaic) and `mosaic_tiles` (the tiles' seeds)" if config.mosaic else "")
        + ".",
    ]
    if config.mosaic:
        lines += [
            "",
            f"### Mosaics\n\n{config.mosaic}×{config.mosaic} mosaics of kept samples (images and label maps tiled "
            f"together), {config.mosaic_fraction:.0%} as many as generated samples, tiles drawn within each shard"
            + (f"; {stats['mosaics_skipped']} not made (too few kept samples in their shard)."
               if stats["mosaics_skipped"] else "."),
        ]
    lines += [
        "",
        "### Reproducing a sample",
        "",
        "Each row's `seed` seeds its prompt choices and its initial latents (a CPU `torch.Generator`); with the "
        "settings below, `prompt` and `seed` regenerate the image and mask.",
        "",
        "```json",
        json.dumps(config.fingerprint(), indent=1, ensure_ascii=False),
        "```",
    ]
    return "\n".join(lines)


# =====================================================================================
# dataset scripts (dataset_scripts/*.py)


def run_dataset_script(settings: Mapping[str, Any], description: str, argv: Sequence[str] | None = None) -> int:
    """Command line of a ready dataset script: fixed ``settings``, a few run-time options.

    ``settings`` are :class:`GenerationConfig` fields (``classes`` as a preset/spec string)
    written down in the script; the command line may change where the data goes, how much
    of it, the model location, the seed, and how the work runs; ``--push`` uploads the result.
    Works under ``accelerate launch``.
    """
    import argparse

    settings = dict(settings)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=settings.pop("out"), help="dataset folder (default: %(default)s)")
    parser.add_argument("--images-per-class", type=int, default=settings.pop("images_per_class"),
                        help="prompts per class (default: %(default)s)")
    parser.add_argument("--model", default=settings.pop("model"), help="model id or folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=settings.pop("seed", 0), help="run seed (default: %(default)s)")
    parser.add_argument("--agreement-model", help="segmentation model for the agreement filter (optional)")
    parser.add_argument("--batch-size", type=int, default=settings.pop("batch_size", 8),
                        help="prompts per pipeline call (default: %(default)s)")
    parser.add_argument("--samples-per-shard", type=int, default=settings.pop("samples_per_shard", 256),
                        help="generated samples per shard (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    parser.add_argument("--push", metavar="REPO", help="upload the finished dataset to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo as private")
    args = parser.parse_args(argv)
    agreement_keep = settings.pop("agreement_keep", None)
    config = GenerationConfig(
        out=args.out,
        classes=parse_classes(settings.pop("classes")),
        images_per_class=args.images_per_class,
        model=args.model,
        seed=args.seed,
        agreement_model=args.agreement_model,
        agreement_keep=agreement_keep if args.agreement_model else None,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        dtype=args.dtype,
        **settings,
    )
    summary = generate_dataset(config)
    if distributed_state().is_main_process:
        print(f"{summary.folder}: {summary.total_rows} rows")
        if args.push:
            from diffuseg.commands.push import plan_upload, push_dataset

            print(f"uploaded: {push_dataset(plan_upload(args.out, args.push, args.private))}")
    return 0
