"""CounterfactualSD3Pipeline as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("counterfactual_sd3"),
                                      trust_remote_code=True)

From a clone's root, ``"pipelines/counterfactual_sd3"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.counterfactual_families import CounterfactualSD3Pipeline

expose_only(globals(), CounterfactualSD3Pipeline)

__all__ = ["CounterfactualSD3Pipeline"]
