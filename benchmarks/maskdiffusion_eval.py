"""mIoU of the training-free MaskDiffusionSegPipeline on an image-label dataset.

    python benchmarks/maskdiffusion_eval.py DATASET [--split validation] [--model shapesworld] [--limit N]
    python benchmarks/maskdiffusion_eval.py DATASET --clusters gt        # unsupervised, Hungarian-matched

DATASET is a local folder in the Hub layout (``data/<split>-*.parquet`` + ``id2label.json``,
as ``diffuseg generate`` writes) or a Hub dataset id; columns ``image`` and ``label`` (mode L:
0 background, 1..C classes, 255 ignore). The candidate classes are every class the dataset
names (its open vocabulary), not just those in an image.

Background: when the dataset has a "background" id, the pipeline gets a background word
(``--background-prompt``, default "background") and/or a score floor
(``--background-threshold``); with neither, reference background pixels are not scored
(the method then has no way to predict them, as in the paper).

Open vocabulary: ``--attention-floor`` and ``--min-class-share`` are the pipeline's
(prototype weights above a floor; classes whose region is too small are judged absent).

Unsupervised (``--clusters K|auto|gt``): k-means clusters per image, ``auto`` choosing k by
silhouette, ``gt`` taking it from the image's reference (an oracle). ``--matching split`` (the
default, except with ``gt``) maps cluster ids (ordered by size in every image) to labels once
for the whole split, by the Hungarian algorithm on the pixel overlap summed over all images,
so nothing about an image's labels reaches its prediction; ``--matching image`` matches each
image's clusters to its own labels (an oracle, the authors' protocol). Unmatched clusters
count as wrong. Scores come from ``diffuseg.metrics.mean_iou`` (the Hub ``mean_iou`` definitions).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from diffuseg.evaluation import format_report, metrics_report
from diffuseg.metrics import mean_iou
from diffuseg.models import load_pipeline
from diffuseg.pipelines.maskdiffusion import MaskDiffusionSegPipeline
from diffuseg.data import BACKGROUND, IGNORE_INDEX
from diffuseg.training_data import load_source


def match_clusters(clusters: np.ndarray, reference: np.ndarray, unmatched: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``clusters`` relabelled with the reference ids they overlap most, one-to-one (Hungarian).

    Clusters left without a reference id (more clusters than labels) become ``unmatched``.
    """
    scored = reference != ignore_index
    cluster_ids, cluster_index = np.unique(clusters, return_inverse=True)
    cluster_index = cluster_index.reshape(clusters.shape)
    label_ids = np.unique(reference[scored])
    table = np.full(len(cluster_ids), unmatched, dtype=np.int64)
    if len(label_ids):
        label_index = np.searchsorted(label_ids, reference[scored])
        overlap = np.zeros((len(cluster_ids), len(label_ids)), dtype=np.int64)
        np.add.at(overlap, (cluster_index[scored], label_index), 1)
        rows, columns = linear_sum_assignment(overlap, maximize=True)
        table[rows] = label_ids[columns]
    return table[cluster_index]


def split_cluster_table(clusters: Sequence[np.ndarray], references: Sequence[np.ndarray], unmatched: int,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """One cluster id -> label id table for a whole split: Hungarian on the summed pixel overlap.

    Cluster ids left without a label (more ids than labels) map to ``unmatched``.
    """
    size = max(int(c.max()) for c in clusters) + 1
    labels = np.unique(np.concatenate([r[r != ignore_index] for r in references]))
    overlap = np.zeros((size, len(labels)), dtype=np.int64)
    for cluster, reference in zip(clusters, references):
        scored = reference != ignore_index
        np.add.at(overlap, (cluster[scored], np.searchsorted(labels, reference[scored])), 1)
    table = np.full(size, unmatched, dtype=np.int64)
    rows, columns = linear_sum_assignment(overlap, maximize=True)
    table[rows] = labels[columns]
    return table


def parse_clusters(value: str) -> int | str:
    if value in ("auto", "gt"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a positive integer, 'auto' or 'gt', got {value!r}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="local dataset folder (Hub layout) or Hub dataset id")
    parser.add_argument("--split", help="split to score (default: validation, else test, else the only split)")
    parser.add_argument("--model", default="shapesworld", help="pipeline folder or Hub id (default: embedded shapesworld)")
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument("--background-prompt", default="background",
                        help="background word added to the prompt ('' for none) (default: background)")
    parser.add_argument("--prompt", help="a prompt naming every class (and the background word) as a whole word "
                        "(default: the class names joined by ' and ')")
    parser.add_argument("--background-threshold", type=float, help="score floor below which pixels are background")
    parser.add_argument("--attention-floor", type=float, default=0.0, help="prototype weights: attention above this floor only")
    parser.add_argument("--min-class-share", type=float, default=0.0,
                        help="named classes whose region covers less of the image are judged absent")
    parser.add_argument("--clusters", type=parse_clusters, help="unsupervised mode: K, 'auto' or 'gt' clusters per image")
    parser.add_argument("--matching", choices=["split", "image"],
                        help="unsupervised: one cluster-label matching for the split, or one per image (an oracle); "
                             "default: image with --clusters gt, else split")
    parser.add_argument("--timesteps", default="50", help="comma-separated noise timesteps (default: 50)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the report as JSON here")
    args = parser.parse_args(argv)

    source = load_source(args.dataset, args.split, preferred_splits=("validation", "test", "train"))
    dataset = source.dataset if args.limit is None else source.dataset.select(range(min(args.limit, len(source.dataset))))
    id2label = source.id2label
    background_ids = [i for i, name in id2label.items() if name.lower() == BACKGROUND]
    class_ids = [i for i in id2label if i not in background_ids]
    class_names = [id2label[i] for i in class_ids]
    num_labels = max(id2label) + 1
    unsupervised = args.clusters is not None
    matching = args.matching or ("image" if args.clusters == "gt" else "split")
    handles_background = bool(args.background_prompt) or args.background_threshold is not None
    ignore_background = bool(background_ids) and not unsupervised and not handles_background

    pipe = load_pipeline(MaskDiffusionSegPipeline, args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    # Pipeline id -> dataset id: class k is class_ids[k]; the background id (len(classes)) is background.
    to_dataset = np.array([*class_ids, background_ids[0] if background_ids else IGNORE_INDEX], dtype=np.int64)

    predictions, references, chosen_k, true_k = [], [], [], []
    for start in tqdm(range(0, len(dataset), args.batch_size), desc="segmenting", unit="batch"):
        rows = dataset[start : start + args.batch_size]
        labels = [np.asarray(label, dtype=np.int64) for label in rows["label"]]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(labels))]
        if unsupervised:
            for image, label, gen in zip(rows["image"], labels, generators):
                k = args.clusters
                if k == "gt":
                    k = max(1, len(np.unique(label[label != IGNORE_INDEX])))
                out = pipe(image, None, num_clusters=None if k == "auto" else k, timesteps=timesteps, generator=gen)
                chosen_k.append(int(out.scores[0].shape[0]))
                true_k.append(len(np.unique(label[label != IGNORE_INDEX])))
                clusters = np.asarray(out.segmentation[0], dtype=np.int64)
                predictions.append(match_clusters(clusters, label, unmatched=num_labels) if matching == "image" else clusters)
        else:
            out = pipe(
                rows["image"], class_names, prompt=args.prompt, timesteps=timesteps, generator=generators,
                background_prompt=(args.background_prompt or None) if background_ids else None,
                background_threshold=args.background_threshold if background_ids else None,
                attention_floor=args.attention_floor, min_class_share=args.min_class_share,
            )
            predictions += [to_dataset[segmentation] for segmentation in out.segmentation]
        if ignore_background:
            labels = [np.where(np.isin(label, background_ids), IGNORE_INDEX, label) for label in labels]
        references += labels

    if unsupervised and matching == "split":
        table = split_cluster_table(predictions, references, unmatched=num_labels)
        predictions = [table[clusters] for clusters in predictions]
    metrics = mean_iou(predictions, references, num_labels=num_labels, ignore_index=IGNORE_INDEX)
    report = metrics_report(metrics, {i: id2label.get(i, str(i)) for i in range(num_labels)}, len(references))
    report.update(
        mode="unsupervised" if unsupervised else "open-vocabulary",
        dataset=args.dataset, split=source.split, model=args.model, prompt=args.prompt, timesteps=timesteps,
        background="ignored" if ignore_background else ("scored" if background_ids else "none"),
        clusters=args.clusters if unsupervised else None,
        matching=matching if unsupervised else None,
        attention_floor=None if unsupervised else args.attention_floor,
        min_class_share=None if unsupervised else args.min_class_share,
    )
    if unsupervised:
        report["mean_k"] = float(np.mean(chosen_k))
        report["k_equals_labels"] = float(np.mean(np.equal(chosen_k, true_k)))
    print(
        f"MaskDiffusion ({report['mode']}) on {args.dataset} [{source.split}], model {args.model}, "
        f"timesteps {timesteps}, background {report['background']}"
    )
    print(format_report(report))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
