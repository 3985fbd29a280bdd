"""From soft attention maps to label maps: shared mask post-processing.

The steps, in the order pipelines use them:

1. :func:`aggregate_resolutions`: upsample each resolution's maps, divide by their max, average.
2. :func:`refine_with_self_attention` (optional, training-free): propagate the maps along
   the UNet's own self-attention affinities, which follow object boundaries.
3. :func:`thresholds`: per map, fixed, Otsu, or DiffuMask's adaptive search.
4. :func:`label_map`: one ``uint8`` map per image, 0 background, ``1..C`` classes, 255 ignore
   (an uncertainty band around the threshold), small components dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
THRESHOLD_METHODS = ("otsu", "adaptive")


def normalize_max(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each map (the last two dims) by its maximum, as DiffuMask does."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


def normalize_min_max(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rescale each map (the last two dims) to [0, 1]."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(eps)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(..., h, w)`` maps to ``size``."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def aggregate_resolutions(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Average of max-normalised maps from several resolutions, each upsampled to ``size``."""
    return torch.stack([normalize_max(upsample(m, size)) for m in maps]).mean(dim=0)


def refine_with_self_attention(
    maps: torch.Tensor, self_attention: torch.Tensor, map_size: tuple[int, int], iterations: int = 1
) -> torch.Tensor:
    """Propagate ``(B, C, H, W)`` maps along self-attention affinities ``(B, h·w, h·w)`` at ``map_size``.

    Each pixel's value becomes the attention-weighted mean of the values it attends to,
    ``m ← A m``, at the self-attention resolution; the refined maps are upsampled back and
    max-normalised. Affinities follow object extents, so holes fill and stray blobs fade.
    """
    batch, classes, height, width = maps.shape
    low = F.interpolate(maps.float(), size=tuple(map_size), mode="area").flatten(2)  # (B, C, hw)
    affinity = self_attention.float()
    for _ in range(iterations):
        low = torch.bmm(low, affinity.transpose(1, 2))  # (A m) for every class
    refined = low.reshape(batch, classes, *map_size)
    return normalize_max(upsample(refined, (height, width)))


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each map in ``(..., H, W)``: the split that maximises between-class variance.

    Exact (over the sorted values, no histogram), so a map and a copy perturbed by float
    noise get the same split.
    """
    return _otsu(values, None)


def adaptive_threshold(values: torch.Tensor, low: float = 0.45, high: float = 0.53) -> torch.Tensor:
    """DiffuMask's adaptive threshold: the best Otsu split searched only within ``[low, high]``.

    Meant for max-normalised maps, where the original code's fixed range applies. A map
    with no split inside the window (a nearly flat map) gets the window's centre.
    """
    return _otsu(values, (low, high))


def _otsu(values: torch.Tensor, window: tuple[float, float] | None) -> torch.Tensor:
    lead = values.shape[:-2]
    ordered = values.reshape(-1, values.shape[-2] * values.shape[-1]).double().sort(dim=1).values
    count = ordered.shape[1]
    if count < 2:
        return ordered[:, 0].float().reshape(lead)
    below = torch.arange(1, count, dtype=torch.float64)  # split after position k-1: k values below
    mass_below = ordered.cumsum(dim=1)[:, :-1]
    mean_below = mass_below / below
    mean_above = (ordered.sum(dim=1, keepdim=True) - mass_below) / (count - below)
    between = below * (count - below) * (mean_below - mean_above) ** 2
    candidates = (ordered[:, :-1] + ordered[:, 1:]) / 2
    # Equal neighbours are no split at all.
    between = between.masked_fill(ordered[:, :-1] == ordered[:, 1:], -1.0)
    if window is not None:
        between = between.masked_fill((candidates < window[0]) | (candidates > window[1]), -1.0)
    best = between.argmax(dim=1, keepdim=True)
    threshold = candidates.gather(1, best).squeeze(1)
    if window is not None:
        no_split = between.gather(1, best).squeeze(1) < 0
        threshold = torch.where(no_split, torch.full_like(threshold, (window[0] + window[1]) / 2), threshold)
    return threshold.float().reshape(lead)


def thresholds(maps: torch.Tensor, method: str | float) -> torch.Tensor:
    """Per-map thresholds ``(...)`` of ``(..., H, W)`` maps: a float, "otsu" or "adaptive"."""
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        if not 0.0 <= method <= 1.0:  # maps are normalised to [0, 1]: any other cut empties or fills every mask
            raise ValueError(f"a numeric threshold must be in [0, 1], got {method}")
        return torch.full(maps.shape[:-2], float(method))
    if method == "otsu":
        return otsu_threshold(maps)
    if method == "adaptive":
        return adaptive_threshold(maps)
    raise ValueError(f"unknown threshold method {method!r}: use a number, 'otsu' or 'adaptive'")


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` (bool, H×W) without its 8-connected components smaller than ``min_area`` pixels."""
    if min_area <= 1 or not mask.any():
        return mask
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(components.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    return keep[components]


def label_map(
    maps: torch.Tensor,
    thresholds_: torch.Tensor,
    ignore_band: float = 0.0,
    min_area: int = 0,
    num_classes: int | None = None,
) -> np.ndarray:
    """One label map from ``(C, H, W)`` class maps and their ``(C,)`` thresholds.

    A pixel belongs to the class with the highest map value among those more than
    ``ignore_band`` above their threshold (overlaps go to the strongest class). A pixel with
    no such class is ignore (255) if some class is within ``ignore_band`` of its threshold,
    background (0) otherwise. Components of a class smaller than ``min_area`` pixels become
    background, as DiffuMask drops small contours. Only the first ``num_classes`` maps are
    used (the rest are padding of a batch with fewer classes).

    Returns:
        ``uint8`` array ``(H, W)``: 0 background, ``c + 1`` for map ``c``, 255 ignore.
    """
    if num_classes is not None:
        maps, thresholds_ = maps[:num_classes], thresholds_[:num_classes]
    maps = maps.float()
    margin = maps - thresholds_.reshape(-1, 1, 1).float()
    confident = margin > ignore_band
    uncertain = (margin.abs() <= ignore_band) & (ignore_band > 0)
    strength = maps.masked_fill(~confident, float("-inf"))
    winner = strength.argmax(dim=0)
    labels = torch.where(confident.any(dim=0), winner + 1, torch.zeros_like(winner))
    labels = torch.where(~confident.any(dim=0) & uncertain.any(dim=0), torch.full_like(labels, IGNORE_INDEX), labels)
    labels = labels.to(torch.uint8).cpu().numpy()
    if min_area > 1:
        for c in range(1, maps.shape[0] + 1):
            own = labels == c
            labels[own & ~remove_small_components(own, min_area)] = 0
    return labels
