"""The package's diffusion pipelines, all ``diffusers.DiffusionPipeline`` subclasses."""

from diffuseg.pipelines.diffumask import DiffuMaskPipeline, DiffuMaskPipelineOutput

__all__ = ["DiffuMaskPipeline", "DiffuMaskPipelineOutput"]
