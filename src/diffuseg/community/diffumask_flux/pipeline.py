"""DiffuMaskFluxPipeline as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("diffumask_flux"),
                                      trust_remote_code=True)

From a clone's root, ``"pipelines/diffumask_flux"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.diffumask_families import DiffuMaskFluxPipeline

expose_only(globals(), DiffuMaskFluxPipeline)

__all__ = ["DiffuMaskFluxPipeline"]
