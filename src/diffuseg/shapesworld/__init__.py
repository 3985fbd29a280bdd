"""ShapesWorld: rendered scenes with exact label maps, and the tiny in-house text-to-image model.

The renderer (:mod:`diffuseg.shapesworld.render`) draws coloured shapes with exact label
maps and captions; :mod:`diffuseg.shapesworld.train` trains the embedded default model on
the captions (never on the masks); :mod:`diffuseg.shapesworld.recognize` reads shapes and
colours back from any image by geometry, to measure what a generator drew.
"""

from diffuseg.shapesworld.dataset import write_real_dataset
from diffuseg.shapesworld.render import (
    COLORS,
    DEFAULT_COLORS,
    DEFAULT_SHAPES,
    HELD_OUT_PAIRS,
    SHAPES,
    Background,
    ModelWorld,
    Scene,
    ShapeSpec,
    caption,
    iter_samples,
    make_sample,
    model_world,
    object_mask,
    render,
    sample_scene,
    scene_from_seed,
    visible_masks,
    world_words,
)

__all__ = [
    "COLORS",
    "DEFAULT_COLORS",
    "DEFAULT_SHAPES",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "Background",
    "ModelWorld",
    "Scene",
    "ShapeSpec",
    "caption",
    "iter_samples",
    "make_sample",
    "model_world",
    "object_mask",
    "render",
    "sample_scene",
    "scene_from_seed",
    "visible_masks",
    "world_words",
    "write_real_dataset",
]
