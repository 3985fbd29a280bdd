"""DiffuMask as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("diffumask"),
                                      trust_remote_code=True)

``diffuseg.community_pipeline("diffumask")`` is this folder's absolute path in the installed package; from a
clone's root, ``"pipelines/diffumask"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.diffumask import DiffuMaskPipeline

expose_only(globals(), DiffuMaskPipeline)

__all__ = ["DiffuMaskPipeline"]
