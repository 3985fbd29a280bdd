"""Synthetic ShapesWorld set from the embedded model, offline, with DiffuMask masks.

The embedded model draws coloured circles, squares and triangles at 64² (see its model
card): 25 DDIM steps, guidance 4; its UNet has cross-attention at 16² and 8², both used.
Prompts follow the captions it was trained on ("a picture of a red circle"); 30% name two
shapes. Otsu thresholds; a thin ignore band marks uncertain edges (255); samples whose
smallest named shape covers under 1% of the image are dropped.

    python dataset_scripts/shapes_diffumask.py --out shapes-diffumask
"""

import sys

from diffuseg.generation import run_dataset_script

SETTINGS = {
    "out": "shapes-diffumask",
    "classes": "shapes",
    "images_per_class": 1000,
    "pipeline": "diffumask",
    "model": "shapesworld",
    "height": 64,
    "width": 64,
    "num_inference_steps": 25,
    "guidance_scale": 4.0,
    "two_class_fraction": 0.3,
    "threshold": "otsu",
    "ignore_band": 0.05,
    "min_mask_area": 0.01,
    "agreement_keep": 0.3,
    "batch_size": 32,
    "seed": 0,
}

if __name__ == "__main__":
    sys.exit(run_dataset_script(SETTINGS, __doc__))
