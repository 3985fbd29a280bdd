"""MaskDiffusion (training-free segmentation of real images) as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/maskdiffusion", trust_remote_code=True)

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.maskdiffusion import MaskDiffusionSegPipeline

__all__ = ["MaskDiffusionSegPipeline"]
