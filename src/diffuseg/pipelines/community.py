"""Support for the diffusers community-pipeline shims under ``pipelines/<name>/pipeline.py``."""

from __future__ import annotations

from typing import Any


def expose_only(namespace: dict[str, Any], pipeline_class: type) -> None:
    """Leave ``pipeline_class`` the only non-diffusers ``DiffusionPipeline`` subclass in ``namespace``.

    diffusers imports every local custom pipeline as the same module
    (``diffusers_modules.local.pipeline``) and re-executes it in place, so the class an earlier
    shim exposed in this process is still in the module; the loader needs exactly one.
    """
    from diffusers import DiffusionPipeline

    for name, value in list(namespace.items()):
        if (
            isinstance(value, type)
            and issubclass(value, DiffusionPipeline)
            and value is not pipeline_class
            and value.__module__.split(".")[0] != "diffusers"
        ):
            del namespace[name]
