"""Mosaics: 2×2 / 3×3 tiles of images and their label maps (DiffuMask's augmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


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
