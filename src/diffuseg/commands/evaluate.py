"""``diffuseg evaluate MODEL DATASET``: mean IoU of a segmentation model on a dataset.

Prints the per-class table and the summary figures (``--json``: one JSON object). Runs on
one process, or on many with ``accelerate launch -m diffuseg evaluate ...``.
"""

from __future__ import annotations

import argparse
import json


HELP = "score a segmentation model on a dataset (mean IoU, per-class IoU and accuracy)"
"""The command's line in ``diffuseg --help``."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help=HELP,
        description=(
            "Score a model saved by `diffuseg train` (or any AutoModelForSemanticSegmentation "
            "folder / Hub id, LoRA adapter folders included) on a dataset in the diffuseg layout. "
            "The dataset's classes are matched to the model's id2label by name."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub id")
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder or Hub id")
    parser.add_argument("--split", help="dataset split (default: validation, else test, or the only one)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch and process")
    parser.add_argument("--image-size", type=int, help="side of the square model input (default: the model's image processor)")
    parser.add_argument("--unseen-classes", nargs="+", metavar="NAME", help="classes held out in training: adds seen/unseen/harmonic mIoU")
    parser.add_argument("--image-column", default="image", help="column of the images")
    parser.add_argument("--label-column", default="label", help="column of the label maps")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from diffuseg.evaluation import (
        evaluate_segmentation,
        format_report,
        load_segmentation_model,
        metrics_report,
        saved_image_transform,
    )
    from diffuseg.training import unseen_class_ids
    from diffuseg.training_data import SegmentationSamples, label_lookup, load_source, segmentation_loader

    accelerator = Accelerator()
    with accelerator.main_process_first():
        source = load_source(args.dataset, args.split, ("validation", "test"), args.image_column, args.label_column)
    model = load_segmentation_model(args.model)
    label_space = {int(label_id): name for label_id, name in model.config.id2label.items()}
    unseen = unseen_class_ids(args.unseen_classes or [], label_space)
    transform = saved_image_transform(args.model, args.image_size)
    samples = SegmentationSamples([source], [label_lookup(source, label_space)], transform, len(label_space))
    loader = accelerator.prepare_data_loader(segmentation_loader(samples, args.batch_size, args.num_workers))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    metrics, images = evaluate_segmentation(model, loader, accelerator, len(label_space), unseen or None, f"eval {source.name}")
    report = metrics_report(metrics, label_space, images, source.split)
    if accelerator.is_main_process:
        if args.json:
            print(json.dumps({"model": args.model, "dataset": source.name, **report}))
        else:
            print(f"{source.name}, {source.split} split\n{format_report(report, args.unseen_classes or ())}")
    return 0
