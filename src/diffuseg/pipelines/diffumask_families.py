"""DiffuMask on SDXL, SD3/SD3.5 and FLUX.1: each family's own pipeline, plus masks.

The method is the one of :mod:`diffuseg.pipelines.diffumask` (maps → label maps in
:func:`~diffuseg.pipelines.diffumask.label_maps_of`); a family contributes only its
pipeline (how the denoiser is driven) and its backend (how its attention is read,
:mod:`diffuseg.backends`). Each class accepts every argument of the family's pipeline
(``prompt_2``, ``negative_prompt``, ``guidance_scale``, ``true_cfg_scale``,
``max_sequence_length``, ``sigmas``, ...) and adds DiffuMask's::

    pipe = DiffuMaskFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")
    out = pipe("a photo of a dog on the grass", class_names=["dog", "grass"])
    out.images, out.masks, out.attention_maps
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from diffuseg.attention import MapSource, capture, step_window
from diffuseg.backends import backend_for, denoiser_of
from diffuseg.masks import thresholds
from diffuseg.pipelines.diffumask import (
    DiffuMaskPipelineOutput,
    diffumask_output,
    label_maps_of,
    one_list_per_prompt,
    self_attention_height,
)


class DiffuMaskFamilyMixin:
    """DiffuMask's ``__call__`` over any family pipeline it is mixed into (first in the bases)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        class_names: Sequence[str] | Sequence[Sequence[str]] | None = None,
        *,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        maps_from: MapSource = "cross_attention",
        other_concepts: Sequence[str] | None = None,
        resolutions: Sequence[int] | None = None,
        blocks: Sequence[int] | None = None,
        attention_steps: tuple[float, float] = (0.0, 1.0),
        threshold: str | float = "otsu",
        ignore_band: float = 0.0,
        refine: bool = False,
        refine_iterations: int = 1,
        min_component_area: int = 0,
        **kwargs: Any,
    ) -> DiffuMaskPipelineOutput | tuple:
        r"""Generate images and the masks of ``class_names``.

        Args:
            prompt: the prompt or prompts; each must contain its class words.
            class_names: class words, the same for every prompt, or one list per prompt.
                Mask value ``k`` is the k-th word of the image's list.
            num_images_per_prompt, output_type, return_dict: as in the family's pipeline; every
                other keyword argument (``height``, ``width``, ``num_inference_steps``,
                ``guidance_scale``, ``negative_prompt``, ``generator``, ...) goes to it unchanged.
            maps_from: ``"cross_attention"``: the words' share of the image's attention;
                ``"concepts"`` (SD3, FLUX): ConceptAttention's maps (see :func:`diffuseg.capture`).
            other_concepts: with ``maps_from="concepts"``, concepts that compete for pixels but
                get no mask; default ``["background"]`` (with one class word and no other concept,
                the softmax over concepts would give it every pixel).
            resolutions: UNet only: heights of the attention maps to aggregate; ``None``: all.
            blocks: MM-DiT only: transformer blocks whose attention is averaged; ``None``: all.
            attention_steps: ``(start, end)`` fractions of the steps actually run whose attention
                is averaged (custom ``timesteps``/``sigmas`` included).
            threshold, ignore_band, refine, refine_iterations, min_component_area: as in
                :class:`~diffuseg.pipelines.DiffuMaskPipeline`.

        Returns:
            :class:`~diffuseg.pipelines.diffumask.DiffuMaskPipelineOutput`, or
            ``(images, masks, attention_maps)`` when ``return_dict`` is False.
        """
        name = type(self).__name__
        if kwargs.get("prompt_embeds") is not None:
            raise ValueError(f"{name} needs the prompt as text to find the class words; pass `prompt`")
        if prompt is None:
            raise ValueError("`prompt` is required")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if class_names is None or len(class_names) == 0:
            raise ValueError("class_names is empty: name at least one class word that appears in the prompt")
        words = one_list_per_prompt(class_names, len(prompts), "class names")
        if not 0.0 <= attention_steps[0] < attention_steps[1] <= 1.0:
            raise ValueError(f"attention_steps must satisfy 0 <= start < end <= 1, got {attention_steps}")
        thresholds(torch.zeros(1, 1, 1), threshold)  # fail now, not after the generation, on a bad method
        if other_concepts is None:
            other_concepts = ["background"] if maps_from == "concepts" else []

        # 1. Generate with the family's own pipeline while recording the class words' maps.
        height = kwargs.get("height") or self.default_sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.default_sample_size * self.vae_scale_factor
        per_position = backend_for(denoiser_of(self)).pixels_per_position(self)
        grid = (height // per_position, width // per_position)
        with capture(
            self,
            words,
            resolutions=resolutions,
            blocks=blocks,
            # The window spans the schedule run, known once the pipeline has set its timesteps.
            steps=lambda: step_window(attention_steps, self.num_timesteps),
            maps_from=maps_from,
            other_concepts=other_concepts,
            self_attention_resolution=self_attention_height(grid) if refine else None,
        ) as maps:
            generated = super().__call__(
                prompt=prompt,  # as given: the family pipeline pairs a string with a string negative_prompt
                num_images_per_prompt=num_images_per_prompt,
                output_type=output_type,
                return_dict=True,
                **kwargs,
            )

        # 2. One soft map per class word at image size, as DiffuMask aggregates them.
        attention = maps.aggregate(maps.image_size)
        if refine:
            attention = maps.store.refine(attention, refine_iterations)

        # 3. What DiffuMask does with maps: threshold them into label maps.
        masks = label_maps_of(attention, words, num_images_per_prompt, threshold, ignore_band, min_component_area)
        self.maybe_free_model_hooks()
        return diffumask_output(generated.images, masks, attention, output_type, return_dict)


class DiffuMaskXLPipeline(DiffuMaskFamilyMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL that also returns segmentation masks of the named classes.

    Maps: UNet cross-attention (both CLIP encoders share the 77 positions). At 1024² SDXL's
    attention levels are 32² and 64² (its finest level has no attention).
    ``DiffuMaskXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")`` or
    ``custom_pipeline=diffuseg.community_pipeline("diffumask_xl")``.
    """


class DiffuMaskSD3Pipeline(DiffuMaskFamilyMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 that also returns segmentation masks of the named classes.

    Maps: the image → text part of the joint attention (CLIP and T5 positions, one vote each;
    works without the T5 encoder), conditional branch of the guided batch, at the patch grid.
    ``DiffuMaskSD3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")`` or
    ``custom_pipeline=diffuseg.community_pipeline("diffumask_sd3")``.
    """


class DiffuMaskFluxPipeline(DiffuMaskFamilyMixin, FluxPipeline):
    """FLUX.1 that also returns segmentation masks of the named classes.

    Maps: the image → T5-text part of the joint attention in the double- and single-stream
    blocks, at the 2×2-packed patch grid. FLUX-dev is guidance-distilled (one pass per step);
    with ``true_cfg_scale > 1`` and a ``negative_prompt`` the negative pass is not recorded.
    ``DiffuMaskFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")`` or
    ``custom_pipeline=diffuseg.community_pipeline("diffumask_flux")``.
    """
