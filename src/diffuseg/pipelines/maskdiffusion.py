"""MaskDiffusion: training-free open-vocabulary segmentation of real images with a frozen Stable Diffusion.

Kawano & Aoki, "MaskDiffusion: Exploiting Pre-trained Diffusion Models for Semantic
Segmentation", 2024. The image's VAE latent is noised a little and run once through the
UNet with the candidate class names as the prompt ("cat and dog and sofa"). That one pass
gives (1) each class name's cross-attention at the coarsest resolutions and (2) the
UNet decoder's features. Each class gets a prototype, the attention-weighted mean feature
``P_c = Σ F·A_c / Σ A_c``; each pixel goes to the class whose prototype its feature is
most similar to (cosine). Nothing is trained. Without class names, k-means on the same
features gives an unsupervised segmentation (cluster maps).

Images larger than the model's native size are covered by overlapping windows whose
features and attention are blended into whole-image maps before prototypes (or clusters)
are computed, so a class has one prototype per image and cluster ids agree across windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffuseg.attention import AttentionController, AttentionStore, attention_control
from diffuseg.masks import aggregate_resolutions, upsample
from diffuseg.models import pipeline_defaults
from diffuseg.tokens import token_weights

DEFAULT_TIMESTEP = 50
"""Noise level (of 1000 training timesteps) the latent is noised to: little, as in the paper."""
DEFAULT_FEATURE_BLOCKS = (0, 1)
"""The two coarsest decoder blocks: the paper's stride-32 and stride-16 features at SD scale."""
PROMPT_SEPARATOR = " and "

OUTPUT_TYPES = ("np", "pt", "pil")


@dataclass
class MaskDiffusionSegOutput(BaseOutput):
    """Output of :class:`MaskDiffusionSegPipeline`.

    Attributes:
        segmentation: label maps ``(B, H, W)`` at each input's size. With class names: id
            ``c`` is ``class_names[c]``, and ``len(class_names)`` is background when background
            handling is on. Unsupervised: cluster ids ``0..k-1``, largest cluster first.
            ``int64`` array (``"np"``), ``int64`` tensor (``"pt"``), or mode-"L" PIL images (``"pil"``).
        scores: ``(B, C, H, W)`` ``float32``, ``segmentation == scores.argmax(1)``. With class
            names: cosine similarity of each pixel's feature to each class prototype, plus a
            last background channel when background handling is on. Unsupervised: similarity to
            each cluster centre; an image with fewer clusters than the batch's largest ``k`` has
            ``-inf`` in its extra channels. A tensor for ``"pt"``, else an array.

        Inputs of different sizes give lists of per-image arrays/tensors instead of stacks.
    """

    segmentation: np.ndarray | torch.Tensor | list
    scores: np.ndarray | torch.Tensor | list


class _EnoughComputed(Exception):
    """Raised by a forward hook to stop the UNet once every needed block has run."""


class _StoreSwitch(AttentionController):
    """Forwards to the :class:`AttentionStore` of the current window and prompt.

    Installed once per batch: installing processors walks every module of the UNet, which
    costs milliseconds per install on an SD-sized UNet, as much as a GPU UNet pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store: AttentionStore | None = None

    def wants(self, kind: str, size: tuple[int, int]) -> bool:
        return self.store is not None and self.store.wants(kind, size)

    def __call__(self, kind: str, size: tuple[int, int], probs: torch.Tensor, queries: slice) -> None:
        return self.store(kind, size, probs, queries)


class MaskDiffusionSegPipeline(StableDiffusionPipeline):
    """Segment real images into named classes with a Stable Diffusion checkpoint, training-free.

    Loads from any Stable Diffusion 1.x/2.x checkpoint, e.g.
    ``MaskDiffusionSegPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")``,
    or with ``DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/maskdiffusion",
    trust_remote_code=True)``. The text-to-image methods it inherits are not used.
    """

    @torch.no_grad()
    def __call__(
        self,
        image,
        class_names: Sequence[str] | None = None,
        prompt: str | None = None,
        background_prompt: str | None = None,
        background_threshold: float | None = None,
        attention_floor: float = 0.0,
        min_class_share: float = 0.0,
        timesteps: int | Sequence[int] = DEFAULT_TIMESTEP,
        num_noise_draws: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        attention_resolutions: Sequence[int] | None = None,
        feature_blocks: Sequence[int] | None = None,
        num_clusters: int | None = None,
        max_clusters: int = 8,
        window_size: int | None = None,
        window_overlap: float = 0.25,
        max_side: int | None = None,
        batch_size: int = 8,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> MaskDiffusionSegOutput | tuple:
        r"""Segment ``image`` into ``class_names`` (or into clusters when ``class_names`` is None).

        Args:
            image: one image or a list: PIL images of any mode, ``(H, W)`` / ``(H, W, C)``
                numpy arrays (or a ``(B, H, W, C)`` stack), ``(C, H, W)`` tensors (or a
                ``(B, C, H, W)`` stack), ``C`` in 1–4; any size. See :func:`image_to_tensor`
                for how modes and dtypes are read (16-bit: divided by 65535; alpha: composited
                onto white).
            class_names: candidate classes; the prompt is these names joined by " and ". When
                the names do not fit the text encoder's token limit, they are split over several
                prompts (one UNet pass each). ``None``: unsupervised mode (k-means).
            prompt: a prompt of your own that names every class (and the background word) as
                a whole word, e.g. ``"a photo of a cat and a dog on the grass"`` for
                ``["cat", "dog", "grass"]``: a model reads its words best in the kind of
                caption it was trained on. Each name's attention is read at its own tokens.
                Default: the model's caption form (:meth:`diffuseg.models.ModelDefaults.segment_caption`;
                ShapesWorld: "a picture of a circle and a square on a background") when it fits the
                text encoder, else the names joined by " and ".
            background_prompt: a word for the background (e.g. ``"background"``), added to the
                prompt as one more class. Its pixels get id ``len(class_names)``.
            background_threshold: pixels whose best class score (cosine similarity, in [-1, 1])
                is below this get id ``len(class_names)``.
            attention_floor: in ``[0, 1)``: a class's attention (max-normalised) counts toward its
                prototype only above this floor (``A - floor``, clipped at 0), so a word's diffuse
                attention on the rest of the image does not pull its prototype there.
            min_class_share: in ``[0, 1)``: decides which named classes are present. A class whose
                arg-max region covers less than this fraction of the image is taken as absent and
                the pixels are reassigned among the others (repeatedly, the smallest first). A
                name absent from the image still gets a prototype (its attention lands on some
                object), which otherwise steals that object's pixels. The background word's
                class is never removed.
            timesteps: timestep(s) the latent is noised to (0 … the scheduler's
                ``num_train_timesteps - 1``); several are averaged, one UNet pass each.
            num_noise_draws: noise draws per timestep, averaged (one UNet pass each).
            generator: torch generator(s) for the noise (and k-means); one per image, or one.
            attention_resolutions: heights of the cross-attention maps used, as they are at the
                model's native size (e.g. ``(16, 8)`` for SD 1.5 at 512 px). Default: the two
                coarsest resolutions with cross-attention.
            feature_blocks: indices of ``unet.up_blocks`` whose outputs are the features
                (default ``(0, 1)``: the two coarsest decoder blocks).
            num_clusters: unsupervised mode only: ``k`` for k-means; ``None`` chooses ``k`` in
                ``2..max_clusters`` per image by the best silhouette.
            max_clusters: the largest ``k`` tried when choosing it automatically.
            window_size: side of the sliding window in pixels (default: the model's native
                size, e.g. 512 for SD 1.5). An image that fits is processed in one pass.
            window_overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.
            max_side: if given, images whose longer side exceeds it are downscaled first
                (the outputs still come back at the input size).
            batch_size: most images per UNet batch (images of the same processed size are batched).
            output_type: ``"np"``, ``"pt"`` or ``"pil"`` (see :class:`MaskDiffusionSegOutput`).
            return_dict: return a :class:`MaskDiffusionSegOutput` rather than a tuple.

        Returns:
            :class:`MaskDiffusionSegOutput`, or ``(segmentation, scores)``.
        """
        # 0. Check everything before any model runs.
        images = images_to_tensors(image)
        unsupervised = class_names is None
        if unsupervised:
            if background_prompt or background_threshold is not None:
                raise ValueError("background handling needs class_names; the unsupervised mode returns clusters only")
            if num_clusters is not None and (isinstance(num_clusters, bool) or int(num_clusters) < 1):
                raise ValueError(f"num_clusters must be a positive integer or None (automatic), got {num_clusters!r}")
            if max_clusters < 2:
                raise ValueError(f"max_clusters must be at least 2, got {max_clusters}")
            words: list[str] = []
        else:
            if num_clusters is not None:
                raise ValueError("num_clusters is for the unsupervised mode: pass class_names=None to cluster")
            words = self.check_class_names(class_names, background_prompt)
        for name, value in (("attention_floor", attention_floor), ("min_class_share", min_class_share)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        timesteps = self.check_timesteps(timesteps)
        levels = self.attention_levels(attention_resolutions) if words else []
        blocks = self.check_feature_blocks(feature_blocks)
        window = self.check_window(window_size)
        if not 0.0 <= window_overlap < 1.0:
            raise ValueError(f"window_overlap must be in [0, 1), got {window_overlap}")
        if num_noise_draws < 1 or batch_size < 1:
            raise ValueError(f"num_noise_draws and batch_size must be at least 1, got {num_noise_draws}, {batch_size}")
        if max_side is not None and max_side < 1:
            raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        generators = per_image_generators(generator, len(images))

        # 1. The prompt(s), encoded once for the whole call: the user's, or the class names
        # joined by " and ", over several prompts when they do not fit the text encoder.
        if prompt is None and words:
            background = words[-1] if len(words) > len(class_names) else None
            prompt = pipeline_defaults(self).segment_caption(words[: len(class_names)], background)
            if prompt is not None and len(self.tokenizer(prompt).input_ids) > self.tokenizer.model_max_length:
                prompt = None  # too long for one pass: the names joined by " and ", in chunks
        if prompt is None:
            texts = [(PROMPT_SEPARATOR.join(chunk), chunk) for chunk in prompt_chunks(self.tokenizer, words)]
        else:
            texts = [(prompt, words)]
        device = self._execution_device
        prompts = []
        for text, chunk in texts:
            weights = token_weights(self.tokenizer, [text], [chunk]) if chunk else None
            prompts.append((self.encode_prompt(text, device, 1, False)[0], weights))

        # 2. Images of one processed size form batches; each batch is covered by windows.
        sizes = [self.processed_size(tuple(img.shape[-2:]), max_side) for img in images]
        batches = same_size_batches(sizes, batch_size)
        passes = len(prompts) * len(timesteps) * num_noise_draws
        total = sum(len(window_boxes(*sizes[b[0]], window, window_overlap, self.size_multiple)) for b in batches)
        results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(images)  # type: ignore[list-item]
        with self.progress_bar(total=total * passes) as bar:
            for batch in batches:
                pixels = torch.stack([resize_image(images[i], sizes[i]) for i in batch])
                batch_generators = None if generators is None else [generators[i] for i in batch]
                features, attention = self.extract(
                    pixels, prompts, levels, blocks, timesteps, num_noise_draws, batch_generators,
                    window, window_overlap, bar,
                )

                # 3. Scores per image at its own size: prototypes (or clusters), background, arg-max.
                for j, i in enumerate(batch):
                    if unsupervised:
                        cluster_generator = None if batch_generators is None else batch_generators[j]
                        scores = cluster_scores(features[j], num_clusters, max_clusters, cluster_generator)
                    else:
                        keep = len(class_names) if len(words) > len(class_names) else None
                        scores = present_class_scores(
                            features[j], attention[j], attention_floor, min_class_share, removable=keep
                        )
                    scores = upsample(scores, tuple(images[i].shape[-2:]))
                    if background_threshold is not None:
                        floor = torch.full_like(scores[:1], float(background_threshold))
                        if len(words) > len(class_names):  # the background word's channel is last
                            scores[-1:] = torch.maximum(scores[-1:], floor)
                        else:
                            scores = torch.cat([scores, floor])
                    results[i] = (scores.argmax(dim=0), scores)

        self.maybe_free_model_hooks()
        segmentation, scores = format_outputs(results, output_type)
        if not return_dict:
            return segmentation, scores
        return MaskDiffusionSegOutput(segmentation=segmentation, scores=scores)

    # ------------------------------------------------------------------ features and attention
    def extract(
        self,
        pixels: torch.Tensor,
        prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
        levels: list[int],
        blocks: list[int],
        timesteps: list[int],
        num_noise_draws: int,
        generator: list[torch.Generator] | None,
        window: int,
        overlap: float,
        bar=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whole-image features and class attention of ``pixels`` ``(B, 3, H, W)`` in [0, 1].

        Each window's features and raw attention are averaged where windows overlap; then
        the attention resolutions are upsampled to the feature grid, max-normalised per class
        and averaged (as DiffuMask aggregates them).

        Returns:
            features ``(B, D, h, w)``, unit length per pixel, and attention ``(B, C, h, w)``
            (``None`` when ``prompts`` name no class).
        """
        batch, _, height, width = pixels.shape
        boxes = window_boxes(height, width, window, overlap, self.size_multiple)
        box_h, box_w = boxes[0][2:]  # every window has the same size

        def canvas(maps: torch.Tensor) -> torch.Tensor:
            cell = box_h // maps.shape[-2]
            return maps.new_zeros(*maps.shape[:2], height // cell, width // cell)

        def add(total: torch.Tensor, maps: torch.Tensor, top: int, left: int) -> None:
            cell = box_h // maps.shape[-2]
            total[..., top // cell : (top + box_h) // cell, left // cell : (left + box_w) // cell] += maps

        feature_sum = attention_sums = None
        feature_count = torch.zeros(height, width)
        switch = _StoreSwitch() if any(weights is not None for _, weights in prompts) else None
        with attention_control(self.unet, switch) if switch is not None else nullcontext():
            for top, left, _, _ in boxes:
                latents = self.encode_latents(pixels[:, :, top : top + box_h, left : left + box_w])
                features, attention = self.unet_features(
                    latents, prompts, levels, blocks, timesteps, num_noise_draws, generator, switch, bar
                )
                if feature_sum is None:
                    feature_sum = canvas(features)
                    attention_sums = {level: canvas(maps) for level, maps in attention.items()}
                add(feature_sum, features, top, left)
                for level, maps in attention.items():
                    add(attention_sums[level], maps, top, left)
                feature_count[top : top + box_h, left : left + box_w] += 1

        # Every window covers whole cells of every grid (boxes are aligned to the coarsest one),
        # so the per-pixel window count, read at any cell, divides that cell's sum exactly.
        def blend(total: torch.Tensor) -> torch.Tensor:
            cell = height // total.shape[-2]
            return total / feature_count[::cell, ::cell].to(total)

        features = F.normalize(blend(feature_sum), dim=1)
        if not attention_sums:
            return features, None
        attention = aggregate_resolutions([blend(t) for t in attention_sums.values()], tuple(features.shape[-2:]))
        return features, attention

    def unet_features(
        self,
        latents: torch.Tensor,
        prompts: list[tuple[torch.Tensor, torch.Tensor | None]],
        levels: list[int],
        blocks: list[int],
        timesteps: list[int],
        num_noise_draws: int,
        generator: list[torch.Generator] | None,
        switch: _StoreSwitch | None = None,
        bar=None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Decoder features and cross-attention of one window's latents, averaged over passes.

        One UNet pass per prompt × timestep × noise draw (one, by default). Only the attention
        layers at ``levels`` are computed explicitly, and the UNet stops after the last up
        block that is needed. ``switch`` must be installed on the UNet (see :meth:`extract`)
        when a prompt names classes.

        Returns:
            features ``(B, D, h, w)`` (each block's output L2-normalised per pixel, upsampled to
            the finest block's grid, concatenated) and ``{level: (B, C, h_l, w_l)}`` raw attention.
        """
        batch = latents.shape[0]
        heights = [math.ceil(latents.shape[-2] / 2**level) for level in levels]
        sums: dict[int, torch.Tensor] = {}

        def keep(block: int):
            def hook(module, args, output):
                normalized = F.normalize(output.float(), dim=1)
                sums[block] = sums[block] + normalized if block in sums else normalized

            return hook

        def stop(module, args, output):
            raise _EnoughComputed

        num_levels = len(self.unet.up_blocks)
        last_block = max([*blocks, *(num_levels - 1 - level for level in levels)])
        handles = [self.unet.up_blocks[b].register_forward_hook(keep(b)) for b in blocks]
        # Registered last, so it runs after the feature hook of the same block.
        handles.append(self.unet.up_blocks[last_block].register_forward_hook(stop))

        noisy = []
        for t in timesteps:
            for _ in range(num_noise_draws):
                noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                noisy.append((t, self.add_noise(latents, noise, t)))
        attention: dict[int, list[torch.Tensor]] = {level: [] for level in levels}
        try:
            for embeds, weights in prompts:
                store = None
                if weights is not None:
                    store = switch.store = AttentionStore(weights.expand(batch, -1, -1), resolutions=heights)
                for t, sample in noisy:
                    try:
                        self.unet(sample, t, encoder_hidden_states=embeds.expand(batch, -1, -1), return_dict=False)
                    except _EnoughComputed:
                        pass
                    if bar is not None:
                        bar.update()
                if store is not None:
                    recorded = store.cross_attention()
                    for level, height in zip(levels, heights):
                        size = next((s for s in recorded if s[0] == height), None)
                        if size is None:
                            raise RuntimeError(f"no cross-attention was recorded at height {height}")
                        attention[level].append(recorded[size])
        finally:
            if switch is not None:
                switch.store = None
            for handle in handles:
                handle.remove()

        count = len(prompts) * len(noisy)
        finest = max((sums[b] for b in blocks), key=lambda f: f.shape[-1])
        grid = tuple(finest.shape[-2:])
        features = torch.cat(
            [sums[b] / count if sums[b].shape[-2:] == grid else upsample(sums[b] / count, grid) for b in blocks], dim=1
        )
        return features, {level: torch.cat(maps, dim=1) for level, maps in attention.items()}

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents (distribution mean, scaled) of ``(B, 3, H, W)`` pixels in [0, 1]."""
        # The VAE's own device, not _execution_device: that property walks every module (slow per window).
        pixels = (2 * pixels - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """The forward diffusion ``√ᾱ_t x + √(1-ᾱ_t) ε`` the UNet was trained on, for any scheduler."""
        alpha = self.scheduler.alphas_cumprod[timestep].to(device=latents.device, dtype=torch.float32)
        return (alpha.sqrt() * latents.float() + (1 - alpha).sqrt() * noise.float()).to(latents.dtype)

    # ------------------------------------------------------------------ options
    @staticmethod
    def check_class_names(class_names: Sequence[str], background_prompt: str | None = None) -> list[str]:
        """The words of the prompt: stripped class names, then the background word if any.

        Raises:
            ValueError: empty list, a non-string or empty name, or duplicates (case-insensitive,
                the background word included).
        """
        if isinstance(class_names, str):
            raise ValueError(f"class_names must be a list of names, not one string: e.g. {class_names.split(',')!r}")
        if class_names is None or len(class_names) == 0:
            raise ValueError("class_names is empty: name at least one class to segment")
        if not all(isinstance(name, str) and name.strip() for name in class_names):
            raise ValueError(f"class names must be non-empty strings, got {list(class_names)!r}")
        words = [name.strip() for name in class_names]
        if background_prompt is not None and background_prompt.strip():
            words.append(background_prompt.strip())
        lowered = [w.lower() for w in words]
        duplicates = sorted({w for w in lowered if lowered.count(w) > 1})
        if duplicates:
            raise ValueError(
                f"duplicate class names {duplicates} (names are matched case-insensitively); list each class once"
            )
        return words

    def check_timesteps(self, timesteps: int | Sequence[int]) -> list[int]:
        values = [timesteps] if isinstance(timesteps, (int, np.integer)) else list(timesteps)
        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{type(self.scheduler).__name__} has no alphas_cumprod: load the pipeline with a DDIM/DDPM/PNDM scheduler"
            )
        limit = len(self.scheduler.alphas_cumprod)
        if not values or any(not 0 <= int(t) < limit for t in values):
            raise ValueError(f"timesteps must be integers in [0, {limit - 1}], got {timesteps!r}")
        return [int(t) for t in values]

    def cross_attention_levels(self) -> list[int]:
        """UNet levels (0 = latent size, each next one half) that have cross-attention."""
        config = self.unet.config
        levels = {i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind}
        if config.mid_block_type and "CrossAttn" in config.mid_block_type:
            levels.add(len(config.down_block_types) - 1)
        return sorted(levels)

    def attention_levels(self, resolutions: Sequence[int] | None) -> list[int]:
        """Levels of ``resolutions`` (heights at the native size); default: the two coarsest with cross-attention."""
        available = self.cross_attention_levels()
        if not available:
            raise ValueError("this UNet has no cross-attention layers: MaskDiffusion needs them to locate the classes")
        if resolutions is None:
            return available[-2:]
        native = self.native_latent_size
        by_height = {math.ceil(native / 2**level): level for level in available}
        unknown = [r for r in resolutions if r not in by_height]
        if unknown or not resolutions:
            raise ValueError(
                f"attention_resolutions {list(resolutions)} are not among this model's cross-attention resolutions "
                f"{sorted(by_height, reverse=True)} (map heights at its native {native * self.vae_scale_factor}px)"
            )
        return sorted({by_height[r] for r in resolutions})

    def check_feature_blocks(self, blocks: Sequence[int] | None) -> list[int]:
        count = len(self.unet.up_blocks)
        if blocks is None:
            return [b for b in DEFAULT_FEATURE_BLOCKS if b < count]
        blocks = sorted({int(b) for b in blocks})
        if not blocks or any(not 0 <= b < count for b in blocks):
            raise ValueError(f"feature_blocks must be indices of the UNet's {count} up blocks (0..{count - 1}), got {blocks}")
        return blocks

    @property
    def native_latent_size(self) -> int:
        size = self.unet.config.sample_size
        return int(max(size) if isinstance(size, (list, tuple)) else size)

    @property
    def size_multiple(self) -> int:
        """Processed sides and window offsets are multiples of this: one cell of the coarsest UNet level."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_window(self, window_size: int | None) -> int:
        window = window_size or self.native_latent_size * self.vae_scale_factor
        if window < self.size_multiple:
            raise ValueError(f"window_size must be at least {self.size_multiple} pixels for this model, got {window_size}")
        return window // self.size_multiple * self.size_multiple

    def processed_size(self, size: tuple[int, int], max_side: int | None = None) -> tuple[int, int]:
        """The size an input of ``size`` is processed at: scaled to ``max_side``, sides rounded to :attr:`size_multiple`."""
        scale = min(1.0, max_side / max(size)) if max_side else 1.0
        multiple = self.size_multiple
        return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in size)


# ---------------------------------------------------------------------- the method's arithmetic
def prototype_scores(features: torch.Tensor, attention: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of each pixel's feature to each class prototype.

    Args:
        features: ``(B, D, h, w)``.
        attention: ``(B, C, h, w)``, non-negative weights of each class at each pixel.

    Returns:
        ``(B, C, h, w)`` scores: ``cos(F(x), P_c)`` with ``P_c = Σ_x F(x)·A_c(x) / Σ_x A_c(x)``.
    """
    batch, _, height, width = features.shape
    flat = F.normalize(features.flatten(2).float(), dim=1)  # (B, D, N)
    weights = attention.flatten(2).float()  # (B, C, N)
    prototypes = torch.bmm(weights, flat.transpose(1, 2)) / weights.sum(dim=-1, keepdim=True).clamp_min(eps)
    scores = torch.bmm(F.normalize(prototypes, dim=-1), flat)  # (B, C, N)
    return scores.reshape(batch, -1, height, width)


ABSENT_SCORE = -2.0
"""The score of a class judged absent: below any cosine similarity, so it never wins a pixel."""


def present_class_scores(
    features: torch.Tensor,
    attention: torch.Tensor,
    attention_floor: float = 0.0,
    min_class_share: float = 0.0,
    removable: int | None = None,
) -> torch.Tensor:
    """Prototype scores ``(C, h, w)`` of one image, classes judged absent set to :data:`ABSENT_SCORE`.

    ``features`` ``(D, h, w)``, ``attention`` ``(C, h, w)`` max-normalised. Attention below
    ``attention_floor`` does not count toward a prototype. Then, while the smallest arg-max
    region of the first ``removable`` classes (all when None) covers less than
    ``min_class_share`` of the image, that class is dropped and the prototypes of the rest
    are recomputed (a dropped class no longer shares its pixels' competition).
    """
    weights = (attention - attention_floor).clamp_min(0) if attention_floor > 0 else attention
    removable = attention.shape[0] if removable is None else removable
    present = torch.ones(attention.shape[0], dtype=torch.bool, device=attention.device)
    while True:
        scores = prototype_scores(features[None], weights[None] * present[None, :, None, None])[0]
        scores[~present] = ABSENT_SCORE
        if min_class_share <= 0:
            return scores
        share = torch.bincount(scores.argmax(0).flatten(), minlength=len(present)).float() / scores[0].numel()
        candidates = torch.where(present[:removable] & (share[:removable] < min_class_share))[0]
        if len(candidates) == 0 or int(present.sum()) == 1:
            return scores
        present[candidates[share[candidates].argmin()]] = False


def kmeans(
    points: torch.Tensor, k: int, generator: torch.Generator | None = None, iterations: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (cosine similarity) of ``(N, D)`` points, k-means++ seeding.

    Deterministic for a given ``generator``. An emptied cluster is re-seeded with the point
    farthest from its centre.

    Returns:
        assignments ``(N,)`` and unit-length centres ``(k, D)``, largest cluster first.
    """
    points = F.normalize(points.float(), dim=1)
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"cannot make {k} clusters of {count} points")
    # Seeding draws on the CPU, where a CPU generator can be used whatever the points' device.
    first = int(torch.randint(count, (1,), generator=generator))
    centres = [points[first]]
    distance = (1 - points @ centres[0]).clamp_min(0).cpu()
    for _ in range(1, k):
        # 1 - cos is half the squared distance of unit vectors: k-means++'s D² weighting.
        if float(distance.sum()) > 0:
            index = int(torch.multinomial(distance, 1, generator=generator))
        else:
            index = int(torch.randint(count, (1,), generator=generator))
        centres.append(points[index])
        distance = torch.minimum(distance, (1 - points @ points[index]).clamp_min(0).cpu())
    centres = torch.stack(centres)

    assignments = None
    for _ in range(iterations):
        similarity = points @ centres.T
        new = similarity.argmax(dim=1)
        if assignments is not None and torch.equal(new, assignments):
            break
        assignments = new
        sizes = torch.bincount(assignments, minlength=k)
        for empty in torch.nonzero(sizes == 0).flatten().tolist():
            farthest = int(similarity.gather(1, assignments[:, None]).squeeze(1).argmin())
            assignments[farthest] = empty
        centres = F.normalize(torch.zeros_like(centres).index_add_(0, assignments, points), dim=1)
    order = torch.argsort(torch.bincount(assignments, minlength=k), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=order.device)
    return rank[assignments], centres[order]


def silhouette_score(points: torch.Tensor, assignments: torch.Tensor) -> float:
    """Mean silhouette of a clustering under cosine distance (``(N, D)`` points, ``(N,)`` ids)."""
    points = F.normalize(points.float(), dim=1)
    distance = (1 - points @ points.T).clamp_min(0)
    k = int(assignments.max()) + 1
    one_hot = F.one_hot(assignments, k).float()  # (N, k)
    sizes = one_hot.sum(dim=0)
    mean_to = distance @ one_hot / sizes.clamp_min(1)  # mean distance of each point to each cluster
    own = assignments[:, None]
    own_size = sizes[assignments]
    # Within-cluster mean excludes the point itself (its distance to itself is 0).
    a = mean_to.gather(1, own).squeeze(1) * own_size / (own_size - 1).clamp_min(1)
    b = mean_to.scatter(1, own, float("inf")).masked_fill(sizes[None, :] == 0, float("inf")).min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s = torch.where(own_size > 1, s, torch.zeros_like(s))  # a singleton's silhouette is 0 by convention
    return float(s.mean())


MAX_SILHOUETTE_POINTS = 1024
"""Silhouettes are O(N²): the automatic choice of k scores a random subset of this many pixels."""


def cluster_scores(
    features: torch.Tensor, num_clusters: int | None, max_clusters: int = 8, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unsupervised scores of one image: similarity of its ``(D, h, w)`` features to k-means centres.

    ``num_clusters=None`` tries ``k = 2..max_clusters`` and keeps the best mean silhouette.

    Returns:
        ``(k, h, w)`` cosine similarities; the arg-max is the cluster map, largest cluster 0.
    """
    points = features.flatten(1).T  # (N, D)
    count = points.shape[0]
    if num_clusters is not None:
        if num_clusters > count:
            raise ValueError(f"num_clusters={num_clusters} exceeds the {count} feature positions of this image")
        _, centres = kmeans(points, int(num_clusters), generator)
    else:
        sample = torch.randperm(count, generator=generator)[:MAX_SILHOUETTE_POINTS].to(points.device)
        best = None
        for k in range(2, min(max_clusters, count - 1) + 1):
            assignments, candidate = kmeans(points, k, generator)
            score = silhouette_score(points[sample], assignments[sample])
            if best is None or score > best[0]:
                best = (score, candidate)
        if best is None:
            raise ValueError(f"an image with {count} feature positions is too small to cluster")
        centres = best[1]
    similarity = centres @ F.normalize(points.float(), dim=1).T  # (k, N)
    return similarity.reshape(-1, *features.shape[-2:])


# ---------------------------------------------------------------------- prompts, windows, batches
def prompt_chunks(tokenizer, words: Sequence[str]) -> list[list[str]]:
    """``words`` split into consecutive groups whose " and "-joined prompt fits the tokenizer's limit.

    One group (one UNet pass) unless the names are too many for the text encoder. No words: one
    empty prompt (the unsupervised mode).
    """
    if not words:
        return [[]]
    limit = tokenizer.model_max_length

    def fits(group: list[str]) -> bool:
        return len(tokenizer(PROMPT_SEPARATOR.join(group), truncation=False, verbose=False).input_ids) <= limit

    chunks: list[list[str]] = [[]]
    for word in words:
        if not fits([word]):
            raise ValueError(f"class name {word!r} alone is longer than the text encoder's {limit}-token limit")
        if chunks[-1] and not fits([*chunks[-1], word]):
            chunks.append([])
        chunks[-1].append(word)
    return chunks


def window_boxes(height: int, width: int, window: int, overlap: float, multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of overlapping windows covering a ``height × width`` image.

    A side no longer than ``window`` is one window of the whole side. Otherwise windows of
    ``window`` pixels step by ``window·(1 - overlap)`` rounded down to ``multiple`` (at least
    one ``multiple``), and the last one ends flush with the image. Offsets are multiples of
    ``multiple`` when ``height``, ``width`` and ``window`` are.
    """

    def starts(side: int) -> list[int]:
        if side <= window:
            return [0]
        step = max(multiple, int(window * (1 - overlap)) // multiple * multiple)
        positions = list(range(0, side - window, step))
        return [*positions, side - window]

    box_h, box_w = min(height, window), min(width, window)
    return [(top, left, box_h, box_w) for top in starts(height) for left in starts(width)]


def same_size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by size (in order of first appearance), at most ``batch_size`` per group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return [members[i : i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def per_image_generators(generator, count: int) -> list[torch.Generator] | None:
    """One generator per image: the list as given (its length checked), or the shared one repeated."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return [generator] * count
    generators = list(generator)
    if len(generators) != count:
        raise ValueError(f"got {len(generators)} generators for {count} images; pass one per image, or one")
    return generators


# ---------------------------------------------------------------------- inputs and outputs
def images_to_tensors(image) -> list[torch.Tensor]:
    """One or several images (see :func:`image_to_tensor`), as a list of ``(3, H, W)`` tensors.

    A 4-D array ``(B, H, W, C)`` or tensor ``(B, C, H, W)`` is a batch.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("no images given: pass an image or a non-empty list of images")
        return [image_to_tensor(item) for item in image]
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        if image.shape[0] == 0:
            raise ValueError("no images given: the image batch is empty")
        return [image_to_tensor(item) for item in image]
    return [image_to_tensor(image)]


def image_to_tensor(image) -> torch.Tensor:
    """An image as a ``float32`` ``(3, H, W)`` tensor in [0, 1].

    Reading rules:

    * PIL: "RGB" as is; "L"/"1" grey replicated to three channels; "P" through its palette;
      "I;16*" and "I" (how PIL opens 16-bit PNGs) are 16-bit: values divided by 65535 (clipped
      to [0, 65535] first); "F" must lie in [0, 1]; other modes (CMYK, YCbCr, ...) via
      ``convert("RGB")``.
    * numpy ``(H, W)`` or ``(H, W, C)``; torch ``(H, W)`` or ``(C, H, W)``; ``C`` in 1–4.
      ``uint8`` is divided by 255, ``uint16`` by 65535, ``bool`` is 0/1, floats must lie in [0, 1].
    * Two or four channels carry alpha, which is composited onto white.

    Raises:
        ValueError: an unsupported type, shape, dtype or range, or an empty image.
    """
    if isinstance(image, PIL.Image.Image):
        array = pil_to_array(image)
    elif isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3:
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy() if tensor.dtype != torch.bfloat16 else tensor.float().numpy()
    else:
        raise ValueError(f"images must be PIL images, numpy arrays or torch tensors, got {type(image).__name__}")

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        layout = "(C, H, W)" if isinstance(image, torch.Tensor) else "(H, W, C)"
        raise ValueError(f"an image must be (H, W) or {layout} with 1 to 4 channels, got shape {tuple(image.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty (height {array.shape[0]}, width {array.shape[1]})")
    values = torch.from_numpy(np.ascontiguousarray(array_to_unit(array))).permute(2, 0, 1)
    if values.shape[0] in (2, 4):  # alpha onto white
        alpha = values[-1:]
        values = values[:-1] * alpha + (1 - alpha)
    return values.expand(3, -1, -1).contiguous() if values.shape[0] == 1 else values


def pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """A PIL image as an array that :func:`array_to_unit` reads (``uint8``, ``uint16`` or float)."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if transparent else "RGB"))
    if mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (32-bit ints, as PIL opens 16-bit PNGs)
        return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"))


def array_to_unit(array: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` values as ``float32`` in [0, 1], by dtype (see :func:`image_to_tensor`)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ValueError(
                f"float images must hold values in [0, 1], got [{np.nanmin(values):.3g}, {np.nanmax(values):.3g}]; "
                "divide by 255 (8-bit) or 65535 (16-bit) first"
            )
        return values
    raise ValueError(f"unsupported image dtype {array.dtype}: use uint8, uint16, bool or float in [0, 1]")


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` resized to ``size`` (bilinear, antialiased when shrinking); unchanged if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def format_outputs(results: list[tuple[torch.Tensor, torch.Tensor]], output_type: str):
    """Per-image ``(label map, scores)`` as the ``output_type`` asks; stacked when all sizes agree."""
    channels = max(scores.shape[0] for _, scores in results)
    labels = [label.cpu() for label, _ in results]
    scores = [F.pad(s.cpu().float(), (0, 0, 0, 0, 0, channels - s.shape[0]), value=float("-inf")) for _, s in results]
    same_size = len({tuple(label.shape) for label in labels}) == 1
    if output_type == "pt":
        return (torch.stack(labels), torch.stack(scores)) if same_size else (labels, scores)
    scores = np.stack([s.numpy() for s in scores]) if same_size else [s.numpy() for s in scores]
    if output_type == "pil":
        if max(int(label.max()) for label in labels) > 255:
            raise ValueError("label ids above 255 do not fit mode-L PIL images: use output_type='np'")
        return [PIL.Image.fromarray(label.numpy().astype(np.uint8), mode="L") for label in labels], scores
    labels = [label.numpy().astype(np.int64) for label in labels]
    return (np.stack(labels) if same_size else labels), scores
