"""DiffuMaskFluxPipeline as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/diffumask_flux", trust_remote_code=True)

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.diffumask_families import DiffuMaskFluxPipeline

expose_only(globals(), DiffuMaskFluxPipeline)

__all__ = ["DiffuMaskFluxPipeline"]
