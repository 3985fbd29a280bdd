"""Read ShapesWorld objects back from any image by geometry: which colours, which shapes, where.

This is the judge of the ShapesWorld model: it knows nothing learned. Object pixels are
the saturated ones (backgrounds are near-grey); each is named by its nearest palette
colour; each colour region is then fitted by every shape template (centre, size and
rotation searched to maximise IoU, ignoring pixels covered by other objects, which may
hide part of it) and takes the shape that fits best. On rendered scenes it recovers every
object (see the tests and ``benchmarks/shapesworld_quality.py``), so on generated images
its failures are the generator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from diffuseg.shapesworld.render import COLORS, DEFAULT_COLORS, DEFAULT_SHAPES, ShapeSpec, object_mask

MIN_CHROMA = 45
"""max(RGB) - min(RGB) above which a pixel belongs to an object (backgrounds stay below ~15)."""
MAX_COLOR_DISTANCE = 110.0
"""Object pixels farther than this (RGB distance) from every palette colour are left unnamed."""
MIN_AREA_FRACTION = 0.01
"""Colour regions smaller than this fraction of the image are noise, not objects."""

_OPENING = np.ones((3, 3), dtype=bool)

# rotational symmetry of each shape: rotations are searched within one period
_PERIOD = {"circle": 0.0, "ring": 0.0, "square": np.pi / 2, "cross": np.pi / 2, "triangle": 2 * np.pi / 3,
           "star": 2 * np.pi / 5}


@dataclass
class Detection:
    """One object found in an image: its colour, its best-fitting shape and how well each shape fits."""

    color: str
    shape: str
    iou: float
    mask: np.ndarray
    scores: dict[str, float]
    fit: ShapeSpec


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of ``shape`` at radius 1 (measured on a fine grid)."""
    size = 400
    spec = ShapeSpec(shape, "red", (0, 0, 0), 0.5, 0.5, 0.4)
    return float(object_mask(spec, size).mean()) / 0.4**2


def color_regions(
    image: np.ndarray, colors: Sequence[str] = DEFAULT_COLORS, min_area_fraction: float = MIN_AREA_FRACTION
) -> dict[str, np.ndarray]:
    """Boolean mask per palette colour present in ``image`` (uint8 H×W×3): saturated pixels, nearest colour.

    Each mask is opened with a 3×3 square, so bands under 3 px wide go: where two objects
    meet, a decoder's soft edge blends their colours into a third (red and yellow make an
    orange seam), which is not an object. Then only connected components of at least
    ``min_area_fraction`` of the image stay (an occluded object may be split in two).
    """
    rgb = image.astype(np.float64)
    chroma = rgb.max(-1) - rgb.min(-1)
    palette = np.asarray([COLORS[c] for c in colors], dtype=np.float64)
    distance = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)
    named = (chroma >= MIN_CHROMA) & (distance.min(-1) <= MAX_COLOR_DISTANCE)
    min_area = min_area_fraction * image.shape[0] * image.shape[1]
    regions = {}
    for index, color in enumerate(colors):
        mask = ndimage.binary_opening(named & (nearest == index), structure=_OPENING)
        if mask.sum() < min_area:
            continue
        components, count = ndimage.label(mask)
        if count == 0:
            continue
        areas = ndimage.sum(mask, components, index=np.arange(1, count + 1))
        keep = np.flatnonzero(areas >= min_area) + 1
        if len(keep):
            regions[color] = np.isin(components, keep)
    return regions


HIDDEN_WEIGHT = 0.3
"""Cost of a template pixel that falls on another object: it may be occluded there, or not."""


def _fit_iou(template: np.ndarray, mask: np.ndarray, hidden: np.ndarray) -> float:
    inter = np.count_nonzero(template & mask)
    union = np.count_nonzero((template | mask) & ~hidden) + HIDDEN_WEIGHT * np.count_nonzero(template & hidden)
    return inter / union if union else 0.0


def fit_shape(
    shape: str, mask: np.ndarray, hidden: np.ndarray | None = None, angles: int = 4
) -> tuple[float, ShapeSpec]:
    """Best IoU of ``shape`` against ``mask`` and the fitted geometry.

    Template pixels in ``hidden`` (other objects, which may cover this one) cost only
    :data:`HIDDEN_WEIGHT` of a miss. The search starts from the centroid and the area-matched radius at
    ``angles`` rotations within the shape's symmetry period, then moves centre, radius and
    rotation greedily while the IoU improves.
    """
    size = mask.shape[0]
    hidden = hidden if hidden is not None else np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    r0 = np.sqrt(mask.sum() / _unit_area(shape)) / size
    period = _PERIOD[shape]
    starts = [period * k / angles for k in range(angles)] if period else [0.0]
    best_iou, best = -1.0, None
    for angle in starts:
        params = np.array([cx, cy, r0, angle])
        steps = np.array([1.0 / size, 1.0 / size, 0.04 * r0, period / (4 * angles) if period else 0.0])

        def score(p: np.ndarray) -> float:
            spec = ShapeSpec(shape, "", (0, 0, 0), float(p[0]), float(p[1]), max(float(p[2]), 1e-3), float(p[3]))
            return _fit_iou(object_mask(spec, size), mask, hidden)

        current = score(params)
        for _ in range(3):  # shrink the steps twice once no move helps
            improved = True
            while improved:
                improved = False
                for axis in range(4):
                    if steps[axis] == 0:
                        continue
                    for sign in (1, -1):
                        trial = params.copy()
                        trial[axis] += sign * steps[axis]
                        value = score(trial)
                        if value > current + 1e-9:
                            params, current, improved = trial, value, True
                            break
            steps = steps / 2
        if current > best_iou:
            best_iou = current
            best = ShapeSpec(shape, "", (0, 0, 0), *(float(v) for v in params))
    return best_iou, best


def recognize(
    image: np.ndarray, shapes: Sequence[str] = DEFAULT_SHAPES, colors: Sequence[str] = DEFAULT_COLORS
) -> list[Detection]:
    """Every object in ``image`` (uint8 H×W×3): its colour, its best-fitting shape among ``shapes``, its mask."""
    regions = color_regions(image, colors)
    detections = []
    for color, mask in regions.items():
        hidden = np.zeros_like(mask)
        for other, other_mask in regions.items():
            if other != color:
                hidden |= other_mask
        scores, fits = {}, {}
        for shape in shapes:
            scores[shape], fits[shape] = fit_shape(shape, mask, hidden)
        shape = max(scores, key=scores.get)
        best = fits[shape]
        fit = ShapeSpec(shape, color, COLORS[color], best.cx, best.cy, best.radius, best.angle)
        detections.append(Detection(color, shape, scores[shape], mask, scores, fit))
    return detections


def prompt_fidelity(
    detections: Sequence[Detection], prompted: Sequence[tuple[str, str]]
) -> dict[str, bool]:
    """Whether an image shows what its prompt asked for.

    ``prompted`` lists (colour, shape) pairs. Returns ``colors`` (every prompted colour is
    present), ``shapes`` (every prompted colour has the prompted shape), ``no_extra`` (no
    object of an unprompted colour) and ``faithful`` (all three).
    """
    found = {d.color: d.shape for d in detections}
    colors_ok = all(c in found for c, _ in prompted)
    shapes_ok = all(found.get(c) == s for c, s in prompted)
    no_extra = set(found) <= {c for c, _ in prompted}
    faithful = colors_ok and shapes_ok and no_extra
    return {"colors": colors_ok, "shapes": shapes_ok, "no_extra": no_extra, "faithful": faithful}
