"""Synthetic COCO (80 classes) with the DiffuMask recipe of ``voc_diffumask.py``.

Same model and mask settings as the VOC script (SD 1.4, 512², 50 steps, guidance 7,
cross-attention at 16²/32²/64², adaptive threshold, components under 1500 px² dropped,
best 30% kept when ``--agreement-model`` is given); 1000 prompts per class by default.

    accelerate launch dataset_scripts/coco_diffumask.py --out coco-diffumask
"""

import sys

from voc_diffumask import SETTINGS as VOC_SETTINGS  # this folder is on sys.path when a script in it runs

from diffuseg.generation import run_dataset_script

SETTINGS = {**VOC_SETTINGS, "out": "coco-diffumask", "classes": "coco80", "images_per_class": 1000}

if __name__ == "__main__":
    sys.exit(run_dataset_script(SETTINGS, __doc__))
