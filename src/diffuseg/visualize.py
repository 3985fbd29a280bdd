"""Colour overlays of label maps, with a legend: for the CLI, the Space and notebooks.

>>> from diffuseg.visualize import overlay, palette
>>> picture = overlay(image, labels, ["cat", "dog", "background"], background_id=2)
>>> picture.save("overlay.png")
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

_GOLDEN_RATIO = 0.618033988749895


def palette(n: int) -> np.ndarray:
    """``n`` distinct, saturated RGB colours, ``uint8`` ``(n, 3)``; the first ones stay the same for any ``n``.

    Hues step by the golden ratio (neighbouring ids get far-apart hues); brightness and
    saturation alternate so that colours whose hues come close still differ.
    """
    if n < 0:
        raise ValueError(f"palette size must be non-negative, got {n}")
    colours = []
    for i in range(n):
        hue = (i * _GOLDEN_RATIO) % 1.0
        saturation = (0.85, 0.6)[(i // 2) % 2]
        value = (0.95, 0.7)[i % 2]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)


def overlay(
    image,
    label_map,
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    background_id: int | None = None,
    legend: bool = True,
) -> PIL.Image.Image:
    """``image`` with each class's pixels tinted in its :func:`palette` colour, and a legend below.

    Args:
        image: PIL image or ``(H, W)`` / ``(H, W, 3|4)`` ``uint8`` array (converted to RGB).
        label_map: ``(H, W)`` integer ids, PIL or array, the size of ``image``; id ``k`` is
            ``class_names[k]``. Ids outside ``class_names`` (e.g. 255, ignore) and
            ``background_id`` are left untinted.
        class_names: the name of each id.
        alpha: opacity of the tint.
        background_id: id drawn untinted (listed in the legend without a swatch colour).
        legend: append a legend of the ids present (colour swatch and name).

    Returns:
        An RGB PIL image: the overlay, with the legend under it when ``legend`` is set.
    """
    base = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(np.asarray(image))
    base = base.convert("RGB")
    labels = np.asarray(label_map).astype(np.int64)
    if labels.shape != (base.height, base.width):
        raise ValueError(f"label map of shape {labels.shape} does not match the {base.width}x{base.height} image")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = palette(len(class_names))
    pixels = np.asarray(base, dtype=np.float32)
    tinted = (labels >= 0) & (labels < len(class_names))
    if background_id is not None:
        tinted &= labels != background_id
    colour_of = colours[np.where(tinted, labels, 0)].astype(np.float32)
    pixels = np.where(tinted[..., None], (1 - alpha) * pixels + alpha * colour_of, pixels)
    picture = PIL.Image.fromarray(np.round(pixels).astype(np.uint8))
    if not legend:
        return picture
    present = [int(i) for i in np.unique(labels) if 0 <= i < len(class_names)]
    return _with_legend(picture, [(class_names[i], None if i == background_id else colours[i]) for i in present])


def _with_legend(picture: PIL.Image.Image, entries: list[tuple[str, np.ndarray | None]]) -> PIL.Image.Image:
    """``picture`` above rows of (swatch, name) entries, wrapped to the picture's width (at least 160 px)."""
    font = PIL.ImageFont.load_default(size=12)
    swatch, gap, line = 12, 8, 18
    widths = [swatch + 4 + int(font.getlength(name)) for name, _ in entries]
    width = max(picture.width, 160, *(w + 2 * gap for w in widths))
    rows, x = [[]], gap
    for entry, entry_width in zip(entries, widths):
        if rows[-1] and x + entry_width > width - gap:
            rows.append([])
            x = gap
        rows[-1].append((entry, x))
        x += entry_width + 2 * gap
    height = picture.height + gap + line * len(rows) + (gap if entries else 0)
    canvas = PIL.Image.new("RGB", (width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = picture.height + gap + r * line
        for (name, colour), x in row:
            fill = tuple(int(c) for c in colour) if colour is not None else "white"
            draw.rectangle([x, y, x + swatch, y + swatch], fill=fill, outline="black")
            draw.text((x + swatch + 4, y), name, fill="black", font=font)
    return canvas
