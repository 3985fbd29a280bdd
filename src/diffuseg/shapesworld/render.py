"""ShapesWorld scenes: coloured shapes on plain or textured backgrounds, with exact label maps.

Every shape is pure geometry in its own frame (centre at the origin, size 1); rendering
tests each *pixel centre* against that geometry, so the image and the label map come from
the same test and the label map is exact for the image (hard edges, no anti-aliasing).
Later objects are drawn over earlier ones; the label map keeps the topmost object.

A scene is a small dataclass and is fully determined by the random generator that sampled
it, so every dataset sample is reproducible from its ``seed`` column alone
(:func:`scene_from_seed`).

>>> import numpy as np
>>> scene = sample_scene(np.random.default_rng(0))
>>> image, label = render(scene, size=64)          # uint8 (64, 64, 3), uint8 (64, 64)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
"""Every shape the renderer draws; a dataset or a model uses a prefix or a subset of these."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (145, 60, 205),
    "orange": (245, 135, 25),
    "cyan": (35, 200, 215),
    "pink": (240, 110, 185),
}
"""Object palette. All colours are saturated and backgrounds are near-grey, so an object
pixel is told from the background by saturation and named by its nearest palette colour."""

DEFAULT_SHAPES: tuple[str, ...] = SHAPES[:3]
DEFAULT_COLORS: tuple[str, ...] = tuple(COLORS)[:6]

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("blue", "circle"),
        ("green", "square"),
        ("yellow", "star"),
        ("purple", "ring"),
        ("orange", "cross"),
    }
)
"""(colour, shape) pairs that never occur in the train split, to test composition."""

SPLITS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}

BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "gradient")

COLOR_JITTER = 18
"""Maximum per-channel deviation of an object's colour from its palette entry."""


@dataclass(frozen=True)
class ShapeSpec:
    """One object. Geometry is in fractions of the image side, so a scene renders at any size.

    ``radius`` is the shape's nominal radius (a circle's radius; the other shapes are sized to
    look about as large); ``angle`` rotates the shape (radians, counter-clockwise on screen).
    """

    shape: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float = 0.0


@dataclass(frozen=True)
class Background:
    """A plain near-grey background, or a low-contrast texture of two near-grey tones."""

    kind: str = "plain"
    rgb: tuple[int, int, int] = (128, 128, 128)
    rgb2: tuple[int, int, int] = (128, 128, 128)
    period: float = 0.15
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (the last one is on top) over a background."""

    objects: tuple[ShapeSpec, ...]
    background: Background = field(default_factory=Background)


# ---------------------------------------------------------------------------------------
# geometry


def _star_polygon(points: int = 5, outer: float = 1.15, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = _star_polygon()
_TRIANGLE_INRADIUS = 0.6  # circumradius 1.2, pointing up (image y grows downwards)


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd crossing test of points (u, v) against a closed polygon (N, 2)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in the shape's own frame (centre 0, radius 1), are inside ``shape``."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):  # edge normals
            inside &= u * np.cos(a) + v * np.sin(a) <= _TRIANGLE_INRADIUS
        return inside
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((au <= 1.0) & (av <= 0.34))
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every pixel centre of a ``size``² image, in fractions of the side."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")


def object_mask(obj: ShapeSpec, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the pixels whose centres lie inside ``obj``."""
    x, y = pixel_centres(size)
    dx, dy = (x - obj.cx) / obj.radius, (y - obj.cy) / obj.radius
    # rotate the pixel into the shape's frame (screen y points down, so negate the angle)
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    u, v = c * dx - s * dy, s * dx + c * dy
    return shape_mask(obj.shape, u, v)


def render_background(background: Background, size: int) -> np.ndarray:
    """The background of a scene as a uint8 (size, size, 3) image."""
    a = np.asarray(background.rgb, dtype=np.float64)
    b = np.asarray(background.rgb2, dtype=np.float64)
    x, y = pixel_centres(size)
    t = x * np.cos(background.angle) + y * np.sin(background.angle)
    if background.kind == "plain":
        weight = np.zeros_like(x)
    elif background.kind == "stripes":
        weight = (np.floor(t / background.period) % 2).astype(np.float64)
    elif background.kind == "checker":
        weight = ((np.floor(x / background.period) + np.floor(y / background.period)) % 2).astype(np.float64)
    elif background.kind == "gradient":
        weight = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    else:
        raise ValueError(f"unknown background {background.kind!r}; known: {', '.join(BACKGROUNDS)}")
    image = a + weight[..., None] * (b - a)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 64, classes: Sequence[str] = SHAPES) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``scene``: an RGB uint8 (size, size, 3) image and its exact uint8 (size, size) label map.

    Label 0 is background; an object's label is its shape's index in ``classes`` plus 1.
    """
    image = render_background(scene.background, size)
    label = np.zeros((size, size), dtype=np.uint8)
    for obj in scene.objects:
        if obj.shape not in classes:
            raise ValueError(f"shape {obj.shape!r} is not in the class list {list(classes)}")
        mask = object_mask(obj, size)
        image[mask] = obj.rgb
        label[mask] = classes.index(obj.shape) + 1
    return image, label


def visible_masks(scene: Scene, size: int) -> list[np.ndarray]:
    """Per object (in drawing order), the pixels where it is visible (not covered by a later one)."""
    masks = [object_mask(obj, size) for obj in scene.objects]
    covered = np.zeros((size, size), dtype=bool)
    visible: list[np.ndarray] = [np.zeros(0)] * len(masks)
    for i in range(len(masks) - 1, -1, -1):
        visible[i] = masks[i] & ~covered
        covered |= masks[i]
    return visible


# ---------------------------------------------------------------------------------------
# sampling


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int) -> tuple[int, int, int]:
    values = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(c) for c in np.clip(values, 0, 255))


def sample_background(rng: np.random.Generator, textured_prob: float = 0.5) -> Background:
    """A near-grey background: plain, or one of the low-contrast textures."""
    grey = int(rng.integers(70, 200))
    rgb = _jitter(rng, (grey, grey, grey), 6)
    if rng.random() >= textured_prob:
        return Background("plain", rgb, rgb)
    kind = str(rng.choice(BACKGROUNDS[1:]))
    other = int(np.clip(grey + rng.choice([-1, 1]) * rng.integers(20, 45), 40, 230))
    return Background(
        kind, rgb, _jitter(rng, (other, other, other), 6), float(rng.uniform(0.08, 0.2)), float(rng.uniform(0, np.pi))
    )


def sample_scene(
    rng: np.random.Generator,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    n_objects: int | tuple[int, int] = (1, 2),
    radius: tuple[float, float] = (12 / 64, 24 / 64),
    max_rotation: float = 0.0,
    min_visible: float = 0.6,
    textured_prob: float = 0.5,
    held_out: str = "allow",
) -> Scene:
    """A random scene.

    Args:
        rng: the only source of randomness, so a scene is reproducible from its generator.
        shapes, colors: the vocabulary of the world.
        n_objects: a count, or an inclusive (min, max) range sampled uniformly.
        radius: range of object radii, in fractions of the image side.
        max_rotation: objects are rotated uniformly within ± this many radians.
        min_visible: every object keeps at least this fraction of its area visible.
        textured_prob: probability of a textured (rather than plain) background.
        held_out: ``"exclude"`` never uses :data:`HELD_OUT_PAIRS`; ``"allow"`` treats them as any
            other pair; ``"only"`` makes the first object a held-out pair.
    """
    if held_out not in ("exclude", "allow", "only"):
        raise ValueError(f"held_out must be 'exclude', 'allow' or 'only', got {held_out!r}")
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    for name in colors:
        if name not in COLORS:
            raise ValueError(f"unknown colour {name!r}; known colours: {', '.join(COLORS)}")
    pairs = [(c, s) for s in shapes for c in colors]
    allowed = [p for p in pairs if p not in HELD_OUT_PAIRS] if held_out == "exclude" else pairs
    held = [p for p in pairs if p in HELD_OUT_PAIRS]
    if held_out == "only" and not held:
        raise ValueError("no held-out pair exists among these shapes and colours")
    count = n_objects if isinstance(n_objects, int) else int(rng.integers(n_objects[0], n_objects[1] + 1))
    background = sample_background(rng, textured_prob)

    size = 64  # the occlusion check runs at the nominal resolution
    objects: list[ShapeSpec] = []
    used: set[str] = set()
    for index in range(count):
        # distinct colours, so every object stays separable where objects touch
        choices = held if (held_out == "only" and index == 0) else [p for p in allowed if p[0] not in used]
        color, shape = choices[int(rng.integers(len(choices)))]
        used.add(color)
        rgb = _jitter(rng, COLORS[color], COLOR_JITTER)
        lo, hi = radius
        for attempt in range(100):
            # shrink after repeated failures so crowded scenes still fit
            r = float(rng.uniform(lo, hi)) * (0.97 ** (attempt // 10))
            margin = r * 1.2  # triangle and star points reach 1.2 r
            cx, cy = rng.uniform(margin, 1 - margin, size=2) if margin < 0.5 else (0.5, 0.5)
            angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation else 0.0
            candidate = ShapeSpec(shape, color, rgb, float(cx), float(cy), r, angle)
            trial = Scene((*objects, candidate), background)
            full = [object_mask(o, size).sum() for o in trial.objects]
            vis = [m.sum() for m in visible_masks(trial, size)]
            if all(v >= min_visible * f for v, f in zip(vis, full)):
                objects.append(candidate)
                break
        else:
            raise RuntimeError("could not place an object; use fewer or smaller objects")
    return Scene(tuple(objects), background)


CAPTION_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("a {0}", "a picture of a {0}", "one {0}", "a {0} on a background"),
    2: ("a {0} and a {1}", "a {0} next to a {1}", "a {0} with a {1}", "a picture of a {0} and a {1}"),
    3: ("a {0}, a {1} and a {2}", "a {0} with a {1} and a {2}"),
}
EMPTY_SCENE_WORD = "background"
"""What an empty scene's caption names instead of an object, and so what a counterfactual
prompt says in place of the objects it removes ("a picture of a red circle" → "a picture of a
background"). The world's tokenizer knows the word, so the shipped vocabulary stays as it is."""
CAPTION_TEMPLATES[0] = tuple(template.format(EMPTY_SCENE_WORD) for template in CAPTION_TEMPLATES[1])


def caption(scene: Scene, rng: np.random.Generator, name_colors: bool = True) -> str:
    """A caption naming every object by colour and shape (by shape only if not ``name_colors``),
    in a random order and template.

    A scene without objects is captioned as a one-object scene whose object is
    :data:`EMPTY_SCENE_WORD` ("a picture of a background").
    """
    names = [f"{o.color} {o.shape}" if name_colors else o.shape for o in scene.objects]
    order = rng.permutation(len(names))
    templates = CAPTION_TEMPLATES[len(names)]
    return templates[int(rng.integers(len(templates)))].format(*(names[i] for i in order))


def world_words(shapes: Sequence[str] = SHAPES, colors: Sequence[str] = tuple(COLORS)) -> list[str]:
    """Every word a caption can use (the vocabulary of the world's tokenizer)."""
    words: dict[str, None] = {}
    for templates in CAPTION_TEMPLATES.values():
        for template in templates:
            for word in template.replace(",", " , ").split():
                if not word.startswith("{"):
                    words[word] = None
    words.update(dict.fromkeys(colors))
    words.update(dict.fromkeys(shapes))
    return list(words)


@dataclass(frozen=True)
class ModelWorld:
    """The world a ShapesWorld model was trained on, and how far it was trained."""

    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    image_size: int
    unet_step: int | None = None
    vae_psnr: float | None = None


def model_world(model_dir: str | Path) -> ModelWorld:
    """Read :class:`ModelWorld` from a pipeline folder's ``training_state.json`` (written by the
    training script); a folder without one (not trained here) gets the renderer's defaults."""
    path = Path(model_dir) / "training_state.json"
    if not path.is_file():
        return ModelWorld(DEFAULT_SHAPES, DEFAULT_COLORS, 64)
    saved = json.loads(path.read_text())
    config, state = saved.get("config", {}), saved.get("state", {})
    return ModelWorld(
        tuple(config.get("shapes", DEFAULT_SHAPES)), tuple(config.get("colors", DEFAULT_COLORS)),
        int(config.get("image_size", 64)), state.get("step"), state.get("vae_psnr"),
    )


# ---------------------------------------------------------------------------------------
# dataset samples


def sample_seed(seed: int, split: str, index: int) -> int:
    """The seed of sample ``index`` of ``split``: independent streams per split and sample."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    state = np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) | (int(state[1]) >> 1))


def scene_from_seed(
    seed: int, split: str = "train", *, shapes: Sequence[str] = DEFAULT_SHAPES, colors: Sequence[str] = DEFAULT_COLORS,
    **scene_kwargs,
) -> tuple[Scene, str]:
    """The scene and caption of the sample whose ``seed`` column is ``seed`` (train never holds held-out pairs)."""
    rng = np.random.default_rng(seed)
    scene_kwargs.setdefault("held_out", "exclude" if split == "train" else "allow")
    scene = sample_scene(rng, shapes, colors, **scene_kwargs)
    return scene, caption(scene, rng)


def make_sample(
    split: str,
    index: int,
    seed: int = 0,
    *,
    size: int = 64,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    **scene_kwargs,
) -> dict:
    """Row ``index`` of ``split`` in the package's dataset columns.

    ``image`` (PIL RGB), ``label`` (PIL mode L, 0 background, shape index in ``shapes`` + 1),
    ``classes`` (label ids present), ``prompt``, ``seed`` (regenerates the row with
    :func:`scene_from_seed`), ``pipeline`` and ``model``.
    """
    from PIL import Image

    row_seed = sample_seed(seed, split, index)
    scene, prompt = scene_from_seed(row_seed, split, shapes=shapes, colors=colors, **scene_kwargs)
    image, label = render(scene, size, classes=shapes)
    return {
        "image": Image.fromarray(image),
        "label": Image.fromarray(label),
        "classes": sorted(int(c) for c in np.unique(label) if c != 0),
        "prompt": prompt,
        "seed": row_seed,
        "pipeline": "render",
        "model": "shapesworld-renderer",
    }


def iter_samples(split: str, n: int, seed: int = 0, *, start: int = 0, **kwargs) -> Iterator[dict]:
    """Rows ``start .. n-1`` of ``split`` (see :func:`make_sample` for the columns and options)."""
    for index in range(start, n):
        yield make_sample(split, index, seed, **kwargs)
