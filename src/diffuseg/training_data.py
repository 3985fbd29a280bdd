"""Segmentation datasets for training and evaluation: sources, one label space, augmentation.

Reads top to bottom:

1. :func:`load_source` opens one dataset split (a local Hub-layout folder or a Hub id) and
   reads its ``id2label``.
2. :func:`build_label_space` merges the sources' class names into one label space, and
   :func:`label_lookup` maps each source's label ids onto it by name (unknown ids and held-out
   classes become the ignore index).
3. :class:`SegmentationSamples` turns rows into tensors: random resized crop (padding with the
   ignore index where the crop leaves the image), horizontal flip, resize (masks with nearest
   neighbour only) and normalisation; a counterfactual ``negative_image`` gets the same crop.
4. :class:`MixtureSampler` draws each epoch from the sources in proportion to their weights,
   deterministically from (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = 255
"""Label value that is not trained on nor scored (padding, uncertain pixels, held-out classes)."""
BACKGROUND = "background"
NEGATIVE_COLUMN = "negative_image"
CLASSES_COLUMN = "classes"
PROVENANCE_COLUMN = "pipeline"
"""Column that diffuseg's generators write: a set that has it is synthetic."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SegmentationSource:
    """One split of one dataset, with the class names of its label ids."""

    name: str
    """Local folder or Hub id, as given."""
    split: str
    dataset: datasets.Dataset
    id2label: dict[int, str]
    synthetic: bool
    """Generated data (has a ``pipeline`` column) rather than real annotated images."""

    @property
    def has_negatives(self) -> bool:
        return NEGATIVE_COLUMN in self.dataset.column_names


def load_source(
    name: str,
    split: str | None = None,
    preferred_splits: Sequence[str] = ("train",),
    image_column: str = "image",
    label_column: str = "label",
) -> SegmentationSource:
    """Open ``split`` of the dataset ``name`` (local folder in the Hub layout, or Hub id).

    Without ``split``, the first of ``preferred_splits`` that exists is used, else the only
    split there is.

    Raises:
        FileNotFoundError: ``name`` looks like a local path and does not exist.
        ValueError: the split or a column is missing, the split is empty, or the class names
            cannot be found.
    """
    expanded = os.path.expanduser(name)
    local = os.path.isdir(expanded)
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"dataset folder {name!r} does not exist")
    splits = datasets.load_dataset(expanded if local else name)
    split = _choose_split(name, list(splits), split, preferred_splits)
    dataset = splits[split]
    for column, option in ((image_column, "--image-column"), (label_column, "--label-column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"dataset {name!r} has no column {column!r} (its columns: {', '.join(dataset.column_names)}); "
                f"name the right one with {option}"
            )
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of dataset {name!r} is empty")
    if (image_column, label_column) != ("image", "label"):
        dataset = dataset.rename_columns({image_column: "image", label_column: "label"})
    return SegmentationSource(
        name=name,
        split=split,
        dataset=dataset,
        id2label=read_id2label(name, dataset, Path(expanded) if local else None),
        synthetic=PROVENANCE_COLUMN in dataset.column_names,
    )


def _choose_split(name: str, available: list[str], split: str | None, preferred: Sequence[str]) -> str:
    if split is not None:
        if split not in available:
            raise ValueError(f"dataset {name!r} has no split {split!r} (its splits: {', '.join(available)})")
        return split
    for candidate in preferred:
        if candidate in available:
            return candidate
    if len(available) == 1:
        return available[0]
    raise ValueError(
        f"dataset {name!r} has splits {', '.join(available)} and none of {', '.join(preferred)}: name one with the split option"
    )


def read_id2label(name: str, dataset: datasets.Dataset, folder: Path | None = None) -> dict[int, str]:
    """Label id -> class name of a dataset: its ``id2label.json``, else the names of its
    ``classes`` ClassLabel column (equal by the diffuseg format), else from the Hub repo."""
    if folder is not None and (folder / "id2label.json").is_file():
        raw = json.loads((folder / "id2label.json").read_text())
    elif CLASSES_COLUMN in dataset.features and hasattr(getattr(dataset.features[CLASSES_COLUMN], "feature", None), "names"):
        raw = dict(enumerate(dataset.features[CLASSES_COLUMN].feature.names))
    elif folder is None:
        from huggingface_hub import hf_hub_download

        raw = json.loads(Path(hf_hub_download(name, "id2label.json", repo_type="dataset")).read_text())
    else:
        raise ValueError(
            f"dataset {name!r} has neither an id2label.json nor a '{CLASSES_COLUMN}' ClassLabel column: "
            "its label ids have no class names; add an id2label.json mapping each label id to its class"
        )
    id2label = {int(label_id): str(label) for label_id, label in raw.items()}
    names = list(id2label.values())
    duplicated = sorted({label for label in names if names.count(label) > 1})
    if duplicated:
        raise ValueError(f"dataset {name!r} names several label ids {duplicated}: class names must be unique")
    if any(not 0 <= label_id < IGNORE_INDEX for label_id in id2label):
        raise ValueError(f"dataset {name!r} has label ids outside 0..{IGNORE_INDEX - 1} in its id2label")
    return dict(sorted(id2label.items()))


def build_label_space(
    sources: Sequence[SegmentationSource],
    labels: Sequence[str] | None = None,
    model_id2label: Mapping[int, str] | None = None,
) -> dict[int, str]:
    """One id -> name mapping for the model.

    ``labels`` (explicit names, id = position) wins; else a pretrained model's own label space
    when it names every class of the sources (so its head keeps its meaning); else the union
    of the sources' names in order of appearance.

    Raises:
        ValueError: a source has a class that the explicit ``labels`` lack.
    """
    if labels is not None:
        space = dict(enumerate(labels))
        for source in sources:
            label_lookup(source, space)  # raises on a class outside the space
        return space
    names: list[str] = []
    for source in sources:
        names += [label for label in source.id2label.values() if label not in names]
    if model_id2label and set(names) <= set(model_id2label.values()):
        return {int(label_id): label for label_id, label in sorted(model_id2label.items())}
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"{len(names)} classes do not fit in 8-bit label maps (at most {IGNORE_INDEX})")
    return dict(enumerate(names))


def label_lookup(
    source: SegmentationSource, label_space: Mapping[int, str], ignored: Sequence[str] = ()
) -> np.ndarray:
    """Table ``new_id = table[old_id]`` from the source's label ids to ``label_space`` by name.

    Pixel values the source does not name, and classes in ``ignored``, map to the ignore index.

    Raises:
        ValueError: the source has classes that ``label_space`` lacks.
    """
    ids = {label: label_id for label_id, label in label_space.items()}
    missing = [label for label in source.id2label.values() if label not in ids]
    if missing:
        raise ValueError(
            f"label space mismatch: dataset {source.name!r} has classes {missing} that are not among "
            f"the model's labels {list(ids)}; train with these classes (or --labels listing them) or "
            "evaluate on a dataset with the model's classes"
        )
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, label in source.id2label.items():
        if label not in ignored:
            table[label_id] = ids[label]
    return table


def training_label_lookups(
    sources: Sequence[SegmentationSource],
    label_space: Mapping[int, str],
    unseen_classes: Sequence[str] = (),
    real: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], list[bool]]:
    """Label tables of the training sources under the zero-shot protocol, and which are real.

    ``unseen_classes`` become the ignore index in the real sources only: synthetic sources
    are how unseen classes get learnt. Real sources are those named in ``real``, by default
    those without a ``pipeline`` column.
    """
    is_real = [source.name in real if real is not None else not source.synthetic for source in sources]
    lookups = [
        label_lookup(source, label_space, ignored=unseen_classes if source_is_real else ())
        for source, source_is_real in zip(sources, is_real)
    ]
    return lookups, is_real


@dataclass(frozen=True)
class SampleTransform:
    """Image and mask preprocessing; with ``augment``, random resized crop and flip first.

    The crop covers ``crop_scale`` times the image area (above 1: larger than the image, the
    outside padded with black pixels and the ignore index) with an aspect ratio drawn
    log-uniformly in ``crop_ratio``; it is then resized to ``image_size`` (images bilinear with
    antialiasing, masks nearest neighbour). Without ``augment``, the image is resized to
    ``image_size`` and the mask kept at full resolution (scoring happens at label size).
    """

    image_size: int
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    augment: bool = False
    crop_scale: tuple[float, float] = (0.5, 2.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, negative: torch.Tensor | None, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``image`` (3, H, W) float in [0, 1], ``label`` (H, W) int64 -> normalised, resized tensors."""
        if self.augment:
            rng = np.random.default_rng(seed)
            box = self.crop_box(label.shape[-2], label.shape[-1], rng)
            image, label = _crop(image, box, 0.0), _crop(label, box, IGNORE_INDEX)
            negative = _crop(negative, box, 0.0) if negative is not None else None
            if rng.random() < self.hflip_prob:
                image, label = image.flip(-1), label.flip(-1)
                negative = negative.flip(-1) if negative is not None else None
            label = _resize_mask(label, self.image_size)
        size = (self.image_size, self.image_size)
        image = self._normalise(_resize_image(image, size))
        negative = self._normalise(_resize_image(negative, size)) if negative is not None else None
        return image, label, negative

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width); the box may leave the image."""
        area = height * width * rng.uniform(*self.crop_scale)
        ratio = math.exp(rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
        crop_height = max(1, round(math.sqrt(area / ratio)))
        crop_width = max(1, round(math.sqrt(area * ratio)))
        top = int(rng.integers(min(0, height - crop_height), max(0, height - crop_height) + 1))
        left = int(rng.integers(min(0, width - crop_width), max(0, width - crop_width) + 1))
        return top, left, crop_height, crop_width

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (image - mean) / std


def processor_normalisation(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of a transformers image processor; ImageNet's when it has none."""
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    return tuple(mean), tuple(std)


def _crop(array: torch.Tensor, box: tuple[int, int, int, int], fill: float) -> torch.Tensor:
    """``array[..., top:top+h, left:left+w]``, padded with ``fill`` where the box leaves it."""
    top, left, height, width = box
    rows, cols = array.shape[-2:]
    pad = (max(0, -left), max(0, left + width - cols), max(0, -top), max(0, top + height - rows))
    if any(pad):
        array = F.pad(array, pad, value=fill)
        top, left = top + pad[2], left + pad[0]
    return array[..., top : top + height, left : left + width]


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _resize_mask(label: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(label.shape[-2:]) == (size, size):
        return label
    # Nearest neighbour only: interpolating ids would invent classes at boundaries.
    return F.interpolate(label[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()


def image_tensor(image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div_(255)


class SegmentationSamples(Dataset):
    """Rows of several sources as tensors, their labels mapped onto one label space.

    Items: ``pixel_values`` (3, S, S), ``labels`` (H, W) int64, and with ``with_negatives``, for
    rows that have one, ``negative_pixel_values`` and ``negative_classes`` (multi-hot over the
    label space: the row's classes, background excluded). Index with an int, or with
    ``(index, seed)`` as :class:`MixtureSampler` yields, the seed driving the augmentation.
    """

    def __init__(
        self,
        sources: Sequence[SegmentationSource],
        lookups: Sequence[np.ndarray],
        transform: SampleTransform,
        num_labels: int,
        background_id: int | None = None,
        with_negatives: bool = False,
    ) -> None:
        self.transform = transform
        self.num_labels = num_labels
        self.background_id = background_id
        self.lookups = [torch.from_numpy(table.astype(np.int64)) for table in lookups]
        self.datasets = []
        self.negatives = []
        for source in sources:
            negatives = with_negatives and source.has_negatives
            columns = ["image", "label"] + ([NEGATIVE_COLUMN] if negatives else [])
            columns += [CLASSES_COLUMN] if negatives and CLASSES_COLUMN in source.dataset.column_names else []
            self.datasets.append(source.dataset.select_columns(columns))
            self.negatives.append(negatives)
        self.offsets = np.cumsum([0] + [len(dataset) for dataset in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        which = bisect.bisect_right(self.offsets, index) - 1
        row = self.datasets[which][index - self.offsets[which]]
        lookup = self.lookups[which]
        raw_label = np.asarray(row["label"])
        if raw_label.dtype != np.uint8 or raw_label.ndim != 2:
            raise ValueError(f"label images must be 8-bit single-channel (PNG mode L), got mode {row['label'].mode}")
        label = lookup[torch.from_numpy(raw_label.astype(np.int64))]
        image = image_tensor(row["image"])
        negative = image_tensor(row[NEGATIVE_COLUMN]) if self.negatives[which] else None
        if negative is not None:
            negative = _resize_image(negative, tuple(image.shape[-2:]))  # one crop box fits both
        item = {}
        if negative is not None:
            present = lookup[torch.tensor(row[CLASSES_COLUMN], dtype=torch.long)] if CLASSES_COLUMN in row else label.unique()
            item["negative_classes"] = self._multi_hot(present)
        pixel_values, labels, negative = self.transform(image, label, negative, seed)
        item.update(pixel_values=pixel_values, labels=labels)
        if negative is not None:
            item["negative_pixel_values"] = negative
        return item

    def _multi_hot(self, class_ids: torch.Tensor) -> torch.Tensor:
        keep = class_ids < self.num_labels  # drops the ignore index
        if self.background_id is not None:
            keep &= class_ids != self.background_id
        hot = torch.zeros(self.num_labels)
        hot[class_ids[keep]] = 1.0
        return hot


def collate_segmentation(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; labels of different sizes are padded with the ignore index, negatives
    are stacked from the rows that have one."""
    batch = {"pixel_values": torch.stack([item["pixel_values"] for item in items])}
    sizes = [tuple(item["labels"].shape) for item in items]
    if len(set(sizes)) == 1:
        batch["labels"] = torch.stack([item["labels"] for item in items])
    else:
        height, width = max(size[0] for size in sizes), max(size[1] for size in sizes)
        batch["labels"] = torch.full((len(items), height, width), IGNORE_INDEX, dtype=torch.long)
        for padded, item in zip(batch["labels"], items):
            padded[: item["labels"].shape[0], : item["labels"].shape[1]] = item["labels"]
        batch["label_sizes"] = torch.tensor(sizes)
    negatives = [item for item in items if "negative_pixel_values" in item]
    if negatives:
        batch["negative_pixel_values"] = torch.stack([item["negative_pixel_values"] for item in negatives])
        batch["negative_classes"] = torch.stack([item["negative_classes"] for item in negatives])
    return batch


class MixtureSampler(Sampler[tuple[int, int]]):
    """Indices into concatenated sources, each epoch drawn in proportion to ``weights``.

    An epoch has as many samples as all sources together; source ``i`` gets a share
    ``weights[i] / sum(weights)`` of it (by default its own size: plain shuffling), drawn
    without replacement until the source is exhausted, then again. Every index comes with
    an augmentation seed. Both depend only on (seed, epoch): resuming replays them exactly,
    and every process of a distributed run iterates the same order (accelerate shards it).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0) -> None:
        if weights is not None:
            if len(weights) != len(sizes):
                raise ValueError(f"{len(weights)} weights for {len(sizes)} training datasets: give one weight per dataset")
            if any(weight < 0 for weight in weights) or sum(weights) <= 0:
                raise ValueError(f"dataset weights must be non-negative with a positive sum, got {list(weights)}")
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0] + self.sizes[:-1]).tolist()
        self.seed = seed
        self.epoch = 0
        total = sum(self.sizes)
        shares = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        shares = shares / shares.sum() * total
        counts = np.floor(shares).astype(int)
        # Largest remainders first, so the counts add up to exactly one epoch.
        for i in np.argsort(counts - shares, kind="stable")[: total - counts.sum()]:
            counts[i] += 1
        self.counts = counts.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        picks = []
        for size, offset, count in zip(self.sizes, self.offsets, self.counts):
            rounds = -(-count // size)
            order = torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)]) if rounds else torch.zeros(0, dtype=torch.long)
            picks.append(order[:count] + offset)
        indices = torch.cat(picks)[torch.randperm(len(self), generator=generator)]
        seeds = torch.randint(0, 2**62, (len(self),), generator=generator)
        return iter(zip(indices.tolist(), seeds.tolist()))


def segmentation_loader(
    samples: SegmentationSamples, batch_size: int, num_workers: int = 0, seed: int = 0, sampler: Sampler | None = None
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``samples`` in order (or ``sampler``'s), batched by :func:`collate_segmentation`."""
    # An own generator: creating an iterator must not draw from the global RNG, or a resumed
    # run's dropout would differ from that of an uninterrupted one.
    return torch.utils.data.DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_segmentation,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
