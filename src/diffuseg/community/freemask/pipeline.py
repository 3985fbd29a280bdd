"""Free-Mask editing as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline=diffuseg.community_pipeline("freemask"),
                                      trust_remote_code=True)

``diffuseg.community_pipeline("freemask")`` is this folder's absolute path in the installed package; from a
clone's root, ``"pipelines/freemask"`` is the same folder (a link).

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffuseg.pipelines.community import expose_only
from diffuseg.pipelines.freemask import FreeMaskEditPipeline

expose_only(globals(), FreeMaskEditPipeline)

__all__ = ["FreeMaskEditPipeline"]
