"""Segmentation metrics: mean IoU from one confusion matrix, plus seen / unseen / harmonic mIoU.

The figures are those of the Hub's ``mean_iou`` metric (same arguments, same keys, same
numbers), computed without a Python loop per image: every pixel of a batch goes through one
``bincount``. The ``evaluate`` module shipped in ``metrics/mean_iou/`` and the trainer both
call the functions here, so the logic lives once::

    from diffuseg.metrics import load_mean_iou, mean_iou
    mean_iou(predictions, references, num_labels=21, ignore_index=255)
    load_mean_iou().compute(predictions=..., references=..., num_labels=21, ignore_index=255)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

MEAN_IOU_PATH = Path(__file__).parent / "mean_iou"
"""Folder of the ``evaluate`` module: ``evaluate.load(str(MEAN_IOU_PATH))`` works offline."""


def load_mean_iou(**kwargs: Any):
    """The shipped ``mean_iou`` ``evaluate`` module, loaded from its folder (no network).

    ``kwargs`` go to :func:`evaluate.load` (``experiment_id``, ``num_process``, ...).
    """
    import evaluate

    return evaluate.load(str(MEAN_IOU_PATH), **kwargs)


def _as_long_tensor(image: Any, what: str) -> torch.Tensor:
    """``image`` as int64, refusing values that are not whole numbers (truncating them would hide a bug)."""
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
    if tensor.is_floating_point() or tensor.is_complex():
        fractional = ~torch.isfinite(tensor) | (tensor != tensor.round())
        if fractional.any():
            value = tensor[fractional].flatten()[0].item()
            raise ValueError(
                f"{what} must be integer label ids, got the non-integer value {value!r}; "
                "pass label maps (e.g. the arg-max over classes), not scores or probabilities"
            )
    return tensor.long()


def _pixels(images: Any, what: str) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """All pixels of ``images`` as one int64 vector, and the shape of each image.

    ``images`` is one array/tensor whose first axis is the image, or a sequence of arrays of
    any (possibly different) shapes.
    """
    if isinstance(images, torch.Tensor) or (isinstance(images, np.ndarray) and images.dtype != object):
        stacked = _as_long_tensor(images, what)
        if stacked.dim() == 0:
            raise ValueError(f"{what} must be images (at least one axis), got a scalar")
        return stacked.reshape(-1), [tuple(stacked.shape[1:])] * len(stacked)
    if not isinstance(images, (Sequence, np.ndarray)):
        raise ValueError(f"{what} must be an array, a tensor or a list of arrays, got {type(images).__name__}")
    tensors = [_as_long_tensor(image, what) for image in images]
    if not tensors:
        return torch.zeros(0, dtype=torch.long), []
    return torch.cat([t.reshape(-1) for t in tensors]), [tuple(t.shape) for t in tensors]


def confusion_matrix(
    predictions: Any,
    references: Any,
    num_labels: int,
    ignore_index: int | None = 255,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
    per_image: bool = False,
) -> torch.Tensor:
    """Pixel counts ``C[reference, prediction]`` of shape ``(num_labels + 1, num_labels + 1)``.

    Index ``num_labels`` (the last row / column) counts ids outside ``[0, num_labels)``: such
    pixels are in no class, yet a class's accuracy and IoU must still count them, as the Hub
    metric does. Pixels whose (mapped) reference is ``ignore_index`` are not counted.

    Args:
        predictions, references: one array or tensor ``(N, ...)`` or a list of ``N`` arrays of integer
            ids (shapes may differ between images, not between an image's prediction and reference).
        label_map: reference id -> new id, applied to the references first, entry by entry as
            the Hub metric does.
        reduce_labels: references 0 become ``255`` and every other id is lowered by one.
        per_image: return one matrix per image, shape ``(N, K, K)`` (what a distributed
            evaluation gathers so that duplicated samples can be dropped).
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    predicted, predicted_shapes = _pixels(predictions, "predictions")
    reference, reference_shapes = _pixels(references, "references")
    if len(predicted_shapes) != len(reference_shapes):
        raise ValueError(
            f"predictions and references differ in number of images ({len(predicted_shapes)} vs {len(reference_shapes)})"
        )
    # Equal pixel counts are not enough: a (2, 3) map scored against a (3, 2) one pairs unrelated pixels.
    for i, (predicted_shape, reference_shape) in enumerate(zip(predicted_shapes, reference_shapes)):
        if predicted_shape != reference_shape:
            raise ValueError(
                f"prediction and reference {i} differ in shape ({predicted_shape} vs {reference_shape}); "
                "resize the prediction to its reference's size (nearest neighbour) before scoring"
            )
    reference = reference.to(predicted.device)
    if label_map:
        reference = reference.clone()
        for old_id, new_id in label_map.items():
            reference[reference == int(old_id)] = int(new_id)
    if reduce_labels:
        reference = torch.where(reference == 0, 255, reference) - 1
        reference = torch.where(reference == 254, 255, reference)

    size = num_labels + 1
    outside = num_labels
    predicted = torch.where((predicted >= 0) & (predicted < num_labels), predicted, outside)
    counted = reference != ignore_index if ignore_index is not None else torch.ones_like(reference, dtype=torch.bool)
    reference = torch.where((reference >= 0) & (reference < num_labels), reference, outside)
    cell = reference * size + predicted
    if not per_image:
        return torch.bincount(cell[counted], minlength=size * size).reshape(size, size)
    images = len(predicted_shapes)
    sizes = torch.tensor([math.prod(shape) for shape in predicted_shapes], device=cell.device)
    image_of_pixel = torch.repeat_interleave(torch.arange(images, device=cell.device), sizes)
    cell = cell + image_of_pixel * (size * size)
    return torch.bincount(cell[counted], minlength=images * size * size).reshape(images, size, size)


def metrics_from_confusion(
    confusion: Any,
    nan_to_num: float | None = None,
    unseen_classes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``mean_iou`` figures of a ``(K+1, K+1)`` matrix from :func:`confusion_matrix`.

    Returns ``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``,
    ``per_category_accuracy`` (NaN for a class absent from both references and predictions,
    or replaced by ``nan_to_num``), and with ``unseen_classes`` also ``mean_iou_seen``,
    ``mean_iou_unseen`` and ``harmonic_mean_iou`` (2·seen·unseen / (seen + unseen)); seen
    classes are all the others, background included.
    """
    counts = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 2:
        raise ValueError(f"confusion must be a square (num_labels + 1) matrix, got shape {counts.shape}")
    num_labels = counts.shape[0] - 1
    intersection = np.diag(counts)[:num_labels]
    area_reference = counts[:num_labels, :].sum(axis=1)
    area_prediction = counts[:, :num_labels].sum(axis=0)
    union = area_reference + area_prediction - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / union
        accuracy = intersection / area_reference
        metrics: dict[str, Any] = {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": intersection.sum() / area_reference.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if unseen_classes is not None:
        unseen = sorted({int(c) for c in unseen_classes})
        outside = [c for c in unseen if not 0 <= c < num_labels]
        if outside:
            raise ValueError(f"unseen class ids {outside} are outside the {num_labels} labels")
        seen = np.setdiff1d(np.arange(num_labels), unseen)
        seen_iou, unseen_iou = _nanmean(iou[seen]), _nanmean(iou[unseen])
        metrics["mean_iou_seen"] = seen_iou
        metrics["mean_iou_unseen"] = unseen_iou
        metrics["harmonic_mean_iou"] = _harmonic_mean(seen_iou, unseen_iou)
    if nan_to_num is not None:
        metrics = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in metrics.items()}
    return metrics


def _harmonic_mean(seen: np.float64, unseen: np.float64) -> np.float64:
    """2·s·u / (s + u): NaN when either is undefined, 0 when both are 0."""
    if np.isnan(seen) or np.isnan(unseen):
        return np.float64(np.nan)
    total = seen + unseen
    return np.float64(2 * seen * unseen / total if total > 0 else 0.0)


def _nanmean(values: np.ndarray) -> np.float64:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none."""
    present = values[~np.isnan(values)]
    return np.float64(present.mean()) if present.size else np.float64(np.nan)


def mean_iou(
    predictions: Any,
    references: Any,
    num_labels: int,
    ignore_index: int | None = 255,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
    reduce_labels: bool = False,
    unseen_classes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Mean IoU of predicted label maps against references, the Hub ``mean_iou`` way.

    Args:
        predictions, references: integer label maps (floats must hold whole numbers), ``(N, H, W)``
            array/tensor or a list of 2-D arrays; each prediction has its reference's shape.
        num_labels: number of classes (ids ``0 .. num_labels - 1``).
        ignore_index: reference id not counted (``None``: count every pixel).
        nan_to_num: replace NaN figures (classes in neither references nor predictions).
        label_map: reference id -> new id, applied before ``reduce_labels``.
        reduce_labels: reference 0 (background) becomes ignored, other ids are lowered by one.
        unseen_classes: class ids held out in training; adds seen / unseen / harmonic mIoU.

    Returns:
        The dict documented in :func:`metrics_from_confusion`.

    Raises:
        ValueError: a prediction's shape differs from its reference's, or a value is not a whole number.
    """
    confusion = confusion_matrix(predictions, references, num_labels, ignore_index, label_map, reduce_labels)
    return metrics_from_confusion(confusion, nan_to_num=nan_to_num, unseen_classes=unseen_classes)


__all__ = ["MEAN_IOU_PATH", "confusion_matrix", "load_mean_iou", "mean_iou", "metrics_from_confusion"]
