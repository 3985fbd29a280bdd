"""Are a ShapesWorld counterfactual set's negatives "the same scene without the object"?

    python benchmarks/counterfactual_negatives.py DATASET [--split train] [--max-background-change 8]

DATASET is a folder written by ``diffuseg generate --pipeline counterfactual --classes shapes``.
The geometric recogniser (``diffuseg.shapesworld.recognize``, nothing learned) reads each pair:

- **no object**: the negative has no object pixels at all (no saturated colour region);
- **background kept**: outside the positive's objects (its colour regions and its mask, grown by
  3 px) the negative's mean absolute difference to the positive is under
  ``--max-background-change`` (0-255 scale);
- **both**: the pair is what MagicSeg's loss assumes.

Prints one JSON line: the three shares, the median and 90th percentile of the background change,
and which colours the negatives still show.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from diffuseg.shapesworld.recognize import color_regions
from diffuseg.training_data import load_source


def negative_verdicts(positive: np.ndarray, negative: np.ndarray, label: np.ndarray, max_change: float) -> dict:
    """The recogniser's reading of one pair (uint8 H×W×3 images, the positive's label map)."""
    left = color_regions(negative)
    objects = np.asarray(label) > 0
    for region in color_regions(positive).values():
        objects |= region
    outside = ~ndimage.binary_dilation(objects, iterations=3)
    change = np.abs(positive.astype(float) - negative.astype(float)).mean(-1)[outside].mean() if outside.any() else 0.0
    return {"no_object": not left, "background_kept": bool(change < max_change), "change": float(change),
            "colors_left": sorted(left)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a counterfactual dataset folder (Hub layout, negative_image column)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-background-change", type=float, default=8.0,
                        help="mean absolute difference outside the objects (0-255) under which the background counts as kept")
    args = parser.parse_args(argv)
    dataset = load_source(args.dataset, args.split).dataset
    if "negative_image" not in dataset.column_names:
        raise SystemExit(f"{args.dataset} has no negative_image column: generate it with --pipeline counterfactual")
    verdicts = [
        negative_verdicts(np.asarray(row["image"].convert("RGB")), np.asarray(row["negative_image"].convert("RGB")),
                          np.asarray(row["label"]), args.max_background_change)
        for row in dataset
    ]
    changes = [v["change"] for v in verdicts]
    report = {
        "rows": len(verdicts),
        "no_object": float(np.mean([v["no_object"] for v in verdicts])),
        "background_kept": float(np.mean([v["background_kept"] for v in verdicts])),
        "both": float(np.mean([v["no_object"] and v["background_kept"] for v in verdicts])),
        "background_change_median": float(np.median(changes)),
        "background_change_p90": float(np.percentile(changes, 90)),
        "colors_left": dict(Counter(c for v in verdicts for c in v["colors_left"]).most_common()),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
