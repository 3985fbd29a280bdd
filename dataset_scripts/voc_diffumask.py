"""Synthetic Pascal VOC (20 classes) with DiffuMask's published settings.

Wu et al., "DiffuMask", ICCV 2023: Stable Diffusion 1.4 at 512², 50 denoising steps,
guidance 7; cross-attention at 16², 32² and 64² averaged over all steps; adaptive
binarisation; contours under 1500 px² dropped; 60k images for VOC (3000 per class); noise
learning keeps the 30% of samples that agree best with a segmenter.

Differences, on purpose: DiffuMask refines maps with a per-class trained AffinityNet and a
dense CRF; diffuseg uses its training-free self-attention refinement instead. The agreement
filter runs only when a segmentation model is given (``--agreement-model``).

    python dataset_scripts/voc_diffumask.py --out voc-diffumask
    accelerate launch dataset_scripts/voc_diffumask.py --out voc-diffumask --push me/voc-diffumask
"""

import sys

from diffuseg.generation import run_dataset_script

SETTINGS = {
    "out": "voc-diffumask",
    "classes": "voc20",
    "images_per_class": 3000,
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
