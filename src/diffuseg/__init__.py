"""diffuseg: segmentation data and training-free segmentation from text-to-image diffusion models."""

__version__ = "0.1.0"
