"""Training speed of ``diffuseg.training.train`` against a plain accelerate loop.

The baseline is written here the way transformers' ``run_semantic_segmentation_no_trainer.py``
does it: ``load_dataset`` + ``with_transform`` (pad with the ignore index, random crop,
horizontal flip, normalise), ``DataLoader(shuffle=True, collate_fn=default_data_collator)``,
AdamW, a linear schedule, ``accelerator.prepare`` and ``model(**batch).loss``. Same model
(SegFormer from a config, same seed), same rendered ShapesWorld data, same batch size and
steps, same augmentation (images as large as the crop: random crop = whole image, flip 0.5).
diffuseg's loop still does more per sample (label mapping by name, per-sample seeded
augmentation, weighted source mixing, the loss logged every step), so the ratio it prints
(diffuseg steps/s / baseline steps/s) shows what that costs; the target is >= 1.0.
``--augment default`` runs diffuseg with its default random *resized* crop (scale 0.5-2,
resized back with antialiasing) instead, which is more work than the baseline's crop.
Each round runs both loops back to back (alternating which goes first); the median of the
per-round ratios is the figure, so load from other processes hits both alike.

    python benchmarks/train_speed.py                           # ~3-5 minutes on 2 CPU cores
    python benchmarks/train_speed.py --config segformer-b0 --image-size 128 --steps 20
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def baseline_steps_per_second(folder: str, config: str, image_size: int, batch_size: int, steps: int, seed: int) -> float:
    """The plain accelerate loop; steps/s over the same span diffuseg times (first step included)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSemanticSegmentation, default_data_collator, get_scheduler

    from diffuseg.training import model_config
    from diffuseg.training_data import IMAGENET_MEAN, IMAGENET_STD

    accelerator = Accelerator()
    set_seed(seed)
    dataset = load_dataset(folder)["train"]
    names = dataset.features["classes"].feature.names
    model = AutoModelForSemanticSegmentation.from_config(
        model_config(config, {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}})
    )
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def preprocess(batch):
        pixel_values, labels = [], []
        for image, label in zip(batch["image"], batch["label"]):
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
            label = torch.from_numpy(np.array(label)).long()
            pad_h, pad_w = max(0, image_size - image.shape[1]), max(0, image_size - image.shape[2])
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=255)
            top = np.random.randint(0, image.shape[1] - image_size + 1)
            left = np.random.randint(0, image.shape[2] - image_size + 1)
            image = image[:, top : top + image_size, left : left + image_size]
            label = label[top : top + image_size, left : left + image_size]
            if np.random.rand() < 0.5:
                image, label = image.flip(-1), label.flip(-1)
            pixel_values.append((image - mean) / std)
            labels.append(label)
        return {"pixel_values": pixel_values, "labels": labels}

    loader = DataLoader(dataset.with_transform(preprocess), shuffle=True, collate_fn=default_data_collator, batch_size=batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)
    scheduler = get_scheduler("linear", optimizer, 0, steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    done = 0
    started = time.perf_counter()
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            done += 1
            if done >= steps:
                break
    return steps / (time.perf_counter() - started)


def diffuseg_steps_per_second(
    folder: str, config: str, image_size: int, batch_size: int, steps: int, seed: int, augment: str = "same"
) -> float:
    from diffuseg.training import TrainingArguments, train

    crop = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)} if augment == "same" else {}
    with tempfile.TemporaryDirectory() as output:
        result = train(
            TrainingArguments(
                train=[folder], output_dir=output, config=config, image_size=image_size, batch_size=batch_size,
                max_steps=steps, seed=seed, **crop,
            )
        )
    return result.steps_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="segformer-tiny", help="model preset or config.json (both loops)")
    parser.add_argument("--image-size", type=int, default=64, help="rendered image side = crop side")
    parser.add_argument("--images", type=int, default=64, help="training images rendered")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="back-to-back rounds, order alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", choices=["same", "default"], default="same", help="diffuseg's augmentation: the baseline's, or its own default")
    args = parser.parse_args()

    from diffuseg.shapesworld.dataset import write_real_dataset

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        folder = write_real_dataset(Path(root) / "shapes", n_train=args.images, n_val=1, n_test=1, size=args.image_size)
        run = (args.config, args.image_size, args.batch_size, args.steps, args.seed)
        ours_loop = functools.partial(diffuseg_steps_per_second, augment=args.augment)
        baseline, ours = [], []
        for round_index in range(args.rounds):
            loops = [(baseline, baseline_steps_per_second), (ours, ours_loop)]
            for results, measure in loops[:: 1 if round_index % 2 == 0 else -1]:  # alternate who goes first
                results.append(measure(folder, *run))
            print(f"round {round_index + 1}: baseline {baseline[-1]:.2f} steps/s, diffuseg {ours[-1]:.2f} steps/s, "
                  f"ratio {ours[-1] / baseline[-1]:.2f}")
    # Back-to-back pairs share the machine's load of the moment: their ratio is the robust figure.
    ratios = [mine / theirs for mine, theirs in zip(ours, baseline)]
    print(
        f"\n{args.config}, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s), "
        f"diffuseg augmentation: {args.augment}\n"
        f"plain accelerate loop (run_semantic_segmentation_no_trainer style): median {statistics.median(baseline):.2f} steps/s\n"
        f"diffuseg train:                                                    median {statistics.median(ours):.2f} steps/s\n"
        f"ratio diffuseg / baseline: median {statistics.median(ratios):.2f} over {args.rounds} back-to-back rounds "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 1.0)"
    )


if __name__ == "__main__":
    main()
