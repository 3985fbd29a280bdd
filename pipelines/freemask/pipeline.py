"""Free-Mask editing as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/freemask", trust_remote_code=True)

The implementation lives in the installed ``diffuseg`` package (``pip install diffuseg``);
this file exposes its one pipeline class to diffusers' custom-pipeline loader.
"""

from diffusers import DiffusionPipeline

from diffuseg.pipelines.freemask import FreeMaskEditPipeline

# diffusers imports every local custom pipeline as one module (diffusers_modules.local.pipeline)
# and re-executes it in place, so a class another shim exposed earlier in this process is still
# here; its loader needs exactly one pipeline class.
for _name, _value in list(globals().items()):
    if (
        isinstance(_value, type)
        and issubclass(_value, DiffusionPipeline)
        and _value is not FreeMaskEditPipeline
        and _value.__module__.split(".")[0] != "diffusers"
    ):
        del globals()[_name]
del _name, _value

__all__ = ["FreeMaskEditPipeline"]
