"""Synthetic segmentation datasets from a text-to-image pipeline: the logic behind ``diffuseg generate``.

The modules, in the order a sample goes through them:

* :mod:`~diffuseg.generation.classes`: presets (``voc20``, ``coco80``, ``shapes``), comma lists or
  files, each class with the words that may name it in a prompt (synonyms) and context phrases;
* :mod:`~diffuseg.generation.prompts`: templates, or MagicSeg-style descriptions written by a local
  causal language model; every prompt is checked to contain its class words within the text
  encoder's limit;
* :mod:`~diffuseg.generation.plan`: which sample is what (seed, classes, prompt, writer slot);
* :mod:`~diffuseg.generation.registry` and :mod:`~diffuseg.generation.samplers`: name -> (load the
  model, generate samples from requests), so new pipelines plug in without touching the loop;
* :mod:`~diffuseg.generation.filters`: mask area, ignore fraction, agreement with a segmentation
  model (a minimum IoU as in Free-Mask, and/or the best fraction of each shard as in DiffuMask's
  noise learning), every measurement recorded per sample;
* :mod:`~diffuseg.generation.mosaic`: 2×2 / 3×3 tiles of images and their label maps;
* :mod:`~diffuseg.generation.config`: :class:`GenerationConfig`, the settings and their fingerprint;
* :mod:`~diffuseg.generation.runner`: :func:`generate_dataset` streams samples into a
  :class:`~diffuseg.data.DatasetWriter`, resumes after any interruption, and splits the work
  between ``accelerate`` processes;
* :mod:`~diffuseg.generation.card`: the dataset card's text;
* :mod:`~diffuseg.generation.scripts`: the command line of ``dataset_scripts/*.py``.

Determinism. Sample ``i`` of a run with ``seed`` uses ``sample_seed(seed, i)`` for its prompt,
its class choice and its latents (a CPU ``torch.Generator``), and the work is cut into
blocks of ``samples_per_shard`` consecutive samples that are produced whole, in a fixed
batch order, by one process. A block's content therefore depends only on the settings: the
dataset is the same after a ``kill -9`` and a rerun, and with any number of processes.
"""

from diffuseg.generation.card import collect_stats, describe
from diffuseg.generation.classes import PRESETS, ClassSet, ClassSpec, parse_classes
from diffuseg.generation.config import GenerationConfig
from diffuseg.generation.filters import SegmentationAgreement, agreement_iou, mask_stats
from diffuseg.generation.mosaic import mosaic
from diffuseg.generation.plan import SampleRequest, WorkPlan, sample_seed
from diffuseg.generation.prompts import (
    DEFAULT_TEMPLATES,
    DescriptionPrompter,
    TemplatePrompter,
    check_prompt,
    check_templates,
    format_prompt,
    read_templates,
)
from diffuseg.generation.registry import PIPELINES, PipelineSpec, get_pipeline, register_pipeline
from diffuseg.generation.runner import GenerationSummary, distributed_state, generate_dataset
from diffuseg.generation.samplers import remap_label, to_uint8
from diffuseg.generation.scripts import run_dataset_script

__all__ = [
    "DEFAULT_TEMPLATES", "PIPELINES", "PRESETS", "ClassSet", "ClassSpec", "DescriptionPrompter", "GenerationConfig",
    "GenerationSummary", "PipelineSpec", "SampleRequest", "SegmentationAgreement", "TemplatePrompter", "WorkPlan",
    "agreement_iou", "check_prompt", "check_templates", "collect_stats", "describe", "distributed_state",
    "format_prompt", "generate_dataset", "get_pipeline", "mask_stats", "mosaic", "parse_classes", "read_templates",
    "register_pipeline", "remap_label", "run_dataset_script", "sample_seed", "to_uint8",
]
