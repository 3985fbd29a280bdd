"""MaskDiffusion (training-free segmentation of real images) as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/maskdiffusion", trust_remote_code=True)

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.maskdiffusion import MaskDiffusionSegPipeline

expose_only(globals(), MaskDiffusionSegPipeline)

__all__ = ["MaskDiffusionSegPipeline"]
