"""Free-Mask by diffusion editing: multi-instance images, each inserted object with its mask.

Free-Mask (2024) builds multi-instance training images by pasting generated objects into
other images and harmonising them with a separate network. Here the text-to-image model
does the editing itself:

1. **Base**: an image with its label map (from :class:`DiffuMaskPipeline`, a dataset, or a
   ``base_prompt`` rendered here with DiffuMask).
2. **Placement**: each object goes into its given region (a box or a mask) or into a box
   drawn by :func:`sample_free_box`: area within ``region_size`` of the image, overlapping
   existing objects by at most ``max_overlap``, deterministic for a ``torch.Generator``.
3. **Insertion** (``mode="edit"``): blended latent diffusion (Avrahami et al., 2023). Inside
   the region the latents are denoised with the object's prompt; outside they are replaced
   at every step by the original latents noised to that step, and by the clean original
   after the last one. A checkpoint whose UNet has 9 input channels (an inpainting model)
   also receives the region and the masked image as conditioning. ``mode="paste"`` is the
   original's approach: generate the object alone, paste it with its mask into the region,
   then harmonise the region with a low-strength diffusion pass (SDEdit).
4. **Mask**: the class word's cross-attention (recorded with :func:`diffuseg.attention.capture`),
   optionally refined along self-attention, renormalised and thresholded *within the
   region* (:mod:`diffuseg.masks`). The label map is updated with occlusion: the new object
   overwrites what it covers, covered objects shrink.
5. **Consistency**: an insertion whose mask covers less than ``min_coverage`` of its region,
   or whose word lights up mostly outside it (``max_leak``), is retried with new noise up
   to ``max_retries`` times, then rejected with the reason recorded.

Pixels outside the edited regions. The VAE decoder is not local (GroupNorm statistics
and a mid-block self-attention span the whole image), so decoding the blended latents
changes every pixel a little, and repeated insertions would compound it. Each insertion
therefore pastes its decoded region back into the image with a linear feather of
``feather`` pixels (default: one latent cell). Pixels farther than ``feather`` pixels from
every edited region are exactly the base image's; the band around a region blends base
and decoded pixels; the region itself is decoded.

Label values. ``class_names`` is the caller's class list: class ``class_names[k - 1]`` has
label id ``k``; 0 is background and 255 ignore, as everywhere in diffuseg. The base label
map's ids are kept as they are (they must be 0, 255 or ``1..len(class_names)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffuseg.attention import capture
from diffuseg.models import pipeline_defaults
from diffuseg.masks import IGNORE_INDEX, label_map as assemble_label_map, thresholds
from diffuseg.pipelines.checks import check_sampling_inputs, default_size
from diffuseg.pipelines.diffumask import DiffuMaskPipeline, self_attention_height
from diffuseg.tokens import word_token_positions

Box = tuple[int, int, int, int]
Region = Union[Box, Sequence[int], np.ndarray, torch.Tensor, PIL.Image.Image]


@dataclass
class FreeMaskObject:
    """An object to insert.

    Attributes:
        class_name: its class, one of the pipeline call's ``class_names`` (gives the label id).
        prompt: the text it is generated from (default ``"a picture of a <word>"``); must contain ``word``.
        region: where it goes: a box ``(x0, y0, x1, y1)`` in pixels (end exclusive) or a
            boolean ``(H, W)`` mask (array, tensor or PIL image; nonzero = inside). ``None``:
            a free box is chosen by :func:`sample_free_box`.
        word: the word naming it in ``prompt``, whose cross-attention gives the mask
            (default: ``class_name``; set it for synonyms, e.g. class "pottedplant", word "plant").
    """

    class_name: str
    prompt: str | None = None
    region: Region | None = None
    word: str | None = None


@dataclass
class InsertionRecord:
    """What happened to one object: inserted, or rejected and why.

    Attributes:
        class_name, class_id, word, prompt: the object (``class_id`` is its label value).
        region: the ``(H, W)`` boolean region it was inserted into (None if no free region was found).
        box: the region's bounding box ``(x0, y0, x1, y1)``, end exclusive (None likewise).
        mask: the object's ``(H, W)`` boolean mask when inserted (later insertions may cover
            parts of it; ``instance_masks`` holds what stays visible); None when rejected.
        coverage: per attempt, the fraction of the region its mask covers.
        leak: per attempt, the fraction of the word's above-threshold pixels that lie outside the region.
        reason: why it was rejected; None when inserted.
        check: the check that rejected it, for counting: ``"min_coverage"``, ``"max_leak"`` or
            ``"no_free_region"``; None when inserted.
    """

    class_name: str
    class_id: int
    word: str
    prompt: str
    region: np.ndarray | None = None
    box: Box | None = None
    mask: np.ndarray | None = None
    coverage: list[float] = field(default_factory=list)
    leak: list[float] = field(default_factory=list)
    reason: str | None = None
    check: str | None = None

    @property
    def attempts(self) -> int:
        """How many generations were tried."""
        return len(self.coverage)

    def __repr__(self) -> str:
        # The masks are (H, W) arrays: a summary says what happened, the arrays stay attributes.
        outcome = f"rejected: {self.reason}" if self.reason else f"inserted, mask {int(self.mask.sum())} px"
        attempts = ", ".join(f"{c:.0%} coverage / {l:.0%} leak" for c, l in zip(self.coverage, self.leak))
        return (
            f"InsertionRecord({self.class_name!r} (id {self.class_id}) from {self.prompt!r}, box {self.box}, "
            f"{outcome}; attempts: [{attempts}])"
        )


@dataclass
class FreeMaskEditOutput(BaseOutput):
    """Output of :class:`FreeMaskEditPipeline`.

    Attributes:
        images: the edited images, as ``output_type`` asks (list of PIL, ``(B, H, W, 3)`` array, ...).
        masks: label maps ``(B, H, W)`` with the ids of ``class_names`` (0 background, 255
            ignore): PIL mode "L" images for ``"pil"``, a ``uint8`` array for ``"np"``, a tensor for ``"pt"``.
        instance_masks: per image, the visible part of each inserted object, in insertion
            order: a boolean ``(K, H, W)`` array (a tensor for ``"pt"``), ``K`` = objects inserted.
        inserted: per image, an :class:`InsertionRecord` per inserted object (same order).
        rejected: per image, an :class:`InsertionRecord` per object that was not inserted.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    instance_masks: list[np.ndarray] | list[torch.Tensor]
    inserted: list[list[InsertionRecord]]
    rejected: list[list[InsertionRecord]]


@dataclass
class _Attempt:
    """One generation of one object: the image it would give, its mask and its checks."""

    image: torch.Tensor | None
    mask: np.ndarray
    uncertain: np.ndarray | None
    repainted: np.ndarray | None
    coverage: float
    leak: float


class FreeMaskEditPipeline(StableDiffusionPipeline):
    """Stable Diffusion that inserts objects into an image and returns their masks.

    Loads from any Stable Diffusion checkpoint (text-to-image or inpainting), e.g.
    ``FreeMaskEditPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")``,
    or with ``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/freemask",
    trust_remote_code=True)``.
    """

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        label_map: Any = None,
        objects: Sequence[FreeMaskObject | str | dict] | Sequence[Sequence[FreeMaskObject | str | dict]] = None,
        class_names: Sequence[str] = None,
        base_prompt: str | list[str] | None = None,
        base_classes: Sequence[str] | Sequence[Sequence[str]] | None = None,
        mode: str = "edit",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        region_size: tuple[float, float] | None = None,
        region_aspect: tuple[float, float] = (0.5, 2.0),
        max_overlap: float = 0.2,
        min_coverage: float = 0.15,
        max_leak: float = 0.5,
        max_retries: int = 2,
        paste_strength: float = 0.3,
        feather: int | None = None,
        crop_margin: int | None = 1,
        resolutions: Sequence[int] | None = None,
        threshold: str | float = "otsu",
        ignore_band: float = 0.0,
        refine: bool = True,
        refine_iterations: int = 1,
        min_component_area: int = 0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> FreeMaskEditOutput | tuple:
        r"""Insert ``objects`` into base images; return the edited images and their label maps.

        Args:
            image: the base image(s): PIL, ``uint8`` ``(H, W, 3)`` array, float ``(H, W, 3)``
                array or ``(3, H, W)`` tensor in [0, 1], a list of those, or a batch
                (``(B, H, W, 3)`` array, ``(B, 3, H, W)`` tensor). Sides must be multiples of 8.
            label_map: the base label map(s) ``(H, W)`` (PIL "L"/"P", array or tensor) in
                ``class_names`` ids, one per image.
            objects: what to insert: :class:`FreeMaskObject` s, dicts of its fields, or plain
                class names; one list shared by every image, or one list per image. Objects
                are inserted in order, each into the image the previous ones left.
            class_names: the class list; ``class_names[k - 1]`` has label id ``k``.
            base_prompt: instead of ``image``/``label_map``: prompt(s) rendered first with
                DiffuMask (``height`` x ``width``, default the model's native size).
            base_classes: the class words in each ``base_prompt`` (each one of ``class_names``).
            mode: ``"edit"`` (blended latent diffusion, or the inpainting UNet for a 9-channel
                checkpoint) or ``"paste"`` (generate alone, paste, harmonise with SDEdit).
            num_inference_steps, guidance_scale, negative_prompt, eta, generator, output_type,
            return_dict: as in ``StableDiffusionPipeline``. ``generator``: one per image for
                results independent of the batch; it also drives the placement and the retries.
            region_size: ``(min, max)`` area of a chosen box, as fractions of the image area
                (default: the model's, from its ``diffuseg.json`` (see
                :class:`~diffuseg.models.ModelDefaults`), else ``(0.05, 0.25)``).
            region_aspect: ``(min, max)`` width/height ratio of a chosen box.
            max_overlap: largest fraction of a chosen box that existing objects may cover.
            min_coverage: reject an insertion whose mask covers less of its region than this.
            max_leak: reject an insertion when more than this fraction of the pixels where its
                word's attention is above the mask threshold lie outside the region.
            max_retries: new-noise retries before an object is rejected.
            paste_strength: SDEdit strength of the harmonisation pass (``mode="paste"``).
            feather: width in pixels of the band outside a region where decoded and base pixels
                are blended (default: the VAE's scale factor, one latent cell).
            crop_margin: latent cells of context around a region that the UNet sees while
                inserting into it: it denoises only that window of the latents, at that share of
                the cost (``None``: the whole latent). The mask and its leak check are read within
                the window.
            resolutions: heights of the cross-attention maps to aggregate (``None``: all).
            threshold: ``"otsu"``, ``"adaptive"`` or a number, applied to the word's map
                renormalised to its maximum within the region.
            ignore_band: region pixels within this distance of the threshold become 255.
            refine: propagate the maps along self-attention before thresholding.
            refine_iterations: propagation steps of ``refine``.
            min_component_area: mask components smaller than this many pixels are dropped.

        Returns:
            :class:`FreeMaskEditOutput`, or ``(images, masks, instance_masks, inserted,
            rejected)`` when ``return_dict`` is False.
        """
        # 0. Check every input before any generation.
        names = check_class_list(class_names)
        region_size = pipeline_defaults(self).region_size if region_size is None else tuple(region_size)
        self.check_settings(
            mode, region_size, region_aspect, max_overlap, min_coverage, max_leak, max_retries, paste_strength,
            feather, output_type, crop_margin,
        )
        thresholds(torch.zeros(1, 1, 1), threshold)  # fails now on an unknown method
        if (image is None) == (base_prompt is None):
            raise ValueError("give either a base `image` with its `label_map`, or a `base_prompt` to render one")
        if image is not None:
            base_images = prepare_images(image)
            batch, size = base_images.shape[0], tuple(base_images.shape[-2:])
            base_labels = prepare_label_maps(label_map, batch, size, len(names))
        else:
            if label_map is not None:
                raise ValueError("`label_map` goes with `image`; a `base_prompt` renders its own label map")
            base_prompts = [base_prompt] if isinstance(base_prompt, str) else list(base_prompt)
            base_words = DiffuMaskPipeline.check_class_names(base_prompts, base_classes)
            base_ids = [[class_id(names, word) for word in words] for words in base_words]
            batch = len(base_prompts)
            size = default_size(self, height, width)
        check_image_size(size)
        check_sampling_inputs(self, *size, num_inference_steps, guidance_scale, resolutions)
        per_image = parse_objects(objects, batch, names, size, self.tokenizer)
        check_generators(generator, batch)
        feather = self.vae_scale_factor if feather is None else int(feather)
        settings = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, eta=eta, resolutions=resolutions,
            refine_iterations=refine_iterations if refine else 0, crop_margin=crop_margin,
        )
        mask_settings = dict(threshold=threshold, ignore_band=ignore_band, min_area=min_component_area)

        # 1. The base images ([-1, 1] tensors) and label maps (uint8 arrays).
        if image is None:
            images, labels = self.render_base(
                base_prompts, base_words, base_ids, size, generator=generator, threshold=threshold,
                ignore_band=ignore_band, refine=refine, refine_iterations=refine_iterations,
                min_component_area=min_component_area, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, negative_prompt=negative_prompt, eta=eta, resolutions=resolutions,
            )
        else:
            images, labels = base_images.to(self._execution_device), base_labels
        current = list(images)
        instances: list[list[np.ndarray]] = [[] for _ in range(batch)]
        inserted: list[list[InsertionRecord]] = [[] for _ in range(batch)]
        rejected: list[list[InsertionRecord]] = [[] for _ in range(batch)]

        # 2. Insert the k-th object of every image in one batch; retry the misses with new noise.
        for k in range(max((len(objs) for objs in per_image), default=0)):
            records: dict[int, InsertionRecord] = {}
            for i in (i for i in range(batch) if k < len(per_image[i])):
                obj = per_image[i][k]
                record = InsertionRecord(obj.class_name, class_id(names, obj.class_name), obj.word, obj.prompt)
                region = obj.region
                if region is None:
                    occupied = occupied_pixels(labels[i])
                    own_generator = generator[i] if isinstance(generator, list) else generator
                    box = sample_free_box(
                        occupied, own_generator, region_size, region_aspect, max_overlap, grid=self.vae_scale_factor
                    )
                    if box is None:
                        record.check, record.reason = "no_free_region", (
                            f"no free region: every box tried overlaps objects by more than {max_overlap:.0%}"
                        )
                        rejected[i].append(record)
                        continue
                    region = box_to_region(box, size)
                record.region, record.box = region, bounding_box(region)
                records[i] = record

            pending = list(records)
            for _ in range(max_retries + 1):
                if not pending:
                    break
                jobs = [(i, current[i], records[i]) for i in pending]
                if mode == "edit":
                    results = self.try_insertions(
                        jobs, labels, pick(generator, pending), feather, settings, mask_settings
                    )
                else:
                    results = self.try_pastes(
                        jobs, pick(generator, pending), feather, settings, mask_settings, paste_strength
                    )
                still_pending = []
                for (i, _, record), result in zip(jobs, results):
                    record.coverage.append(result.coverage)
                    record.leak.append(result.leak)
                    record.check, record.reason = consistency_problem(result, min_coverage, max_leak)
                    if record.reason is not None:
                        still_pending.append(i)
                        continue
                    current[i] = result.image
                    record.mask = result.mask
                    labels[i], instances[i] = insert_into_label_map(
                        labels[i], instances[i], result.mask, record.class_id, result.repainted, result.uncertain
                    )
                    inserted[i].append(record)
                pending = still_pending
            for i in pending:
                rejected[i].append(records[i])

        # 3. Outputs.
        self.maybe_free_model_hooks()
        height, width = size
        out_images = self.image_processor.postprocess(torch.stack(current), output_type=output_type)
        stacked = [np.stack(own) if own else np.zeros((0, height, width), dtype=bool) for own in instances]
        if output_type == "pil":
            masks = [PIL.Image.fromarray(labels_i, mode="L") for labels_i in labels]
        elif output_type == "np":
            masks = np.stack(labels)
        else:
            masks = torch.from_numpy(np.stack(labels))
            stacked = [torch.from_numpy(s) for s in stacked]
        if not return_dict:
            return out_images, masks, stacked, inserted, rejected
        return FreeMaskEditOutput(
            images=out_images, masks=masks, instance_masks=stacked, inserted=inserted, rejected=rejected
        )

    # ----------------------------------------------------------------------------------
    # the two insertion methods

    def try_insertions(
        self, jobs, labels: list[np.ndarray], generator, feather: int, settings: dict, mask_settings: dict
    ) -> list[_Attempt]:
        """One blended-latent-diffusion attempt per job ``(image index, image, record)``, batched.

        ``labels[i]`` is image ``i``'s current label map: its objects are not counted as leak.
        """
        images = torch.stack([image for _, image, _ in jobs])
        regions = torch.stack([torch.from_numpy(record.region) for _, _, record in jobs])
        pixels, attention = self.edit_regions(
            images, regions, [r.prompt for _, _, r in jobs], [r.word for _, _, r in jobs], 1.0, generator, **settings
        )
        results = []
        for j, (i, image, record) in enumerate(jobs):
            mask, uncertain, coverage, leak = object_mask(
                attention[j], record.region, **mask_settings, objects=occupied_pixels(labels[i])
            )
            edited = paste_back(image, pixels[j], record.region, feather)
            # The whole region was regenerated: it is what insert_into_label_map calls repainted.
            results.append(_Attempt(edited, mask, uncertain, record.region, coverage, leak))
        return results

    def try_pastes(
        self, jobs, generator, feather: int, settings: dict, mask_settings: dict, strength: float
    ) -> list[_Attempt]:
        """Free-Mask's copy-paste per job: generate the object alone, paste it with its mask, harmonise.

        Only the pasted pixels change before harmonisation, and SDEdit at a low ``strength``
        keeps the layout, so the pasted mask stays aligned; the rest of the region keeps its labels.
        """
        images = torch.stack([image for _, image, _ in jobs])
        whole = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        # The object on a blank canvas: text-to-image (an all-region edit), mask from its attention.
        sources, attention = self.edit_regions(
            torch.zeros_like(images), whole, [r.prompt for _, _, r in jobs], [r.word for _, _, r in jobs], 1.0,
            generator, **settings,
        )
        results, pasted, passing = [], [], []
        for j, (_, image, record) in enumerate(jobs):
            source_mask = object_mask(attention[j], whole[j].numpy(), **mask_settings)[0]
            placed, placed_mask = fit_into_box(sources[j], largest_component(source_mask), record.box)
            placed_mask &= record.region
            coverage = float(placed_mask.sum() / record.region.sum())
            # A pasted mask lies inside its region by construction: it cannot leak.
            results.append(_Attempt(None, placed_mask, None, None, coverage, 0.0))
            if placed_mask.any():
                weight = torch.from_numpy(placed_mask).to(image)
                pasted.append(image * (1 - weight) + placed.to(image) * weight)
                passing.append(j)
        if passing:
            regions = torch.stack([torch.from_numpy(jobs[j][2].region) for j in passing])
            harmonised, _ = self.edit_regions(
                torch.stack(pasted), regions, [jobs[j][2].prompt for j in passing], None, strength,
                pick(generator, passing), **settings,
            )
            for n, j in enumerate(passing):
                results[j].image = paste_back(pasted[n], harmonised[n], jobs[j][2].region, feather)
        return results

    # ----------------------------------------------------------------------------------
    # diffusion

    def edit_regions(
        self,
        images: torch.Tensor,
        regions: torch.Tensor,
        prompts: list[str],
        words: list[str] | None,
        strength: float,
        generator,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str | None,
        eta: float,
        resolutions: Sequence[int] | None,
        refine_iterations: int,
        crop_margin: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Regenerate ``regions`` ``(B, H, W)`` of ``images`` ``(B, 3, H, W)`` in [-1, 1] from ``prompts``.

        The UNet denoises only a window of the latents around each region, ``crop_margin``
        latent cells wider on every side (see :func:`latent_window`; ``None``: the whole latent):
        the latents outside a region are the original's anyway, and a window costs its share of
        the UNet's work. Images whose windows have the same shape are denoised in one batch; a
        window depends only on its own region, so results do not depend on the batch.

        Returns the decoded images (every pixel decoded; see :func:`paste_back`) and, when
        ``words`` are given, each word's cross-attention ``(B, H, W)`` at image size (max-normalised
        within its window, refined along self-attention when ``refine_iterations`` > 0; 0 outside
        the window), on the CPU.
        """
        device, dtype = self._execution_device, self.vae.dtype
        images = images.to(device=device, dtype=dtype)
        height, width = images.shape[-2:]
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        # A latent cell is regenerated when any of its pixels is in the region.
        latent_mask = (F.interpolate(regions[:, None].float(), size=latent_size, mode="area") > 0).to(device, dtype)
        image_latents = self.encode_images(images)
        masked_image_latents = None
        if self.unet.config.in_channels == 9:
            # The inpainting UNet's conditioning: what stays (the region blanked to 0 in [-1, 1]).
            keep = (~regions[:, None]).to(device=device, dtype=dtype)
            masked_image_latents = self.encode_images(images * keep)

        # The UNet's input sides must divide by its total downsampling.
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        windows = [latent_window(latent_mask[j, 0], crop_margin, multiple) for j in range(len(images))]
        latents = image_latents.clone()
        attention = torch.zeros(len(images), height, width) if words is not None else None
        scale = self.vae_scale_factor
        for shape in dict.fromkeys((y1 - y0, x1 - x0) for y0, y1, x0, x1 in windows):
            members = [j for j, (y0, y1, x0, x1) in enumerate(windows) if (y1 - y0, x1 - x0) == shape]

            def crop(tensor: torch.Tensor) -> torch.Tensor:
                return torch.stack([tensor[j, :, y0:y1, x0:x1] for j in members for y0, y1, x0, x1 in [windows[j]]])

            recording = (
                capture(
                    self, [[words[j]] for j in members],
                    # The same UNet levels as on the whole latent: heights scale with the window.
                    resolutions=None if resolutions is None else [r * shape[0] // latent_size[0] for r in resolutions],
                    self_attention_resolution=self_attention_height(shape) if refine_iterations else None,
                )
                if words is not None
                else nullcontext()
            )
            with recording as maps:
                edited = self.edit_latents(
                    crop(image_latents), crop(latent_mask), [prompts[j] for j in members], strength=strength,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    negative_prompt=negative_prompt, eta=eta, generator=pick(generator, members),
                    masked_image_latents=None if masked_image_latents is None else crop(masked_image_latents),
                )
            for n, j in enumerate(members):
                y0, y1, x0, x1 = windows[j]
                latents[j, :, y0:y1, x0:x1] = edited[n]
            if words is not None:
                maps_in_window = maps.aggregate((shape[0] * scale, shape[1] * scale))
                if refine_iterations:
                    maps_in_window = maps.store.refine(maps_in_window, refine_iterations)
                for n, j in enumerate(members):
                    y0, y1, x0, x1 = windows[j]
                    attention[j, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = maps_in_window[n, 0].float().cpu()
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return decoded.clamp(-1, 1).float(), attention

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents of ``(B, 3, H, W)`` images in [-1, 1] (the distribution's mode: deterministic)."""
        return self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor

    def edit_latents(
        self,
        image_latents: torch.Tensor,
        latent_mask: torch.Tensor,
        prompts: list[str],
        *,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        eta: float = 0.0,
        generator=None,
        masked_image_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blended latent diffusion: denoise inside ``latent_mask``, keep ``image_latents`` outside.

        Args:
            image_latents: ``(B, 4, h, w)`` scaled latents of the images being edited.
            latent_mask: ``(B, 1, h, w)``, 1 where the latents are regenerated.
            prompts: one prompt per image.
            strength: 1 generates the region from pure noise; less starts from the noised
                image (SDEdit), running only the last ``strength`` of the schedule (at least one step).
            masked_image_latents: the inpainting UNet's conditioning (9-channel UNets only).

        Returns:
            ``(B, 4, h, w)`` latents equal to ``image_latents`` wherever ``latent_mask`` is 0.
        """
        device = image_latents.device
        cfg = guidance_scale > 1.0
        inpainting = self.unet.config.in_channels == 9
        if inpainting and masked_image_latents is None:
            raise ValueError("this UNet has 9 input channels (inpainting): pass masked_image_latents")
        embeds, negative_embeds = self.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
        )
        if cfg:
            embeds = torch.cat([negative_embeds, embeds])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        steps = min(max(round(num_inference_steps * strength), 1), num_inference_steps)
        first = (num_inference_steps - steps) * self.scheduler.order
        timesteps = self.scheduler.timesteps[first:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(first)

        batch = image_latents.shape[0]
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=image_latents.dtype)
        noised = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        if strength >= 1.0:
            # The region starts from pure noise; the context already carries the image from step one.
            latents = latent_mask * noise * self.scheduler.init_noise_sigma + (1 - latent_mask) * noised
        else:
            latents = noised
        conditioning = None
        if inpainting:
            conditioning = torch.cat([latent_mask, masked_image_latents], dim=1)
            conditioning = torch.cat([conditioning] * 2) if cfg else conditioning
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
                if conditioning is not None:
                    model_input = torch.cat([model_input, conditioning], dim=1)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
                if cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                # Outside the region: the original, noised to the next step (clean after the last).
                if i + 1 < len(timesteps):
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2].repeat(batch))
                else:
                    known = image_latents
                latents = latent_mask * latents + (1 - latent_mask) * known
                progress_bar.update()
        return latents

    def render_base(
        self,
        prompts: list[str],
        words: list[list[str]],
        ids: list[list[int]],
        size: tuple[int, int],
        *,
        generator=None,
        **diffumask_kwargs: Any,
    ) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Base images ``(B, 3, H, W)`` in [-1, 1] and label maps rendered by DiffuMask with this pipeline's model.

        ``words[b]`` are the class words of ``prompts[b]``; ``ids[b]`` their label ids.
        """
        if self.unet.config.in_channels != 4:
            raise ValueError(
                "rendering a base from a prompt needs a text-to-image UNet (4 input channels); this one is an "
                "inpainting UNet: pass `image` and `label_map` instead"
            )
        renderer = DiffuMaskPipeline(**self.components, requires_safety_checker=False)
        renderer.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        out = renderer(
            prompts, class_names=words, height=size[0], width=size[1], generator=generator, output_type="pt",
            **diffumask_kwargs,
        )
        labels = []
        for mask, own_ids in zip(out.masks.numpy(), ids):
            lut = np.zeros(256, dtype=np.uint8)
            lut[1 : len(own_ids) + 1] = own_ids
            lut[IGNORE_INDEX] = IGNORE_INDEX
            labels.append(lut[mask])
        return (out.images * 2 - 1).to(self._execution_device), labels

    # ----------------------------------------------------------------------------------
    # checks

    def check_settings(
        self, mode, region_size, region_aspect, max_overlap, min_coverage, max_leak, max_retries, paste_strength,
        feather, output_type, crop_margin=None,
    ) -> None:
        """Raise ``ValueError`` on settings that cannot work."""
        if mode not in ("edit", "paste"):
            raise ValueError(f"mode must be 'edit' or 'paste', got {mode!r}")
        if self.unet.config.in_channels not in (4, 9):
            raise ValueError(
                f"the UNet has {self.unet.config.in_channels} input channels; FreeMaskEditPipeline supports "
                "4 (text-to-image) and 9 (inpainting)"
            )
        if not 0 < region_size[0] <= region_size[1] <= 1:
            raise ValueError(
                f"region_size must satisfy 0 < min <= max <= 1 (fractions of the image area), got {region_size}"
            )
        if not 0 < region_aspect[0] <= region_aspect[1]:
            raise ValueError(f"region_aspect must satisfy 0 < min <= max, got {region_aspect}")
        for name, value in (("max_overlap", max_overlap), ("min_coverage", min_coverage), ("max_leak", max_leak)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if int(max_retries) != max_retries or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries}")
        if not 0.0 < paste_strength <= 1.0:
            raise ValueError(f"paste_strength must be in (0, 1], got {paste_strength}")
        if feather is not None and feather < 0:
            raise ValueError(f"feather must be a non-negative number of pixels, got {feather}")
        if crop_margin is not None and (int(crop_margin) != crop_margin or crop_margin < 0):
            raise ValueError(f"crop_margin must be a non-negative number of latent cells or None, got {crop_margin}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


# =====================================================================================
# placement


def sample_free_box(
    occupied: np.ndarray,
    generator: torch.Generator | None = None,
    size_range: tuple[float, float] = (0.05, 0.25),
    aspect_range: tuple[float, float] = (0.5, 2.0),
    max_overlap: float = 0.2,
    grid: int = 1,
    tries: int = 100,
) -> Box | None:
    """A box ``(x0, y0, x1, y1)`` (end exclusive) where a new object fits, or None.

    Candidates are drawn from ``generator`` (all ``tries`` at once, so the generator
    advances by the same amount whatever is found): area a uniform fraction in
    ``size_range`` of the image, width/height ratio log-uniform in ``aspect_range``,
    position uniform; sides and corners snapped to multiples of ``grid`` (the VAE's scale
    factor, so the box covers whole latent cells). The first candidate whose share of
    ``occupied`` pixels is at most ``max_overlap`` is returned.

    Args:
        occupied: ``(H, W)`` boolean map of existing objects.
    """
    height, width = occupied.shape
    device = generator.device if generator is not None else "cpu"
    draws = torch.rand(tries, 4, generator=generator, device=device, dtype=torch.float64).cpu().numpy()
    # Summed-area table: the occupied count of any box in O(1).
    table = np.pad(occupied.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    for area_draw, aspect_draw, x_draw, y_draw in draws:
        area = (size_range[0] + area_draw * (size_range[1] - size_range[0])) * height * width
        aspect = math.exp(log_low + aspect_draw * (log_high - log_low))
        box_w = min(max(round(math.sqrt(area * aspect) / grid), 1) * grid, width // grid * grid)
        box_h = min(max(round(math.sqrt(area / aspect) / grid), 1) * grid, height // grid * grid)
        x0 = int(x_draw * ((width - box_w) // grid + 1)) * grid
        y0 = int(y_draw * ((height - box_h) // grid + 1)) * grid
        x1, y1 = x0 + box_w, y0 + box_h
        covered = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        if covered <= max_overlap * box_w * box_h:
            return x0, y0, x1, y1
    return None


def box_to_region(box: Box, size: tuple[int, int]) -> np.ndarray:
    """The ``(H, W)`` boolean mask of ``box``."""
    region = np.zeros(size, dtype=bool)
    x0, y0, x1, y1 = box
    region[y0:y1, x0:x1] = True
    return region


def bounding_box(region: np.ndarray) -> Box:
    """``(x0, y0, x1, y1)`` (end exclusive) of a non-empty boolean mask."""
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def latent_window(cells: torch.Tensor, margin: int | None, multiple: int) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` (end exclusive) of the latent window the UNet denoises for a region.

    The region's cells (``cells`` ``(h, w)``, nonzero inside) plus ``margin`` cells of context
    on every side, grown evenly to sides that are multiples of ``multiple`` (the UNet's total
    downsampling) and moved back inside the latent. ``margin=None``: the whole latent.
    """
    height, width = cells.shape
    if margin is None:
        return 0, height, 0, width
    rows = torch.nonzero(cells.any(1)).flatten()
    cols = torch.nonzero(cells.any(0)).flatten()

    def span(first: int, last: int, size: int) -> tuple[int, int]:
        low, high = max(first - margin, 0), min(last + 1 + margin, size)
        length = min(-(-(high - low) // multiple) * multiple, size)
        low = min(max(low - (length - (high - low)) // 2, 0), size - length)
        return low, low + length

    return (*span(int(rows[0]), int(rows[-1]), height), *span(int(cols[0]), int(cols[-1]), width))


# =====================================================================================
# masks and label maps


def object_mask(
    attention: torch.Tensor,
    region: np.ndarray,
    threshold: str | float = "otsu",
    ignore_band: float = 0.0,
    min_area: int = 0,
    objects: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """An inserted object's mask from its word's ``(H, W)`` attention, restricted to ``region``.

    The map is divided by its maximum within the region, so the threshold (``"otsu"`` and
    ``"adaptive"`` computed over the region's pixels only) separates the object from the rest
    of the region. Thresholding and small-component removal are :func:`diffuseg.masks.label_map`.

    Args:
        objects: ``(H, W)`` pixels of the objects already in the image. A class word attends to
            objects of its kind (on ShapesWorld "square" lights up a circle as much as a square),
            and these stay as they are: their pixels do not count as leak.

    Returns:
        ``(mask, uncertain, coverage, leak)``: boolean ``(H, W)`` mask inside the region;
        region pixels within ``ignore_band`` of the threshold; the fraction of the region
        the mask covers; the fraction of the above-threshold pixels of the (whole-image) map
        that lie outside the region and outside ``objects``.
    """
    region_t = torch.from_numpy(np.asarray(region, dtype=bool))
    attention = attention.float().cpu()
    peak = attention[region_t].max()
    if peak <= 0:
        empty = np.zeros(region_t.shape, dtype=bool)
        return empty, empty, 0.0, 1.0
    local = attention / peak
    cutoff = thresholds(local[region_t].reshape(1, -1), threshold).reshape(1)
    labels = assemble_label_map(local.masked_fill(~region_t, 0.0)[None], cutoff, ignore_band, min_area)
    mask = (labels == 1) & region
    uncertain = (labels == IGNORE_INDEX) & region
    elsewhere = ~region_t if objects is None else ~region_t & ~torch.from_numpy(np.asarray(objects, dtype=bool))
    outside = int(((local > cutoff) & elsewhere).sum())
    inside = int(mask.sum())
    coverage = inside / int(region_t.sum())
    leak = outside / (outside + inside) if outside + inside else 0.0
    return mask, uncertain, coverage, leak


def occupied_pixels(labels: np.ndarray) -> np.ndarray:
    """Where a label map has an object (a class id: neither background nor ignore)."""
    return (labels > 0) & (labels != IGNORE_INDEX)


def consistency_problem(result: _Attempt, min_coverage: float, max_leak: float) -> tuple[str | None, str | None]:
    """``(check, reason)``: the check an attempt fails and why, or ``(None, None)`` if it passes."""
    if result.coverage < min_coverage or not result.mask.any():
        return "min_coverage", f"mask covers {result.coverage:.1%} of its region (min_coverage={min_coverage:.1%})"
    if result.leak > max_leak:
        return "max_leak", (
            f"{result.leak:.1%} of the object's attention lies outside its region (max_leak={max_leak:.1%})"
        )
    return None, None


def insert_into_label_map(
    labels: np.ndarray,
    instances: Sequence[np.ndarray],
    mask: np.ndarray,
    class_id: int,
    repainted: np.ndarray | None = None,
    uncertain: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The label map and instance masks after a new object with ``mask`` is placed on top.

    * ``mask`` pixels take ``class_id``; earlier instances lose them (occlusion).
    * ``repainted`` pixels (the region a diffusion edit regenerated) outside the mask that
      belonged to an object become 255: the model redrew them, their old class is no longer
      known. Background stays background.
    * ``uncertain`` pixels (the new mask's ignore band) outside the mask become 255.

    Earlier instances keep only pixels that still carry their label, so instances stay
    disjoint and every instance pixel has its class's id. Inputs are not modified.

    Returns:
        ``(labels, instances + [mask])``.
    """
    labels = np.array(labels, dtype=np.uint8, copy=True)
    mask = np.asarray(mask, dtype=bool)
    lost = mask.copy()
    if repainted is not None:
        stale = np.asarray(repainted, dtype=bool) & ~mask & (labels != 0)
        labels[stale] = IGNORE_INDEX
        lost |= stale
    if uncertain is not None:
        doubtful = np.asarray(uncertain, dtype=bool) & ~mask
        labels[doubtful] = IGNORE_INDEX
        lost |= doubtful
    labels[mask] = class_id
    return labels, [own & ~lost for own in instances] + [mask.copy()]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (an object to paste is one piece)."""
    if not mask.any():
        return mask
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(components.ravel(), minlength=count + 1)
    areas[0] = 0
    return components == areas.argmax()


def fit_into_box(pixels: torch.Tensor, mask: np.ndarray, box: Box) -> tuple[torch.Tensor, np.ndarray]:
    """The object ``mask`` cuts out of ``pixels`` ``(3, H, W)``, scaled to fit ``box`` (aspect kept) and centred in it.

    Returns the placed pixels ``(3, H, W)`` (zero elsewhere) and the placed boolean mask.
    """
    height, width = mask.shape
    placed = torch.zeros_like(pixels)
    placed_mask = np.zeros((height, width), dtype=bool)
    if not mask.any():
        return placed, placed_mask
    x0, y0, x1, y1 = bounding_box(mask)
    bx0, by0, bx1, by1 = box
    scale = min((bx1 - bx0) / (x1 - x0), (by1 - by0) / (y1 - y0))
    new_w, new_h = max(1, int((x1 - x0) * scale)), max(1, int((y1 - y0) * scale))
    crop = pixels[:, y0:y1, x0:x1][None].float()
    crop_mask = torch.from_numpy(mask[y0:y1, x0:x1])[None, None].float()
    resized = F.interpolate(crop, size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    resized_mask = F.interpolate(crop_mask, size=(new_h, new_w), mode="bilinear", align_corners=False)[0, 0] > 0.5
    top, left = by0 + (by1 - by0 - new_h) // 2, bx0 + (bx1 - bx0 - new_w) // 2
    placed[:, top : top + new_h, left : left + new_w] = resized.to(placed)
    placed_mask[top : top + new_h, left : left + new_w] = resized_mask.numpy()
    return placed, placed_mask


def feather_weights(region: np.ndarray, feather: int) -> np.ndarray:
    """Paste-back weights: 1 in ``region``, falling linearly to 0 at ``feather + 1`` pixels from it."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~np.asarray(region, dtype=bool))
    return np.clip(1.0 - distance / (feather + 1), 0.0, 1.0).astype(np.float32)


def paste_back(image: torch.Tensor, decoded: torch.Tensor, region: np.ndarray, feather: int) -> torch.Tensor:
    """``image`` with the decoded ``region`` pasted in, feathered over ``feather`` pixels outside it.

    Pixels farther than ``feather`` pixels from the region are ``image``'s, bit for bit.
    """
    weight = torch.from_numpy(feather_weights(region, feather)).to(image)
    return image * (1 - weight) + decoded.to(image) * weight


# =====================================================================================
# input checks and conversions


def check_class_list(class_names: Sequence[str] | None) -> list[str]:
    """The class list, validated: non-empty strings, no duplicates, at most 254 classes."""
    if class_names is None or isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(
            "class_names is required: the list of classes, class_names[k - 1] having label id k "
            "(it must contain every class of the base label map and every object)"
        )
    names = [str(name).strip() for name in class_names]
    if any(not name for name in names):
        raise ValueError("class_names must be non-empty strings")
    lowered = [name.lower() for name in names]
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"duplicate entries in class_names: {names}")
    if len(names) >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} classes fit a uint8 label map; got {len(names)}")
    return names


def class_id(names: list[str], name: str) -> int:
    """Label id of class ``name`` (case-insensitive) in ``names``."""
    lowered = [n.lower() for n in names]
    if str(name).strip().lower() not in lowered:
        raise ValueError(f"unknown class {name!r}: it is not in class_names {names}; add it there")
    return lowered.index(str(name).strip().lower()) + 1


def check_image_size(size: tuple[int, int]) -> None:
    if size[0] % 8 or size[1] % 8 or min(size) <= 0:
        raise ValueError(f"image height and width must be positive multiples of 8, got {size[0]}x{size[1]}")


def _as_list(value: Any) -> list:
    """Lists and tuples as lists; anything else as a one-item list (batched arrays are split by the callers)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def prepare_images(image: Any) -> torch.Tensor:
    """Base images as a ``(B, 3, H, W)`` float tensor in [-1, 1] (see ``__call__`` for the accepted forms)."""
    items = []
    for item in _as_list(image):
        if isinstance(item, np.ndarray) and item.ndim == 4:
            items.extend(list(item))
        elif isinstance(item, torch.Tensor) and item.ndim == 4:
            items.extend(list(item))
        else:
            items.append(item)
    tensors = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            item = np.asarray(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[-1] != 3:
                raise ValueError(f"a base image array must be (H, W, 3), got shape {item.shape}")
            scale = 255.0 if item.dtype == np.uint8 else 1.0
            item = torch.from_numpy(np.array(item)).permute(2, 0, 1).float() / scale
        elif isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise ValueError(f"a base image tensor must be (3, H, W) in [0, 1], got shape {tuple(item.shape)}")
            item = item.float()
        else:
            raise ValueError(f"unsupported base image type {type(item).__name__}: use PIL, a numpy array or a tensor")
        tensors.append(item)
    if not tensors:
        raise ValueError("`image` is empty")
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"all base images of a batch must have the same size, got {sorted(sizes)}")
    return torch.stack(tensors).clamp(0, 1) * 2 - 1


def prepare_label_maps(label_map: Any, batch: int, size: tuple[int, int], num_classes: int) -> list[np.ndarray]:
    """Base label maps as ``uint8`` arrays, checked against the images and the class list."""
    if label_map is None:
        raise ValueError("`label_map` is required with `image` (all zeros if the base has no labelled object)")
    items = []
    for item in _as_list(label_map):
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 3:
            items.extend(list(item))
        else:
            items.append(item)
    if len(items) != batch:
        raise ValueError(f"got {batch} base images but {len(items)} label maps; give one label map per image")
    maps = []
    for b, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            item = item.cpu().numpy()
        array = np.asarray(item)
        if array.ndim != 2:
            raise ValueError(f"label map {b} must be (H, W), got shape {array.shape}")
        if array.shape != tuple(size):
            raise ValueError(
                f"label map {b} is {array.shape[0]}x{array.shape[1]} but its image is {size[0]}x{size[1]}; "
                "they must have the same size"
            )
        values = np.unique(array)
        bad = [int(v) for v in values if not (0 <= v <= num_classes or v == IGNORE_INDEX)]
        if bad:
            raise ValueError(
                f"label map {b} has values {bad} that are not class ids of class_names (1..{num_classes}), 0 or 255"
            )
        maps.append(array.astype(np.uint8))
    return maps


@dataclass
class _Object:
    class_name: str
    word: str
    prompt: str
    region: np.ndarray | None


def parse_objects(objects: Any, batch: int, names: list[str], size: tuple[int, int], tokenizer) -> list[list[_Object]]:
    """One validated list of objects per image."""
    if objects is None:
        raise ValueError("`objects` is required: the objects to insert (class names or FreeMaskObject)")
    objects = list(objects)
    if objects and all(isinstance(o, (list, tuple)) for o in objects):
        if len(objects) != batch:
            raise ValueError(f"got {batch} base images but {len(objects)} lists of objects; give one list per image")
        per_image = [list(o) for o in objects]
    else:
        per_image = [objects] * batch
    return [[parse_object(o, names, size, tokenizer) for o in own] for own in per_image]


def parse_object(obj: Any, names: list[str], size: tuple[int, int], tokenizer) -> _Object:
    if isinstance(obj, str):
        obj = FreeMaskObject(obj)
    elif isinstance(obj, dict):
        obj = FreeMaskObject(**obj)
    elif not isinstance(obj, FreeMaskObject):
        raise ValueError(f"an object to insert is a class name, a dict or a FreeMaskObject; got {type(obj).__name__}")
    class_id(names, obj.class_name)
    word = obj.word or obj.class_name
    prompt = obj.prompt or default_object_prompt(word)
    word_token_positions(tokenizer, prompt, word)  # the word must be in the prompt, before the token limit
    region = None if obj.region is None else parse_region(obj.region, size)
    return _Object(obj.class_name, word, prompt, region)


def default_object_prompt(word: str) -> str:
    """``"a picture of a <word>"``: a caption of the embedded ShapesWorld model's grammar, and plain English."""
    return f"a picture of {'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def parse_region(region: Region, size: tuple[int, int]) -> np.ndarray:
    """A region (box or mask) as a non-empty ``(H, W)`` boolean mask inside the image."""
    height, width = size
    if isinstance(region, PIL.Image.Image):
        region = np.asarray(region.convert("L")) > 0
    elif isinstance(region, torch.Tensor):
        region = region.cpu().numpy()
    if isinstance(region, np.ndarray) and region.ndim == 2:
        if region.shape != (height, width):
            raise ValueError(
                f"region mask is {region.shape[0]}x{region.shape[1]} but the image is {height}x{width}; "
                "a mask region must have the image's size"
            )
        mask = region.astype(bool)
        if not mask.any():
            raise ValueError("empty region: the region mask has no pixel set")
        return mask
    box = np.asarray(region).ravel()
    if box.shape != (4,) or not np.all(np.isfinite(box.astype(float))):
        raise ValueError(f"a region is a box (x0, y0, x1, y1) or an (H, W) mask, got {region!r}")
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty region: box {(x0, y0, x1, y1)} needs x0 < x1 and y0 < y1 (x1, y1 exclusive)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(
            f"region {(x0, y0, x1, y1)} lies outside the {width}x{height} image "
            f"(boxes are (x0, y0, x1, y1) pixels with 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})"
        )
    return box_to_region((x0, y0, x1, y1), size)


def check_generators(generator, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} images; give one per image or a single one")


def pick(generator, indices: Sequence[int]):
    """The generators of images ``indices``: a sub-list of a per-image list, else the shared one."""
    if isinstance(generator, list):
        return [generator[i] for i in indices]
    return generator
