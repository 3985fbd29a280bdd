"""Counterfactual pairs: an image with its mask, and the same scene without the object.

After MagicSeg (Cai et al., "MagicSeg: Open-World Segmentation Pretraining via
Counterfactual Diffusion-Based Auto-Generation"), which pairs each positive image with a
negative one generated from the same description with the class words replaced by
"nothing" -- there from an unrelated seed, so the two scenes have nothing in common.
Here both images come out of one denoising loop from the same initial latents, and for
the first steps the counterfactual reuses the positive's attention in the manner of
prompt-to-prompt (Hertz et al., 2022): its self-attention, and its cross-attention for
every token except the replaced words. The scene stays, only the object goes, and the
per-pixel difference between the two images becomes a second mask signal next to the
positive's class-word cross-attention (DiffuMask's signal).

Injection alone does not keep the scene on every model: a small model asked for "a picture
of a background" draws dark frames and streaks over the whole image (measured on ShapesWorld:
no negative kept the positive's background). So, as in blended latent diffusion (Avrahami et
al., 2023), from ``blend_start`` of the steps on the counterfactual's latents outside the
object (the positive's class-word attention so far, thresholded, dilated) are replaced by the
positive's at every step, and the decoded counterfactual is composited onto the decoded
positive through the same region: equal latents alone do not give equal pixels, because a
VAE decoder with self-attention spreads the redrawn region's change over the whole image
(measured: the frames and streaks came back from identical background latents). The
background is the positive's, only the object's region is redrawn from the counterfactual prompt.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffuseg.attention import (
    AttentionStore,
    Size,
    StepWindow,
    attention_control,
    step_window,
)
from diffuseg.backends import backend_for, denoiser_of, mmdit
from diffuseg.masks import (
    aggregate_resolutions,
    label_map,
    normalize_max,
    thresholds,
    upsample,
)
from diffuseg.models import pipeline_defaults
from diffuseg.pipelines.checks import check_sampling_inputs, default_size
from diffuseg.pipelines.diffumask import (
    MAX_SELF_ATTENTION_TOKENS,
    DiffuMaskPipeline,
    negative_prompt_per_prompt,
    one_list_per_prompt,
    recorded_attention,
    self_attention_height,
)
from diffuseg.tokens import (
    TextSegment,
    replace_words,
    replacement_token_alignment,
    sequence_token_weights,
)

DIFFERENCE_SOURCES = ("image", "latent")
FUSIONS = ("geometric", "mean")


@dataclass
class CounterfactualOutput(BaseOutput):
    """Output of :class:`CounterfactualPipeline`.

    Attributes:
        images: the positive images, as ``output_type`` asks (list of PIL, ``(B, H, W, 3)`` array, ...).
        negative_images: the counterfactual images, same scene without the class words' objects,
            in the same order and format as ``images``.
        masks: label maps ``(B, H, W)`` from the fused signals: 0 background, ``k`` the k-th class
            word of the image's prompt, 255 ignore. PIL mode "L" images for ``output_type="pil"``,
            else a ``uint8`` array (a tensor for ``"pt"``).
        difference_maps: ``(B, H, W)`` in [0, 1]: where the counterfactual differs from the positive.
        agreement: ``(B,)`` IoU between the foreground of the attention maps and that of the
            difference map, each thresholded on its own; low values flag doubtful samples.
        attention_maps: ``(B, C, H, W)`` in [0, 1]: the positive's class-word cross-attention
            (zeros for the padding of prompts with fewer words).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    negative_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    difference_maps: np.ndarray | torch.Tensor
    agreement: np.ndarray | torch.Tensor
    attention_maps: np.ndarray | torch.Tensor


class CounterfactualAttention(AttentionStore):
    """Records the positives' class-word attention and injects the positives' attention into the counterfactuals.

    The UNet batch is ``[positives, counterfactuals]``, each ``images`` long, and under
    classifier-free guidance ``[unconditional: positives, counterfactuals, conditional: positives,
    counterfactuals]``. Recording (the :class:`AttentionStore` part) sees the conditional
    positives only. Injection replaces the counterfactuals' probabilities, in both guidance
    halves, by the positives':

    * self-attention, entirely, at the heights in ``self_attention_resolutions``;
    * cross-attention, for every token of the counterfactual prompt that stands for a token of
      the positive prompt (``token_alignment``); the tokens of the replacement keep their own
      attention, and each row is renormalised to sum to one. The unconditional halves read the
      same (negative) prompt, so there every token is copied.

    Args:
        token_weights: ``(images, tokens, words)`` of the positive prompts, for recording.
        token_alignment: ``(images, tokens)``: for each counterfactual token, the positive token
            it copies attention from, -1 for none (see :func:`diffuseg.tokens.replacement_token_alignment`).
        self_attention_steps: injects self-attention in UNet evaluations ``[0, self_attention_steps)``;
            a function returning the number is called at the first UNet evaluation (see ``steps``).
        cross_attention_steps: injects cross-attention in UNet evaluations ``[0, cross_attention_steps)``;
            or a function, as ``self_attention_steps``.
        self_attention_resolutions: heights of the self-attention maps to inject; ``None``: every
            level coarser than the finest (the latent's own size) with at most
            ``MAX_SELF_ATTENTION_TOKENS`` (32²) positions. Explicit self-attention costs
            ``O(positions²)``: the finest level alone costs 16× the next one.
        resolutions, steps, self_attention_resolution: recording, as in :class:`AttentionStore`.
        rows_are_text_share: the cross-attention rows are the text keys' part of a joint softmax
            (MM-DiT): an edited row keeps the counterfactual's own text share instead of summing to one.
    """

    def __init__(
        self,
        token_weights: torch.Tensor,
        token_alignment: torch.Tensor,
        self_attention_steps: int | Callable[[], int],
        cross_attention_steps: int | Callable[[], int],
        self_attention_resolutions: Iterable[int] | None = None,
        resolutions: Iterable[int] | None = None,
        steps: StepWindow | Callable[[], StepWindow] | None = None,
        self_attention_resolution: int | None = None,
        rows_are_text_share: bool = False,
    ) -> None:
        super().__init__(token_weights, resolutions, steps, self_attention_resolution)
        self.rows_are_text_share = rows_are_text_share
        if token_alignment.shape[:1] != token_weights.shape[:1]:
            raise ValueError(
                f"token_alignment is for {token_alignment.shape[0]} images, token_weights for {token_weights.shape[0]}"
            )
        self.token_alignment = token_alignment
        self.self_attention_steps = self_attention_steps
        self.cross_attention_steps = cross_attention_steps
        self.self_attention_resolutions = (
            None if self_attention_resolutions is None else frozenset(int(r) for r in self_attention_resolutions)
        )

    def begin_denoiser_call(
        self, grid: Size, batch: int, context: torch.Tensor | None = None, auxiliary: bool = False
    ) -> None:
        super().begin_denoiser_call(grid, batch, context, auxiliary)
        if callable(self.self_attention_steps):
            self.self_attention_steps = self.self_attention_steps()
        if callable(self.cross_attention_steps):
            self.cross_attention_steps = self.cross_attention_steps()

    def injects(self, kind: str, size: Size) -> bool:
        """Whether the ``kind`` layer at ``size`` gets the positives' attention at the current step."""
        if kind == "cross":
            return self.step < self.cross_attention_steps
        if self.step >= self.self_attention_steps:
            return False
        if self.self_attention_resolutions is None:
            return size != self.latent_size and size[0] * size[1] <= MAX_SELF_ATTENTION_TOKENS
        return size[0] in self.self_attention_resolutions

    def wants(self, kind: str, size: Size) -> bool:
        return super().wants(kind, size) or self.injects(kind, size)

    def __call__(self, kind: str, size: Size, probs: torch.Tensor, queries: slice) -> torch.Tensor | None:
        images = self.num_images
        if probs.shape[0] not in (2 * images, 4 * images):
            raise ValueError(
                f"the UNet batch ({probs.shape[0]}) is not [positives, counterfactuals] of {images} images each "
                "(nor twice that under classifier-free guidance)"
            )
        # (guidance halves, [positive, counterfactual], images, heads, queries, keys)
        pairs = probs.view(-1, 2, images, *probs.shape[1:])
        if super().wants(kind, size):
            super().__call__(kind, size, pairs[-1, 0], queries)
        if not self.injects(kind, size):
            return None
        positive, counterfactual = pairs[:, 0], pairs[:, 1]
        if kind == "self":
            injected = positive
        else:
            injected = torch.cat([positive[:-1], self.copy_aligned_tokens(positive[-1], counterfactual[-1])[None]])
        return torch.stack([positive, injected], dim=1).reshape(probs.shape)

    def copy_aligned_tokens(self, positive: torch.Tensor, counterfactual: torch.Tensor) -> torch.Tensor:
        """Counterfactual cross-attention ``(images, heads, queries, tokens)``, aligned tokens from the positive."""
        alignment = self.token_alignment.to(positive.device)[:, None, None, :]
        copied = positive.gather(-1, alignment.clamp_min(0).expand_as(counterfactual))
        mixed = torch.where(alignment >= 0, copied, counterfactual)
        # Copied rows lose the class words' share and gain the replacement's: keep them distributions
        # (of the counterfactual's own text share, for an MM-DiT's joint softmax).
        total = mixed.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.rows_are_text_share:
            return mixed * (counterfactual.sum(dim=-1, keepdim=True) / total)
        return mixed / total


class BackgroundBlend:
    """A step-end callback that gives the counterfactuals the positives' latents outside the objects.

    At every denoising step from ``start_fraction`` of the schedule run on, the object region of each image is the
    union of its class words' attention recorded so far by ``store`` (at the latent's size,
    each map thresholded by ``threshold``), grown by ``dilation`` latent pixels; outside it,
    the counterfactual's latents become the positive's. Both halves are at the same noise
    level (one scheduler), so the counterfactual stays on the positive's trajectory there.
    """

    def __init__(
        self, store: AttentionStore, words_per_image: Sequence[int], threshold: str | float, start_fraction: float,
        dilation: int,
    ) -> None:
        self.store = store
        self.words_per_image = list(words_per_image)
        self.threshold = threshold
        self.start_fraction = start_fraction
        self.dilation = dilation

    def object_region(self, size: tuple[int, int]) -> torch.Tensor | None:
        """``(B, 1, h, w)`` float: 1 on the objects (as the attention so far says), None before any is recorded."""
        maps = list(self.store.cross_attention().values())
        if not maps:
            return None
        attention = aggregate_resolutions(maps, size)
        above = attention > thresholds(attention, self.threshold)[..., None, None].to(attention)
        words = torch.arange(attention.shape[1], device=attention.device)
        named = words[None, :] < torch.tensor(self.words_per_image, device=attention.device)[:, None]
        region = (above & named[..., None, None]).any(dim=1, keepdim=True).float()
        if self.dilation:
            region = F.max_pool2d(region, 2 * self.dilation + 1, stride=1, padding=self.dilation)
        return region

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        # The latents after step `step` feed step `step + 1`; the schedule run may be a custom one.
        if step + 1 < round(self.start_fraction * pipe.num_timesteps):
            return callback_kwargs
        latents = callback_kwargs["latents"]
        packed = latents.ndim == 3  # FLUX: (B, patch-grid positions, channels), one token per grid position
        region = self.object_region(self.store.latent_size if packed else tuple(latents.shape[-2:]))
        if region is not None:
            if packed:
                region = region.flatten(2).transpose(1, 2)
            positive, counterfactual = latents.chunk(2)
            blended = region.to(latents) * counterfactual + (1 - region.to(latents)) * positive
            callback_kwargs["latents"] = torch.cat([positive, blended])
        return callback_kwargs

    def chain(self, callback: Callable | None) -> Callable:
        """This blend, then ``callback`` (the caller's own step-end callback, if any)."""

        def blend_then_callback(pipe, step, timestep, callback_kwargs):
            callback_kwargs = self(pipe, step, timestep, callback_kwargs)
            return callback(pipe, step, timestep, callback_kwargs) if callback is not None else callback_kwargs

        return blend_then_callback


class CounterfactualMixin:
    """The counterfactual method's ``__call__`` over any family pipeline it is mixed into (first in the bases).

    The method lives here once: prompts and their counterfactuals, the token tables over the
    denoiser's text sequence, the injecting controller, the doubled batch with paired scheduler
    steps, background blending, the two mask signals and their fusion. A family class
    contributes :meth:`decode_to_pixels` (how its VAE output becomes pixels) and, where its
    latents differ from SD's, :meth:`initial_noise` and :meth:`unpack_latents` (FLUX packs them);
    its own ``__call__`` drives the denoiser, and its backend (:mod:`diffuseg.backends`) reads
    and edits the attention.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        class_names: Sequence[str] | Sequence[Sequence[str]] = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        replacement: str | None = None,
        remove_phrases: Sequence[str] | Sequence[Sequence[str]] | None = None,
        self_attention_fraction: float = 0.4,
        cross_attention_fraction: float = 0.8,
        self_attention_resolutions: Sequence[int] | None = None,
        blend_start: float | None = 0.2,
        blend_dilation: int = 1,
        difference_source: str = "image",
        fusion: str = "geometric",
        difference_weight: float = 0.5,
        resolutions: Sequence[int] | None = None,
        attention_steps: tuple[float, float] = (0.0, 1.0),
        threshold: str | float = "otsu",
        ignore_band: float = 0.0,
        refine: bool = False,
        refine_iterations: int = 1,
        min_component_area: int = 0,
        **kwargs: Any,
    ) -> CounterfactualOutput | tuple:
        r"""Generate positive images with masks, and their counterfactuals without the class words' objects.

        Args:
            prompt: the prompt or prompts (e.g. descriptions naming one or two classes); each must
                contain its class words.
            class_names: class words, the same for every prompt, or one list per prompt. Mask value
                ``k`` is the k-th word of the image's list. All of them are replaced in the
                counterfactual prompt, every occurrence.
            height, width: image size, multiples of 8 (default: the model's native size).
            negative_prompt, num_images_per_prompt, generator, latents, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the family's pipeline
                (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
                ``FluxPipeline``); every other keyword argument (``num_inference_steps``,
                ``guidance_scale``, ``eta``, ``timesteps``, ``sigmas``, ``max_sequence_length``, ...)
                is passed through to it, with its defaults. ``negative_prompt`` (and
                ``negative_prompt_2``/``_3``): one string for every prompt, or one per prompt; the
                counterfactuals share their positive's. ``prompt_2``/``prompt_3`` (the other text
                encoders' prompts) lose the same words as the prompt in the counterfactual.
                ``latents`` and ``generator`` give the positives the noise the family's pipeline
                would give them, initial and per step (DDIM with ``eta > 0``, ancestral and SDE
                samplers, LCM), and each counterfactual the same noise as its positive. A step-end callback sees the doubled batch ``[positives,
                counterfactuals]`` (``latents`` of ``2 × images``); setting ``pipe._interrupt`` there
                stops both halves at that step, and the masks come from the attention recorded until
                then (all background if it stopped before ``attention_steps`` began).
            replacement: what the class words become in the counterfactual prompt ("nothing", as
                in MagicSeg, or a background phrase such as "empty grass"); must not contain them.
                ``None``: the model's (:func:`diffuseg.models.model_defaults`: "background" for
                ShapesWorld, whose empty scenes are captioned so; "nothing" for other models).
            remove_phrases: phrases replaced together with the class words, so that what describes
                the object goes with it: ``["red car"]`` makes "a red car on the street" "a nothing on
                the street", where the class word alone would leave "a red nothing", which a model may
                still draw as something red. One list shared by all prompts or one list per prompt;
                each phrase must occur in its prompt. ``None``: the model's object modifiers found in
                each prompt before a class word (ShapesWorld's colours: "red circle"; none for other
                models). ``diffuseg generate --pipeline counterfactual`` uses the same defaults.
            self_attention_fraction: fraction of the first denoising steps (of the schedule run) in
                which the counterfactual reuses the positive's self-attention (the layout).
            cross_attention_fraction: fraction of the first steps in which it reuses the positive's
                cross-attention for every token but the replaced ones. 0 and 0: no injection
                (only the noise is shared).
            self_attention_resolutions: heights of the self-attention maps injected; ``None``: every
                level but the finest with at most 32² positions -- 32², 16², 8² for SD at 512²
                (prompt-to-prompt's choice; the finest, 64², would cost 16× the 32² level), 8² for
                16² latents (ShapesWorld, the tiny test models). Add the finest level for a
                slightly closer counterfactual at several times the cost on CPU. SD3 and FLUX have
                one level, the patch grid (64² at 1024²), so by default none: name it to inject
                the image → image share of the joint attention too.
            blend_start: fraction of the steps after which the counterfactual's latents outside the
                object are the positive's (blended latents); ``None``: never (the scene is then
                kept by the shared noise and the injection alone).
            blend_dilation: latent pixels the object region is grown by before blending, so that
                the object's soft edge is redrawn too.
            difference_source: ``"image"``: channel-mean absolute difference of the decoded images;
                ``"latent"``: of the final latents, upsampled (smoother, cheaper).
            fusion: how the difference map joins each class's attention map: ``"geometric"``
                (``attention^(1-w) · difference^w``, a pixel needs both signals) or ``"mean"``
                (``(1-w)·attention + w·difference``).
            difference_weight: ``w`` above, in [0, 1]; 0 gives DiffuMask's attention-only masks.
            resolutions: heights of the cross-attention maps aggregated into the attention signal
                (``None``: all).
            attention_steps: ``(start, end)`` fractions of the denoising steps (of the schedule run,
                custom ``timesteps`` or ``sigmas`` included; at least one step) whose attention is
                averaged into the attention signal.
            threshold: ``"otsu"``, ``"adaptive"`` (DiffuMask's search in 0.45–0.53), or a number;
                used for the fused masks and for both signals of ``agreement``.
            ignore_band, refine, refine_iterations, min_component_area: mask post-processing, as in
                :class:`~diffuseg.pipelines.DiffuMaskPipeline`.

        Returns:
            :class:`CounterfactualOutput`, or ``(images, negative_images, masks, difference_maps,
            agreement, attention_maps)`` when ``return_dict`` is False.
        """
        if "prompt_embeds" in kwargs:
            raise ValueError(
                f"{type(self).__name__} needs the prompt as text to replace the class words; pass `prompt`"
            )
        if prompt is None:
            raise ValueError("`prompt` is required")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        words = DiffuMaskPipeline.check_class_names(prompts, class_names)
        defaults = pipeline_defaults(self)
        replacement = defaults.counterfactual_replacement if replacement is None else replacement
        if remove_phrases is None:
            phrases = [defaults.remove_phrases(p, w) for p, w in zip(prompts, words)]
        else:
            phrases = one_list_per_prompt(remove_phrases, len(prompts), "phrases to remove")
        removed = [[*w, *p] for w, p in zip(words, phrases)]  # what the counterfactual prompts replace
        height, width = default_size(self, height, width)
        family_defaults = inspect.signature(super().__call__).parameters
        check_sampling_inputs(
            self,
            height,
            width,
            kwargs.get("num_inference_steps", family_defaults["num_inference_steps"].default),
            kwargs.get("guidance_scale", family_defaults["guidance_scale"].default),
            resolutions,
        )
        self.check_counterfactual_inputs(
            height,
            width,
            self_attention_fraction,
            cross_attention_fraction,
            difference_source,
            fusion,
            difference_weight,
            attention_steps,
            threshold,
        )
        if blend_start is not None and not (isinstance(blend_start, (int, float)) and 0.0 <= blend_start <= 1.0):
            raise ValueError(f"blend_start must be a number in [0, 1] or None, got {blend_start!r}")
        if blend_dilation < 0:
            raise ValueError(f"blend_dilation must be a number of latent pixels >= 0, got {blend_dilation}")
        self.check_family_inputs(negative_prompt, kwargs)
        counterfactual_prompts = [replace_words(p, r, replacement) for p, r in zip(prompts, removed)]
        images_per_half = len(prompts) * num_images_per_prompt
        text = doubled_text_arguments(prompts, counterfactual_prompts, removed, replacement, negative_prompt, kwargs)
        backend = backend_for(denoiser_of(self))

        # 1. Where the positives' class words are, and which counterfactual token stands for which positive token,
        # in every tokenizer's stretch of the denoiser's text sequence.
        sequence = {name: value[: len(prompts)] for name, value in text.items() if name in ("prompt_2", "prompt_3")}
        if "max_sequence_length" in family_defaults:
            sequence["max_sequence_length"] = kwargs.get(
                "max_sequence_length", family_defaults["max_sequence_length"].default
            )
        segments = backend.text_segments(self, prompts, sequence)
        weights = sequence_token_weights(segments, words, num_images_per_prompt)
        alignment = sequence_token_alignment(segments, removed, replacement).repeat_interleave(
            num_images_per_prompt, dim=0
        )
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        per_position = backend.pixels_per_position(self)
        grid = (height // per_position, width // per_position)
        # Windows span the schedule run, known once the pipeline has set its timesteps.
        controller = CounterfactualAttention(
            weights,
            alignment,
            self_attention_steps=lambda: round(self_attention_fraction * self.num_timesteps),
            cross_attention_steps=lambda: round(cross_attention_fraction * self.num_timesteps),
            self_attention_resolutions=self_attention_resolutions,
            resolutions=resolutions,
            steps=lambda: step_window(attention_steps, self.num_timesteps),
            self_attention_resolution=self_attention_height(grid) if refine else None,
            # An MM-DiT's image -> text probabilities are a share of a joint softmax, not whole rows.
            rows_are_text_share=backend is mmdit,
        )

        # 2. One denoising loop over [positives, counterfactuals] from the same noise.
        noise = self.initial_noise(images_per_half, height, width, generator, latents)
        doubled_generator = generator * 2 if isinstance(generator, list) else generator
        words_per_image = [len(w) for w in words for _ in range(num_images_per_prompt)]
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = list(callback_on_step_end.tensor_inputs)
        if blend_start is not None:
            blend = BackgroundBlend(controller, words_per_image, threshold, blend_start, blend_dilation)
            callback_on_step_end = blend.chain(callback_on_step_end)
            tensor_inputs = sorted({*tensor_inputs, "latents"})
        with (
            attention_control(denoiser_of(self), controller),
            paired_scheduler_steps(self.scheduler, images_per_half),
        ):
            final_latents = super().__call__(
                **text,
                height=height,
                width=width,
                num_images_per_prompt=num_images_per_prompt,
                generator=doubled_generator,
                latents=torch.cat([noise, noise]),
                output_type="latent",
                return_dict=True,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs,
                **kwargs,
            ).images
        needs_pixels = output_type != "latent" or difference_source == "image"
        unpacked = self.unpack_latents(final_latents, height, width)
        pixels = self.decode_to_pixels(unpacked, doubled_generator) if needs_pixels else None
        if pixels is not None and blend_start is not None:
            region = blend.object_region(latent_size)
            if region is not None:
                region = upsample(region, (height, width)).clamp(0, 1).to(pixels)
                positive_pixels, negative_pixels = pixels.chunk(2)
                pixels = torch.cat([positive_pixels, region * negative_pixels + (1 - region) * positive_pixels])

        # 3. Two mask signals: the positives' class-word attention, and where the pair differs.
        attention = recorded_attention(
            controller, (height, width), refine_iterations if refine else 0, self.interrupt, self._execution_device
        )
        if difference_source == "image":
            positive, negative = pixels.float().chunk(2)
            difference = (positive - negative).abs().mean(dim=1)
        else:
            positive, negative = unpacked.float().chunk(2)
            difference = upsample((positive - negative).abs().mean(dim=1), (height, width))
        difference = normalize_max(difference.to(attention.device))

        # 4. Fuse, threshold into label maps, and measure how well the two signals agree.
        fused = fuse_signals(attention, difference, fusion, difference_weight)
        masks = label_maps(fused, threshold, ignore_band, min_component_area, words_per_image)
        agreement = signal_agreement(attention, difference, threshold, words_per_image)

        self.maybe_free_model_hooks()
        if output_type == "latent":
            images, negative_images = final_latents.chunk(2)
        else:
            denormalized = [False] * images_per_half  # decode_to_pixels already maps to [0, 1]
            images, negative_images = (
                self.image_processor.postprocess(half, output_type=output_type, do_denormalize=denormalized)
                for half in pixels.chunk(2)
            )
        if output_type == "pil":
            masks = [PIL.Image.fromarray(mask, mode="L") for mask in masks]
        if output_type == "pt":
            masks = torch.from_numpy(masks)
        else:
            difference, agreement, attention = (
                t.cpu().numpy().astype(np.float32) for t in (difference, agreement, attention)
            )
        if not return_dict:
            return images, negative_images, masks, difference, agreement, attention
        return CounterfactualOutput(
            images=images,
            negative_images=negative_images,
            masks=masks,
            difference_maps=difference,
            agreement=agreement,
            attention_maps=attention,
        )

    @staticmethod
    def check_counterfactual_inputs(
        height: int,
        width: int,
        self_attention_fraction: float,
        cross_attention_fraction: float,
        difference_source: str,
        fusion: str,
        difference_weight: float,
        attention_steps: tuple[float, float],
        threshold: str | float,
    ) -> None:
        """Fail before generating anything on arguments that would fail (or mean nothing) later."""
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        for name, value in (
            ("self_attention_fraction", self_attention_fraction),
            ("cross_attention_fraction", cross_attention_fraction),
            ("difference_weight", difference_weight),
        ):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if difference_source not in DIFFERENCE_SOURCES:
            raise ValueError(f"difference_source must be one of {DIFFERENCE_SOURCES}, got {difference_source!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not 0.0 <= attention_steps[0] < attention_steps[1] <= 1.0:
            raise ValueError(f"attention_steps must satisfy 0 <= start < end <= 1, got {attention_steps}")
        thresholds(torch.zeros(1, 1, 1), threshold)  # raises on an unknown method

    def initial_noise(
        self,
        images: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """The positives' initial latents (unscaled, as ``latents`` is passed): drawn as the family's pipeline draws them."""
        denoiser = denoiser_of(self)
        shape = (images, denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents must have shape {shape} (one per positive image), got {tuple(latents.shape)}"
                )
            return latents
        if isinstance(generator, list) and len(generator) != images:
            raise ValueError(f"got {len(generator)} generators for {images} images; give one per image, or one in all")
        # The dtype of the prompt embeddings the family's pipeline draws its noise in (SDXL: its second encoder's).
        encoder = getattr(self, "text_encoder_2", None) or self.text_encoder
        dtype = encoder.dtype if encoder is not None else denoiser.dtype
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    def decode_to_pixels(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Decoded images ``(B, 3, H, W)`` in [0, 1] of ``(B, C, h, w)`` latents, as the family's pipeline decodes them."""
        raise NotImplementedError(f"{type(self).__name__} must say how its latents are decoded")

    def check_family_inputs(self, negative_prompt: str | list[str] | None, kwargs: dict[str, Any]) -> None:
        """Refuse the family pipeline's arguments the method cannot follow (none, but for FLUX's true guidance)."""

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The family pipeline's latents as ``(B, C, h, w)``: as they are, but for FLUX, which packs them."""
        return latents


class CounterfactualPipeline(CounterfactualMixin, StableDiffusionPipeline):
    """Stable Diffusion that returns each image with its mask and a counterfactual without the object.

    Loads from any Stable Diffusion checkpoint, e.g.
    ``CounterfactualPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")``,
    or with ``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/counterfactual",
    trust_remote_code=True)``. The call is :meth:`CounterfactualMixin.__call__`.
    """

    def decode_to_pixels(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Decoded images ``(B, 3, H, W)`` in [0, 1], through the safety checker as in ``StableDiffusionPipeline``."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, nsfw = self.run_safety_checker(image, self._execution_device, latents.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type="pt", do_denormalize=denormalize)


def sequence_token_alignment(segments: list[TextSegment], removed: list[list[str]], replacement: str) -> torch.Tensor:
    """``(prompts, sequence length)``: :func:`~diffuseg.tokens.replacement_token_alignment` over every stretch.

    Each tokenizer's stretch (SD3: CLIP then T5) is aligned on its own prompts and shifted to its
    place in the sequence; a stretch with no tokenizer (SD3 without T5: zeros) maps to itself.
    """
    rows = []
    for i, words in enumerate(removed):
        parts, offset = [], 0
        for segment in segments:
            if segment.tokenizer is None:
                parts.append(torch.arange(segment.length) + offset)
            else:
                part = replacement_token_alignment(
                    segment.tokenizer, segment.prompts[i], words, replacement, segment.length
                )
                parts.append(torch.where(part >= 0, part + offset, part))
            offset += segment.length
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def doubled_text_arguments(
    prompts: list[str],
    counterfactual_prompts: list[str],
    removed: list[list[str]],
    replacement: str,
    negative_prompt: str | list[str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The text arguments of the family pipeline's call over the batch ``[positives, counterfactuals]``.

    ``prompt``: the positives then the counterfactuals. A family's further prompts (SDXL's
    ``prompt_2``, for its second encoder), popped from ``kwargs``, lose the same words in the
    counterfactuals. Negative prompts (``negative_prompt``, ``negative_prompt_2``), one for all or
    one per prompt, are the same for a positive and its counterfactual.
    """
    text: dict[str, Any] = {"prompt": prompts + counterfactual_prompts}
    for name in ("prompt_2", "prompt_3"):
        other = kwargs.pop(name, None)
        if other is not None:
            others = [other] * len(prompts) if isinstance(other, str) else list(other)
            if len(others) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(others)} {name}s; give one, or one per prompt")
            text[name] = others + [replace_words(o, r, replacement) for o, r in zip(others, removed)]
    for name, value in (
        ("negative_prompt", negative_prompt),
        ("negative_prompt_2", kwargs.pop("negative_prompt_2", None)),
        ("negative_prompt_3", kwargs.pop("negative_prompt_3", None)),
    ):
        negatives = negative_prompt_per_prompt(value, len(prompts))
        if negatives is not None or name == "negative_prompt":
            text[name] = None if negatives is None else negatives * 2
    return text


@contextmanager
def paired_scheduler_steps(scheduler, images: int) -> Iterator[None]:
    """Step the batch ``[positives, counterfactuals]`` (``images`` each) as two runs of ``scheduler`` on the same noise.

    A sampler that draws noise at every step (DDIM with ``eta > 0``, ancestral and SDE samplers,
    LCM) would draw it for the doubled batch at once: the positives would get other noise than
    Stable Diffusion gives them for the same generator, and each counterfactual other noise than
    its positive, another scene. Inside the block the positives are stepped by ``scheduler``
    itself, exactly as in the plain pipeline; the counterfactuals by a copy of it (made at the
    first step, so with the same timesteps and state), after the random generators are rewound,
    so that they draw the same noise. Multistep samplers keep each half's history apart.
    """
    original_step = scheduler.step
    twin = None

    @functools.wraps(original_step)  # the pipeline reads the step's signature to pass `eta` and `generator`
    def step(model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, **kwargs):
        nonlocal twin
        if model_output.shape[0] != 2 * images:
            raise ValueError(
                f"the scheduler stepped a batch of {model_output.shape[0]}, not [positives, counterfactuals] "
                f"of {images} images each"
            )
        if twin is None:
            twin = copy.deepcopy(scheduler)
            del twin.step  # the copy took this wrapper along as an instance attribute
        # The pipeline passes a generator only to samplers that take one: one, or one per image of the batch.
        generator = kwargs.pop("generator", None)
        halves = (generator[:images], generator[images:]) if isinstance(generator, list) else (generator, generator)
        positive_kwargs, negative_kwargs = (
            kwargs if generator is None else {**kwargs, "generator": half} for half in halves
        )
        with rewound(generator, model_output.device):
            positive = original_step(model_output[:images], timestep, sample[:images], *args, **positive_kwargs)
        negative = twin.step(model_output[images:], timestep, sample[images:], *args, **negative_kwargs)
        return concatenate_halves(positive, negative)

    scheduler.step = step  # instance attribute shadows the method; deleted on exit
    try:
        yield
    finally:
        del scheduler.step


@contextmanager
def rewound(generator: torch.Generator | list[torch.Generator] | None, device: torch.device) -> Iterator[None]:
    """Draws inside the block leave ``generator`` (``None``: ``device``'s default one) in the state it had before."""
    if generator is None:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            yield
        return
    generators = generator if isinstance(generator, list) else [generator]
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


def concatenate_halves(positive, negative):
    """The scheduler output of the whole batch from those of its halves (tuples, ``BaseOutput`` s or tensors)."""
    if isinstance(positive, torch.Tensor):
        return torch.cat([positive, negative])
    if isinstance(positive, BaseOutput):
        return type(positive)(**{key: concatenate_halves(positive[key], negative[key]) for key in positive.keys()})
    if isinstance(positive, tuple):
        return tuple(concatenate_halves(p, n) for p, n in zip(positive, negative))
    return positive


def fuse_signals(attention: torch.Tensor, difference: torch.Tensor, fusion: str, weight: float) -> torch.Tensor:
    """Each class map of ``attention (B, C, H, W)`` joined with ``difference (B, H, W)``, both in [0, 1].

    Not renormalised: the classes keep their relative strengths, which decide overlaps.
    """
    difference = difference[:, None]
    if fusion == "geometric":
        fused = attention.clamp_min(0) ** (1 - weight) * difference.clamp_min(0) ** weight
    elif fusion == "mean":
        fused = (1 - weight) * attention + weight * difference
    else:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    return fused


def label_maps(
    maps: torch.Tensor, threshold: str | float, ignore_band: float, min_area: int, classes_per_image: Sequence[int]
) -> np.ndarray:
    """``uint8 (B, H, W)`` label maps of ``(B, C, H, W)`` class maps; image ``i`` uses ``classes_per_image[i]`` maps."""
    cutoffs = thresholds(maps, threshold)
    return np.stack(
        [
            label_map(maps[i], cutoffs[i], ignore_band, min_area, num_classes=classes_per_image[i])
            for i in range(maps.shape[0])
        ]
    )


def signal_agreement(
    attention: torch.Tensor, difference: torch.Tensor, threshold: str | float, classes_per_image: Sequence[int]
) -> torch.Tensor:
    """``(B,)`` IoU of the attention foreground (any class above its threshold) and the difference foreground.

    1 where both are empty: the signals agree that there is nothing.
    """
    attention_cutoffs = thresholds(attention, threshold)[..., None, None]
    difference_cutoffs = thresholds(difference, threshold)[..., None, None]
    scores = []
    for i, classes in enumerate(classes_per_image):
        from_attention = (attention[i, :classes] > attention_cutoffs[i, :classes]).any(dim=0)
        from_difference = difference[i] > difference_cutoffs[i]
        union = (from_attention | from_difference).sum()
        intersection = (from_attention & from_difference).sum()
        scores.append(intersection / union if union > 0 else torch.tensor(1.0))
    return torch.stack(scores).float()
