"""CounterfactualFluxPipeline as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("counterfactual_flux"),
                                      trust_remote_code=True)

From a clone's root, ``"pipelines/counterfactual_flux"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.counterfactual_families import CounterfactualFluxPipeline

expose_only(globals(), CounterfactualFluxPipeline)

__all__ = ["CounterfactualFluxPipeline"]
