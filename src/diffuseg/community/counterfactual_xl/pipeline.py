"""CounterfactualXLPipeline as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("counterfactual_xl"),
                                      trust_remote_code=True)

From a clone's root, ``"pipelines/counterfactual_xl"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.counterfactual_families import CounterfactualXLPipeline

expose_only(globals(), CounterfactualXLPipeline)

__all__ = ["CounterfactualXLPipeline"]
