"""The package's diffusion pipelines, all ``diffusers.DiffusionPipeline`` subclasses."""

from diffuseg.pipelines.counterfactual import CounterfactualAttention, CounterfactualOutput, CounterfactualPipeline
from diffuseg.pipelines.counterfactual_families import (
    CounterfactualFluxPipeline,
    CounterfactualSD3Pipeline,
    CounterfactualXLPipeline,
)
from diffuseg.pipelines.diffumask import DiffuMaskPipeline, DiffuMaskPipelineOutput
from diffuseg.pipelines.diffumask_families import DiffuMaskFluxPipeline, DiffuMaskSD3Pipeline, DiffuMaskXLPipeline
from diffuseg.pipelines.maskdiffusion import MaskDiffusionSegOutput, MaskDiffusionSegPipeline
from diffuseg.pipelines.freemask import FreeMaskEditOutput, FreeMaskEditPipeline, FreeMaskObject, InsertionRecord

__all__ = [
    "CounterfactualAttention",
    "CounterfactualFluxPipeline",
    "CounterfactualOutput",
    "CounterfactualPipeline",
    "CounterfactualSD3Pipeline",
    "CounterfactualXLPipeline",
    "DiffuMaskFluxPipeline",
    "DiffuMaskPipeline",
    "DiffuMaskPipelineOutput",
    "DiffuMaskSD3Pipeline",
    "DiffuMaskXLPipeline",
    "FreeMaskEditOutput",
    "FreeMaskEditPipeline",
    "FreeMaskObject",
    "InsertionRecord",
    "MaskDiffusionSegOutput",
    "MaskDiffusionSegPipeline",
]
