"""Evaluate semantic segmentation models: trained-model loading, the distributed eval loop, reports.

Shared by ``diffuseg train`` (periodic and final evaluation) and ``diffuseg evaluate``.
The loop accumulates one confusion matrix per image (:func:`diffuseg.metrics.confusion_matrix`)
and gathers them with ``accelerator.gather_for_metrics``, which drops the samples a
distributed sampler repeats to even out the processes: every image counts exactly once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffuseg.metrics import confusion_matrix, metrics_from_confusion
from diffuseg.training_data import IGNORE_INDEX, SampleTransform, looks_like_local_path, processor_normalisation

SUMMARY_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_iou_seen", "mean_iou_unseen", "harmonic_mean_iou")


def load_segmentation_model(path: str | os.PathLike):
    """A model saved by ``diffuseg train``: a full ``save_pretrained`` folder (or Hub id), or a
    LoRA adapter folder, whose base model is its ``base/`` subfolder (else the adapter's
    ``base_model_name_or_path``). Safetensors only."""
    from transformers import AutoModelForSemanticSegmentation

    given = os.fspath(path)
    folder = Path(os.path.expanduser(given))
    if folder.is_dir():
        if (folder / "adapter_config.json").is_file():
            from peft import PeftConfig, PeftModel

            base = folder / "base"
            if not (base / "config.json").is_file():
                base = PeftConfig.from_pretrained(folder).base_model_name_or_path
            model = AutoModelForSemanticSegmentation.from_pretrained(base, use_safetensors=True)
            return PeftModel.from_pretrained(model, folder)
        return AutoModelForSemanticSegmentation.from_pretrained(folder, use_safetensors=True)
    if looks_like_local_path(given):
        raise FileNotFoundError(f"model folder {given!r} does not exist")
    return AutoModelForSemanticSegmentation.from_pretrained(given, use_safetensors=True)


def saved_image_transform(model: str | os.PathLike, image_size: int | None = None) -> SampleTransform:
    """Evaluation preprocessing of a saved model: the size, mean and std of its image processor.

    ``image_size`` overrides the size; it is required when the model has no image processor.
    """
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(os.path.expanduser(os.fspath(model)))
    except OSError:  # no preprocessor_config.json
        processor = None
    if image_size is None:
        try:
            image_size = int(processor.size["height"])
        except (AttributeError, KeyError, TypeError):
            raise ValueError(f"model {os.fspath(model)!r} has no image processor with a fixed size: pass --image-size") from None
    return SampleTransform(image_size, *processor_normalisation(processor))


def predict_labels(logits: torch.Tensor, size: Sequence[int], label_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Arg-max label maps of ``logits`` upsampled to the label size ``(H, W)``.

    With ``label_sizes`` (a batch of labels of different sizes, padded), each image is
    upsampled to its own size and the padding filled with the ignore index.
    """
    if label_sizes is None:
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False).argmax(1)
    predictions = torch.full((len(logits), *size), IGNORE_INDEX, dtype=torch.long, device=logits.device)
    for prediction, image_logits, (height, width) in zip(predictions, logits, label_sizes.tolist()):
        upsampled = F.interpolate(image_logits[None], size=(height, width), mode="bilinear", align_corners=False)
        prediction[:height, :width] = upsampled[0].argmax(0)
    return predictions


@torch.no_grad()
def evaluate_segmentation(
    model,
    dataloader,
    accelerator,
    num_labels: int,
    unseen_classes: Sequence[int] | None = None,
    description: str = "eval",
) -> tuple[dict[str, Any], int]:
    """mean_iou figures of ``model`` on a prepared ``dataloader``, gathered over processes.

    Returns the metrics (see :func:`diffuseg.metrics.metrics_from_confusion`) and the number
    of images scored (each counted once, whatever the number of processes).
    """
    was_training = model.training
    model.eval()
    size = num_labels + 1
    confusion = torch.zeros((size, size), dtype=torch.long, device=accelerator.device)
    images = 0
    for batch in tqdm(dataloader, desc=description, leave=False, disable=not accelerator.is_local_main_process):
        logits = model(pixel_values=batch["pixel_values"]).logits
        predictions = predict_labels(logits, batch["labels"].shape[-2:], batch.get("label_sizes"))
        per_image = confusion_matrix(predictions, batch["labels"], num_labels, IGNORE_INDEX, per_image=True)
        per_image = accelerator.gather_for_metrics(per_image)
        confusion += per_image.sum(0)
        images += len(per_image)
    model.train(was_training)
    return metrics_from_confusion(confusion, unseen_classes=unseen_classes), images


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def metrics_report(
    metrics: Mapping[str, Any], id2label: Mapping[int, str], num_images: int, split: str | None = None
) -> dict[str, Any]:
    """JSON-ready figures: summary keys, ``num_images``, the ``split`` scored (when given), and
    ``per_class`` {name: {iou, accuracy}} (``None`` where a class is in neither references nor predictions)."""
    report: dict[str, Any] = {"num_images": num_images}
    if split is not None:
        report["split"] = split
    report.update({key: _number(metrics[key]) for key in SUMMARY_KEYS if key in metrics})
    report["per_class"] = {
        id2label[class_id]: {"iou": _number(iou), "accuracy": _number(accuracy)}
        for class_id, (iou, accuracy) in enumerate(zip(metrics["per_category_iou"], metrics["per_category_accuracy"]))
    }
    return report


def format_report(report: Mapping[str, Any], unseen_names: Sequence[str] = ()) -> str:
    """The per-class table and the summary figures of :func:`metrics_report`, in percent."""

    def percent(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    width = max([len("class")] + [len(name) for name in report["per_class"]])
    lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 14)]
    for name, figures in report["per_class"].items():
        mark = "  (unseen)" if name in unseen_names else ""
        lines.append(f"{name:<{width}} {percent(figures['iou'])} {percent(figures['accuracy'])}{mark}")
    lines.append("-" * (width + 14))
    lines += [f"{key}: {percent(report[key]).strip()}" for key in SUMMARY_KEYS if key in report]
    lines.append(f"images: {report['num_images']}" + (f" ({report['split']} split)" if report.get("split") else ""))
    return "\n".join(lines)
