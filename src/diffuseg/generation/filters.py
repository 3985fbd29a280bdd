"""Quality filters: mask area, ignore fraction, and agreement with a segmentation model
(a minimum IoU as in Free-Mask, or the best fraction of each shard as in DiffuMask's noise learning)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffuseg.data import IGNORE_INDEX


def mask_stats(label: np.ndarray, class_ids: Sequence[int]) -> dict[str, float]:
    """``mask_area``: area fraction of the smallest named class; ``ignore_fraction``: share of 255 pixels."""
    label = np.asarray(label)
    areas = [float((label == c).mean()) for c in class_ids] or [0.0]
    return {"mask_area": min(areas), "ignore_fraction": float((label == IGNORE_INDEX).mean())}


def agreement_iou(label: np.ndarray, predicted: np.ndarray, class_ids: Sequence[int]) -> float:
    """Mean IoU, over the named classes, of ``label`` against a segmenter's ``predicted`` map.

    Pixels the label marks as ignore (255) are left out. A class absent from both maps is
    skipped; with none left the agreement is 0.
    """
    valid = np.asarray(label) != IGNORE_INDEX
    ious = []
    for c in class_ids:
        ours, theirs = (np.asarray(label) == c) & valid, (np.asarray(predicted) == c) & valid
        union = (ours | theirs).sum()
        if union:
            ious.append((ours & theirs).sum() / union)
    return float(np.mean(ious)) if ious else 0.0


class SegmentationAgreement:
    """A transformers semantic-segmentation model whose predictions are compared with the masks.

    Any ``AutoModelForSemanticSegmentation`` (SegFormer, UperNet, ...) or
    ``AutoModelForUniversalSegmentation`` (Mask2Former, ...) folder or Hub id with an image
    processor. Its labels are matched to the dataset's classes by name ("background" = 0;
    labels that are none of the dataset's classes count as background).

    Raises:
        ValueError: the model does not know some dataset class.
    """

    def __init__(self, model: str | os.PathLike, class_names: Sequence[str], device=None) -> None:
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        path = os.fspath(model)
        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"agreement model folder {path!r} does not exist")
        config = AutoConfig.from_pretrained(os.path.expanduser(path))
        auto = transformers.AutoModelForSemanticSegmentation
        if type(config) not in auto._model_mapping:
            auto = transformers.AutoModelForUniversalSegmentation
        self.model = auto.from_pretrained(os.path.expanduser(path), use_safetensors=True).eval()
        if device is not None:
            self.model.to(device)
        self.processor = AutoImageProcessor.from_pretrained(os.path.expanduser(path))
        ids = {name: i for i, name in enumerate(class_names, start=1)}
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        missing = sorted(set(class_names) - set(id2label.values()))
        if missing:
            raise ValueError(f"the agreement model {path!r} does not predict {missing}; its labels: {sorted(id2label.values())}")
        self.lut = np.zeros(max(id2label) + 1, dtype=np.uint8)
        for model_id, name in id2label.items():
            self.lut[model_id] = ids.get(name, 0)

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Label maps (dataset ids) of uint8 HxWx3 images."""
        import torch

        inputs = self.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[i.shape[:2] for i in images])
        return [self.lut[m.cpu().numpy().astype(np.int64)] for m in maps]
