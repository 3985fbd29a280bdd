"""``diffuseg train``: train a semantic segmentation model on real and synthetic datasets.

Runs on one process, or on many with ``accelerate launch -m diffuseg train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses

from diffuseg.data import IGNORE_INDEX


HELP = "train a segmentation model (any transformers AutoModelForSemanticSegmentation)"
"""The command's line in ``diffuseg --help``."""


def add_parser(subparsers) -> None:
    from diffuseg.training import (
        COUNTERFACTUAL_LOSSES,
        DEFAULT_LORA_TARGETS,
        DEFAULT_SEGMENTATION_MODEL,
        MODEL_PRESETS,
        TrainingArguments,
    )

    defaults = TrainingArguments(train=[])
    parser = subparsers.add_parser(
        "train",
        help=HELP,
        description=(
            "Train or fine-tune a semantic segmentation model on datasets in the diffuseg layout "
            "(local folders or Hub ids), mixed with weights; evaluate with mean IoU. "
            "Label ids are matched across datasets by class name. "
            "Several processes or GPUs: accelerate launch -m diffuseg train ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--train", nargs="+", required=True, metavar="DATASET", help="training datasets: local folders or Hub ids")
    data.add_argument("--train-weights", nargs="+", type=float, metavar="W", help="sampling weight of each training dataset (default: proportional to size)")
    data.add_argument("--eval", nargs="+", default=[], metavar="DATASET", help="evaluation datasets, each scored on its own")
    data.add_argument("--train-split", help="split of the training datasets (default: train, or the only one)")
    data.add_argument("--eval-split", help="split of the evaluation datasets (default: validation, else test, or the only one)")
    data.add_argument("--image-column", default=defaults.image_column, help="column of the images")
    data.add_argument("--label-column", default=defaults.label_column, help=f"column of the label maps (8-bit, {IGNORE_INDEX} = ignore)")
    data.add_argument("--labels", nargs="+", metavar="NAME", help="class names of the model in id order (default: those of the training datasets)")
    data.add_argument("--unseen-classes", nargs="+", metavar="NAME", help="zero-shot: classes ignored in the real training data; evaluation adds seen/unseen/harmonic mIoU")
    data.add_argument("--real-train", nargs="+", metavar="DATASET", help="training datasets that are real data (default: those whose 'pipeline' column is absent, empty or 'render')")
    data.add_argument("--counterfactual-weight", type=float, default=defaults.counterfactual_weight, help="weight of the counterfactual loss on datasets with a negative_image column (0: off)")
    data.add_argument("--counterfactual-loss", choices=list(COUNTERFACTUAL_LOSSES), default=defaults.counterfactual_loss, help="form of the counterfactual loss: " + "; ".join(f"{name}: {what}" for name, what in COUNTERFACTUAL_LOSSES.items()))

    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"pretrained model to fine-tune, Hub id or folder (default: {DEFAULT_SEGMENTATION_MODEL})")
    model.add_argument("--config", help=f"train from scratch instead: a preset ({', '.join(MODEL_PRESETS)}), a config.json, or a model folder / Hub id")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters on the backbone and the decode head fully")
    model.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="LoRA rank")
    model.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha, help="LoRA alpha")
    model.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout, help="LoRA dropout")
    model.add_argument("--lora-target-modules", nargs="+", default=list(DEFAULT_LORA_TARGETS), metavar="NAME", help="backbone layer names that get adapters")

    augment = parser.add_argument_group("preprocessing and augmentation")
    augment.add_argument("--image-size", type=int, default=defaults.image_size, help="side of the square images fed to the model")
    augment.add_argument("--crop-scale", nargs=2, type=float, default=list(defaults.crop_scale), metavar=("MIN", "MAX"), help="random resized crop: area relative to the image (above 1 pads with the ignore index)")
    augment.add_argument("--crop-ratio", nargs=2, type=float, default=list(defaults.crop_ratio), metavar=("MIN", "MAX"), help="random resized crop: aspect ratio range")
    augment.add_argument("--hflip-prob", type=float, default=defaults.hflip_prob, help="probability of a horizontal flip")

    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--output-dir", default=defaults.output_dir, help="where the model, checkpoints, logs and model card go")
    loop.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size per process")
    loop.add_argument("--eval-batch-size", type=int, help="evaluation batch size per process (default: --batch-size)")
    loop.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="AdamW learning rate")
    loop.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    loop.add_argument("--lr-scheduler", default=defaults.lr_scheduler, help="transformers scheduler name (linear, cosine, polynomial, constant, ...)")
    loop.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="learning-rate warm-up steps")
    loop.add_argument("--max-grad-norm", type=float, help="clip gradients to this norm (default: no clipping)")
    loop.add_argument("--eval-steps", type=int, help="evaluate every N steps (always at the end)")
    loop.add_argument("--checkpoint-steps", type=int, help="save a resumable checkpoint every N steps")
    loop.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints, help="how many recent checkpoints to keep")
    loop.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT", help="resume from a checkpoint folder, or without a value from the latest one in --output-dir")
    loop.add_argument("--seed", type=int, default=defaults.seed, help="random seed (initialisation, sampling, augmentation)")
    loop.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data loader worker processes per training process (4+ on GPUs)")
    loop.add_argument("--report-to", choices=["tensorboard"], help="log losses and metrics under --output-dir (needs tensorboard)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from diffuseg.training import TrainingArguments, train

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    values = {name: value for name, value in vars(args).items() if name in names}
    values["crop_scale"], values["crop_ratio"] = tuple(args.crop_scale), tuple(args.crop_ratio)
    train(TrainingArguments(**values))
    return 0
