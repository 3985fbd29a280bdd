"""Classes of a generated dataset: presets (``voc20``, ``coco80``, ``shapes``), comma lists or files,
each class with the words that may name it in a prompt (synonyms) and context phrases."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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

    What a counterfactual removes and says instead is the model's business, not the classes'
    (:class:`diffuseg.models.ModelDefaults`).
    """

    classes: tuple[ClassSpec, ...]
    templates: tuple[str, ...] | None = None
    source: str = "list"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]


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
    from diffuseg.shapesworld.render import CAPTION_TEMPLATES, DEFAULT_COLORS, DEFAULT_SHAPES

    classes = tuple(ClassSpec(shape, (), tuple(DEFAULT_COLORS)) for shape in DEFAULT_SHAPES)
    templates = tuple(t.replace("{0}", "{context} {class}") for t in CAPTION_TEMPLATES[1])
    return ClassSet(classes, templates, source="shapes")


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
