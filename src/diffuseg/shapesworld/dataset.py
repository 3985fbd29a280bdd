"""The "real" ShapesWorld dataset: rendered scenes with exact label maps, in the Hub layout."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tqdm.auto import tqdm

from diffuseg.shapesworld.render import DEFAULT_COLORS, DEFAULT_SHAPES, HELD_OUT_PAIRS, make_sample


def write_real_dataset(
    folder: str | os.PathLike,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    *,
    size: int = 64,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    colors: Sequence[str] = DEFAULT_COLORS,
    samples_per_shard: int = 1000,
    **scene_kwargs,
) -> str:
    """Render the train / validation / test splits into ``folder`` (readable with ``load_dataset``).

    Label ids are ``shapes`` indices + 1. The train split never shows a pair of
    :data:`~diffuseg.shapesworld.render.HELD_OUT_PAIRS`; validation and test may. Resumable:
    rows already on disk are not rendered again, and a folder written with other settings is
    refused (the fingerprint differs). ``scene_kwargs`` go to
    :func:`~diffuseg.shapesworld.render.sample_scene` (e.g. ``n_objects=(1, 3)``).
    """
    from diffuseg.data import DatasetWriter

    fingerprint = {
        "generator": "diffuseg.shapesworld.render",
        "seed": seed,
        "size": size,
        "shapes": list(shapes),
        "colors": list(colors),
        "held_out_pairs": sorted(HELD_OUT_PAIRS),
        "scene": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(scene_kwargs.items())},
    }
    for split, count in (("train", n_train), ("validation", n_val), ("test", n_test)):
        writer = DatasetWriter(
            folder, class_names=list(shapes), split=split, fingerprint={**fingerprint, "split": split},
            samples_per_shard=samples_per_shard,
        )
        done = set(writer.completed_indices)
        for index in tqdm(range(count), desc=f"ShapesWorld {split}", mininterval=5):
            if index not in done:
                row = make_sample(split, index, seed, size=size, shapes=shapes, colors=colors, **scene_kwargs)
                writer.add(row, index=index)
        writer.close(
            description=f"Rendered ShapesWorld scenes ({split}): exact label maps from the renderer's geometry; "
            f"seed {seed}; held-out colour-shape pairs {'excluded' if split == 'train' else 'allowed'}."
        )
    return os.fspath(folder)
