"""DiffuMask: images with pixel masks from the cross-attention of Stable Diffusion.

Wu et al., "DiffuMask: Synthesizing Images with Pixel-level Annotations for Semantic
Segmentation Using Diffusion Models", ICCV 2023. While the image is generated, the
cross-attention of each class word is averaged over steps, layers and heads per
resolution; the resolutions are upsampled, max-normalised and averaged; the result is
(optionally) refined along self-attention affinities and thresholded into a label map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from diffuseg.attention import AttentionStore, capture, step_window
from diffuseg.masks import aggregate_resolutions, label_map, thresholds
from diffuseg.pipelines.checks import check_sampling_inputs, default_size

# Self-attention is recorded at the finest level with at most this many positions:
# explicit self-attention costs O(positions²) memory and time.
MAX_SELF_ATTENTION_TOKENS = 1024


@dataclass
class DiffuMaskPipelineOutput(BaseOutput):
    """Output of :class:`DiffuMaskPipeline`.

    Attributes:
        images: generated images, as ``output_type`` asks (list of PIL, ``(B, H, W, 3)`` array, ...).
        masks: label maps ``(B, H, W)``: 0 background, ``k`` the k-th class word (1-based) of
            the image's prompt, 255 ignore. PIL mode "L" images for ``output_type="pil"``,
            else a ``uint8`` array (a tensor for ``"pt"``).
        attention_maps: soft maps ``(B, C, H, W)`` in [0, 1], one per class word (zeros
            for the padding of prompts with fewer words); a tensor for ``"pt"``, else an array.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    attention_maps: np.ndarray | torch.Tensor


class DiffuMaskPipeline(StableDiffusionPipeline):
    """Stable Diffusion that also returns a segmentation mask of the named classes.

    Loads from any Stable Diffusion checkpoint, e.g.
    ``DiffuMaskPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")``,
    or with ``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/diffumask",
    trust_remote_code=True)``.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        class_names: Sequence[str] | Sequence[Sequence[str]] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        resolutions: Sequence[int] | None = None,
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
            height, width: image size, multiples of 8 (default: the model's native size).
            num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt, eta,
            generator, latents, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in ``StableDiffusionPipeline``; other
                keyword arguments (``timesteps``, ``sigmas``, ``cross_attention_kwargs``,
                ``clip_skip``, ...) are passed through to it. ``negative_prompt``: one string for
                every prompt, or one per prompt. An interrupted call (``pipe._interrupt`` set in a
                step-end callback) returns the images reached and masks from the attention recorded
                until then: all background if it stopped before ``attention_steps`` began.
            resolutions: heights of the cross-attention maps to aggregate (e.g. ``(16, 32, 64)``
                for SD at 512², DiffuMask's choice); ``None``: all.
            attention_steps: ``(start, end)`` fractions of the denoising steps whose attention
                is averaged, of the schedule actually run (custom ``timesteps`` or ``sigmas``
                included); at least one step. DiffuMask averages all of them.
            threshold: ``"otsu"``, ``"adaptive"`` (DiffuMask's search in 0.45–0.53), or a number.
            ignore_band: pixels within this distance of their threshold become 255 (ignore).
            refine: propagate the maps along self-attention affinities before thresholding
                (training-free; records self-attention at one resolution).
            refine_iterations: how many propagation steps ``refine`` takes.
            min_component_area: class components smaller than this many pixels become background.

        Returns:
            :class:`DiffuMaskPipelineOutput`, or ``(images, masks, attention_maps)`` when
            ``return_dict`` is False.
        """
        if "prompt_embeds" in kwargs:
            raise ValueError("DiffuMaskPipeline needs the prompt as text to find the class words; pass `prompt`")
        if prompt is None:
            raise ValueError("`prompt` is required")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        words = self.check_class_names(prompts, class_names)
        height, width = default_size(self, height, width)
        check_sampling_inputs(self, height, width, num_inference_steps, guidance_scale, resolutions)
        if not 0.0 <= attention_steps[0] < attention_steps[1] <= 1.0:
            raise ValueError(f"attention_steps must satisfy 0 <= start < end <= 1, got {attention_steps}")
        thresholds(torch.zeros(1, 1, 1), threshold)  # fail now, not after the generation, on a bad method

        # 1. Generate while recording the class words' cross-attention (and self-attention to refine).
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        with capture(
            self,
            words,
            resolutions=resolutions,
            # The window spans the schedule run, known once the pipeline has set its timesteps.
            steps=lambda: step_window(attention_steps, self.num_timesteps),
            self_attention_resolution=self_attention_height(latent_size) if refine else None,
        ) as maps:
            generated = super().__call__(
                prompt=prompts,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt_per_prompt(negative_prompt, len(prompts)),
                num_images_per_prompt=num_images_per_prompt,
                eta=eta,
                generator=generator,
                latents=latents,
                output_type=output_type,
                return_dict=True,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
                **kwargs,
            )

        # 2. Aggregate resolutions into one soft map per class word, at image size.
        attention = recorded_attention(
            maps.store, (height, width), refine_iterations if refine else 0, self.interrupt, self._execution_device
        )

        # 3. Threshold each map and assemble one label map per image.
        masks = label_maps_of(attention, words, num_images_per_prompt, threshold, ignore_band, min_component_area)

        self.maybe_free_model_hooks()
        return diffumask_output(generated.images, masks, attention, output_type, return_dict)

    @staticmethod
    def check_class_names(prompts: list[str], class_names) -> list[list[str]]:
        """One list of class words per prompt, validated (non-empty, lengths match)."""
        if class_names is None or len(class_names) == 0:
            raise ValueError("class_names is empty: name at least one class word that appears in the prompt")
        return one_list_per_prompt(class_names, len(prompts), "class names")


def label_maps_of(
    attention: torch.Tensor,
    words: list[list[str]],
    num_images_per_prompt: int,
    threshold: str | float,
    ignore_band: float,
    min_component_area: int,
) -> np.ndarray:
    """DiffuMask's label maps ``uint8 (images, H, W)`` from soft maps ``(images, C, H, W)``, for every model family.

    Each map is thresholded; image ``i`` uses the maps of its own prompt's words (the rest are
    padding); pixels near a threshold become 255, small components background.
    """
    cutoffs = thresholds(attention, threshold)
    words_per_image = [len(w) for w in words for _ in range(num_images_per_prompt)]
    masks = np.stack(
        [
            label_map(attention[i], cutoffs[i], ignore_band, min_component_area, num_classes=words_per_image[i])
            for i in range(attention.shape[0])
        ]
    )
    return masks


def diffumask_output(images, masks: np.ndarray, attention: torch.Tensor, output_type: str, return_dict: bool):
    """The pipeline's output: masks as PIL images for ``"pil"``, tensors for ``"pt"``, else arrays."""
    if output_type == "pil":
        masks = [PIL.Image.fromarray(mask, mode="L") for mask in masks]
    if output_type == "pt":
        masks = torch.from_numpy(masks)
    else:
        attention = attention.cpu().numpy().astype(np.float32)
    if not return_dict:
        return images, masks, attention
    return DiffuMaskPipelineOutput(images=images, masks=masks, attention_maps=attention)


def negative_prompt_per_prompt(negative_prompt: str | list[str] | None, prompts: int) -> list[str] | None:
    """``negative_prompt`` as one string per prompt: what ``StableDiffusionPipeline`` needs beside a list of prompts."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return None if negative_prompt is None else [negative_prompt] * prompts
    if len(negative_prompt) != prompts:
        raise ValueError(
            f"got {prompts} prompts but {len(negative_prompt)} negative prompts; "
            "give one negative prompt for all of them, or one per prompt"
        )
    return list(negative_prompt)


def recorded_attention(
    store: AttentionStore, size: tuple[int, int], refine_iterations: int, interrupted: bool, device: torch.device
) -> torch.Tensor:
    """DiffuMask's soft maps ``(images, words, H, W)`` from what ``store`` recorded, refined if asked.

    A call interrupted before its first recorded step has no attention: its maps are zeros.
    """
    per_resolution = store.cross_attention()
    if not per_resolution and interrupted:
        images, _, words = store.token_weights.shape
        return torch.zeros(images, words, *size, device=device)
    if not per_resolution:
        raise RuntimeError("no cross-attention was recorded: check `resolutions` and `attention_steps`")
    attention = aggregate_resolutions(list(per_resolution.values()), size)
    return store.refine(attention, refine_iterations) if refine_iterations else attention


def one_list_per_prompt(values: Sequence[str] | Sequence[Sequence[str]], prompts: int, what: str) -> list[list[str]]:
    """``values`` as one list of strings per prompt: a flat list is shared by all ``prompts``."""
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list, got the string {values!r}: wrap it in a list")
    if all(isinstance(value, str) for value in values):
        return [list(values) for _ in range(prompts)]
    if len(values) != prompts:
        raise ValueError(
            f"got {prompts} prompts but {len(values)} lists of {what}; "
            "give one list per prompt, or one flat list shared by all prompts"
        )
    return [list(names) for names in values]


def self_attention_height(latent_size: tuple[int, int]) -> int:
    """Height of the finest UNet level whose self-attention has at most MAX_SELF_ATTENTION_TOKENS positions."""
    height, width = latent_size
    level = 0
    while math.ceil(height / 2**level) * math.ceil(width / 2**level) > MAX_SELF_ATTENTION_TOKENS:
        level += 1
    return math.ceil(height / 2**level)
