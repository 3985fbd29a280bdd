"""Synthetic COCO (80 classes) with the DiffuMask recipe of ``voc_diffumask.py``.

Same model and mask settings as the VOC script (SD 1.4, 512², 50 steps, guidance 7,
cross-attention at 16²/32²/64², adaptive threshold, components under 1500 px² dropped,
best 30% kept when ``--agreement-model`` is given); 1000 prompts per class by default.

    accelerate launch dataset_scripts/coco_diffumask.py --out coco-diffumask
"""

import sys

from diffuseg.generation import run_dataset_script

SETTINGS = {
    "out": "coco-diffumask",
    "classes": "coco80",
    "images_per_class": 1000,
    "pipeline": "diffumask",
    "model": "CompVis/stable-diffusion-v1-4",
    "height": 512,
    "width": 512,
    "num_inference_steps": 50,
    "guidance_scale": 7.0,
    "resolutions": (16, 32, 64),
    "threshold": "adaptive",
    "refine": True,
    "min_component_area": 1500,
    "agreement_keep": 0.3,
    "seed": 0,
}

if __name__ == "__main__":
    sys.exit(run_dataset_script(SETTINGS, __doc__))
