"""``GenerationConfig``: every setting of ``diffuseg generate``, validated, and the ones that define the dataset."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffuseg.generation.classes import ClassSet
from diffuseg.generation.plan import SampleRequest
from diffuseg.generation.prompts import DEFAULT_TEMPLATES, check_templates
from diffuseg.generation.registry import get_pipeline


MAX_SHARDS = 99_999
"""Shard names are ``train-NNNNN-of-NNNNN.parquet``: five digits."""


@dataclass
class GenerationConfig:
    """Everything ``diffuseg generate`` needs; the fields marked below define the dataset.

    Attributes:
        out: the dataset folder.
        classes: the classes (see :func:`parse_classes`).
        images_per_class: samples generated per class (each class is the first class of
            that many prompts); filters may remove some.
        pipeline: a registered pipeline (:data:`PIPELINES`).
        model: ``"shapesworld"``, a local pipeline folder or a Hub id.
        seed: run seed; sample ``i`` uses ``sample_seed(seed, i)``.
        templates: prompt templates (default: the class set's or :data:`DEFAULT_TEMPLATES`).
        prompt_model: local causal LM folder for MagicSeg-style descriptions.
        prompt_max_new_tokens: description length limit.
        counterfactual_replacement: what counterfactual prompts say in place of their objects
            (``None``: the model's, see :class:`~diffuseg.models.ModelDefaults`).
        object_modifiers: words that describe an object before its class word, removed with it in
            counterfactual prompts (``None``: the model's; ShapesWorld's colours).
        region_size: Free-Mask only: ``(min, max)`` area of an insertion region, fractions of the
            image (``None``: the model's, see :class:`~diffuseg.models.ModelDefaults`).
        two_class_fraction: share of prompts naming a second, random class.
        height, width, negative_prompt: generation.
        num_inference_steps, guidance_scale: sampling; ``None``: the model's (its ``diffuseg.json``,
            see :func:`diffuseg.models.model_defaults`; 50 and 7.5 for a model without one).
        resolutions, threshold, ignore_band, refine, min_component_area: mask extraction
            (see :class:`~diffuseg.pipelines.DiffuMaskPipeline`).
        min_mask_area: reject samples whose smallest named class covers less than this
            fraction of the image.
        max_ignore_fraction: reject samples with more ignore (255) pixels than this.
        agreement_model: segmentation model to compare masks with (transformers).
        agreement_min_iou: reject samples whose agreement IoU is below this (Free-Mask: 0.5).
        agreement_keep: keep this best fraction of each shard by agreement IoU (DiffuMask: 0.3).
        counterfactual_min_agreement: counterfactual pairs only: reject those whose two mask
            signals (the class words' attention and where the pair differs) agree less than this
            (IoU): the object was not removed, or something else changed.
        freemask_mode: ``--pipeline freemask``: ``"edit"`` (the object generated inside its region) or
            ``"paste"`` (Free-Mask's own: generated alone, pasted, harmonised).
        mosaic: 2 or 3 for 2×2 / 3×3 mosaics of kept samples (``None``: none).
        mosaic_fraction: mosaics added per generated sample (per shard).
        batch_size: prompts per pipeline call. Batched float math differs from a single call's in
            the last bits (±1 in a few pixels, measured), so it is part of the fingerprint: a resume
            with another batch size is refused rather than mixing two datasets.
        samples_per_shard: generated samples per shard (the unit of resumption).
        dtype: ``"auto"`` (float16 on CUDA, else float32), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        threads: torch CPU threads (``None``: torch's current count, set when the run starts). Like
            the batch size it changes the last bits of float math (±1 in a few pixels, measured with
            1 vs 2 threads), so it is part of the fingerprint and a resume must keep it.
    """

    out: str
    classes: ClassSet
    images_per_class: int
    pipeline: str = "diffumask"
    model: str = "shapesworld"
    seed: int = 0
    templates: tuple[str, ...] | None = None
    prompt_model: str | None = None
    prompt_max_new_tokens: int = 24
    counterfactual_replacement: str | None = None
    object_modifiers: tuple[str, ...] | None = None
    region_size: tuple[float, float] | None = None
    two_class_fraction: float = 0.0
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    resolutions: tuple[int, ...] | None = None
    threshold: str | float = "otsu"
    ignore_band: float = 0.0
    refine: bool = False
    min_component_area: int = 0
    min_mask_area: float = 0.0
    max_ignore_fraction: float = 1.0
    agreement_model: str | None = None
    agreement_min_iou: float | None = None
    agreement_keep: float | None = None
    counterfactual_min_agreement: float | None = None
    freemask_mode: str = "edit"
    mosaic: int | None = None
    mosaic_fraction: float = 0.25
    batch_size: int = 1
    samples_per_shard: int = 256
    dtype: str = "auto"
    threads: int | None = None
    # Runtime knobs: they do not change the dataset, so they stay out of the fingerprint.
    RUNTIME_FIELDS = ("out", "dtype")

    def __post_init__(self) -> None:
        if self.threads is None:
            import torch

            self.threads = torch.get_num_threads()
        # The model's defaults are filled in here, so the fingerprint and the card record the values used.
        from diffuseg.models import model_defaults

        defaults = model_defaults(self.model)
        for name in ("num_inference_steps", "guidance_scale", "counterfactual_replacement", "object_modifiers",
                     "region_size"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))

    def validate(self) -> None:
        """Raise ``ValueError`` / ``FileNotFoundError`` on settings that cannot work."""
        positive = {"images_per_class": self.images_per_class, "batch_size": self.batch_size, "threads": self.threads,
                    "samples_per_shard": self.samples_per_shard, "num_inference_steps": self.num_inference_steps,
                    "prompt_max_new_tokens": self.prompt_max_new_tokens}
        flags = {"num_inference_steps": "--steps"}  # fields whose flag has another name
        for name, value in positive.items():
            if int(value) < 1:
                raise ValueError(f"{flags.get(name, '--' + name.replace('_', '-'))} must be a positive integer, got {value}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"--{name} must be a positive multiple of 8, got {value}")
        fractions = {"two_class_fraction": self.two_class_fraction, "min_mask_area": self.min_mask_area,
                     "max_ignore_fraction": self.max_ignore_fraction, "mosaic_fraction": self.mosaic_fraction,
                     "ignore_band": self.ignore_band}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.agreement_min_iou is not None and not 0.0 <= self.agreement_min_iou <= 1.0:
            raise ValueError(f"--agreement-min-iou must be in [0, 1], got {self.agreement_min_iou}")
        if self.agreement_keep is not None and not 0.0 < self.agreement_keep <= 1.0:
            raise ValueError(f"--agreement-keep must be in (0, 1], got {self.agreement_keep}")
        if self.counterfactual_min_agreement is not None and not 0.0 <= self.counterfactual_min_agreement <= 1.0:
            raise ValueError(f"--counterfactual-min-agreement must be in [0, 1], got {self.counterfactual_min_agreement}")
        if (self.agreement_min_iou is not None or self.agreement_keep is not None) and not self.agreement_model:
            raise ValueError("--agreement-min-iou / --agreement-keep need --agreement-model")
        if self.freemask_mode not in ("edit", "paste"):
            raise ValueError(f"--freemask-mode must be 'edit' or 'paste', got {self.freemask_mode!r}")
        if self.mosaic is not None and self.mosaic not in (2, 3):
            raise ValueError(f"--mosaic must be 2 or 3, got {self.mosaic}")
        if self.two_class_fraction > 0 and len(self.classes.classes) < 2:
            raise ValueError("--two-class-fraction needs at least two classes")
        if isinstance(self.threshold, str) and self.threshold not in ("otsu", "adaptive"):
            raise ValueError(f"--threshold must be 'otsu', 'adaptive' or a number, got {self.threshold!r}")
        if not isinstance(self.threshold, str) and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must be otsu, adaptive or a number in [0, 1], got {self.threshold}")
        if not self.guidance_scale >= 0.0:  # also refuses NaN
            raise ValueError(f"--guidance-scale must be 0 or more (1 or less: no guidance), got {self.guidance_scale}")
        if self.seed < 0:
            raise ValueError(f"--seed must be 0 or more, got {self.seed}")
        shards = -(-self.num_samples // self.samples_per_shard)
        if shards > MAX_SHARDS:
            raise ValueError(
                f"--images-per-class {self.images_per_class} x {len(self.classes.classes)} classes = "
                f"{self.num_samples:,} samples, {shards:,} shards of {self.samples_per_shard}; the Hub layout names "
                f"at most {MAX_SHARDS:,} shards (NNNNN-of-NNNNN): generate fewer or raise --samples-per-shard"
            )
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.templates is not None:
            check_templates(self.templates)
        if self.resolutions is not None and (not self.resolutions or min(self.resolutions) < 1):
            raise ValueError(f"--resolutions must be positive map heights, got {self.resolutions}")
        if self.prompt_model is not None and not Path(self.prompt_model).expanduser().is_dir():
            raise FileNotFoundError(f"prompt model folder {self.prompt_model!r} does not exist (--prompt-model takes a local folder)")
        get_pipeline(self.pipeline)
        from diffuseg.models import resolve_model

        resolve_model(self.model)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define the dataset (stored with it; a rerun must match to resume)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.RUNTIME_FIELDS}
        values["classes"] = [dataclasses.asdict(c) for c in self.classes.classes]
        values["templates"] = list(self.prompter_templates())
        if self.pipeline != "freemask":  # only Free-Mask places regions: other sets keep their fingerprints
            values.pop("region_size")
        if self.freemask_mode == "edit":  # the default: folders written before the option keep resuming
            del values["freemask_mode"]
        if self.prompt_model is not None:
            values["prompt_model"] = os.path.basename(os.path.normpath(self.prompt_model))
        return json.loads(json.dumps(values))

    def pipeline_kwargs(self, requests: Sequence[SampleRequest]) -> dict[str, Any]:
        """The sampling and mask arguments every registered pipeline takes, for one call on ``requests``."""
        import torch

        return dict(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            # CPU generators: the same latents on any device, so a sample's seed regenerates it anywhere.
            generator=[torch.Generator().manual_seed(r.seed) for r in requests],
            threshold=self.threshold,
            ignore_band=self.ignore_band,
            refine=self.refine,
            min_component_area=self.min_component_area,
        )

    def text_to_image_kwargs(self, requests: Sequence[SampleRequest]) -> dict[str, Any]:
        """A whole DiffuMask-style call on ``requests``: prompts, class words, size, maps and :meth:`pipeline_kwargs`."""
        return dict(
            prompt=[r.prompt for r in requests],
            class_names=[r.words for r in requests],
            height=self.height,
            width=self.width,
            resolutions=self.resolutions,
            output_type="np",
            **self.pipeline_kwargs(requests),
        )

    def prompter_templates(self) -> tuple[str, ...]:
        return tuple(self.templates or self.classes.templates or DEFAULT_TEMPLATES)

    @property
    def num_samples(self) -> int:
        return self.images_per_class * len(self.classes.classes)

    @property
    def mosaic_slots(self) -> int:
        """Mosaic rows per full shard."""
        return round(self.mosaic_fraction * self.samples_per_shard) if self.mosaic else 0
