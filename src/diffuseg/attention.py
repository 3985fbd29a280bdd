"""Recording (and editing) the attention of a diffusers UNet, cheaply.

Three pieces, shared by every pipeline of the package:

* :class:`AttentionController`: decides which attention layers are computed with explicit
  probabilities and sees those probabilities (it may record them, or return replacements).
  It also tracks the UNet evaluation being run: index, latent size, batch.
* :class:`AttentionStore`: a controller that keeps *running sums* of cross-attention maps
  per class word and resolution (memory ``O(words × H × W)``, never one map per step) and,
  optionally, of self-attention at one resolution. Only the conditional half of a
  classifier-free-guidance batch is kept.
* :func:`attention_control`: installs the controller on a UNet for the duration of a
  ``with`` block. Every layer the controller does not want keeps running the model's own
  processor (SDPA); the original processors come back on exit, also after an error.

On top sits the daam-style one-liner :func:`capture` for any Stable Diffusion pipeline::

    with diffuseg.capture(pipe, words=["dog"]) as maps:
        pipe("a photo of a dog on the grass")
    maps["dog"]            # (images, H, W) heat map at image size
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from diffuseg.tokens import token_weights as make_token_weights

Size = tuple[int, int]

# Explicit probabilities of one query-row slice may always hold this many elements (1 MiB in
# float32), however small the layer's activations: see ExplicitAttnProcessor.
MIN_SLICE_ELEMENTS = 2**18


class AttentionController:
    """Base class: which layers to compute explicitly, and what to do with their probabilities.

    Subclasses override :meth:`wants` and :meth:`__call__`. The state below is kept up to
    date by :func:`attention_control` through a forward pre-hook on the UNet.

    Attributes:
        step: index of the current UNet evaluation (-1 before the first).
        latent_size: ``(h, w)`` of the latent the UNet is evaluating.
        batch_size: batch of that UNet evaluation (twice the images under guidance).
    """

    def __init__(self) -> None:
        self.step = -1
        self.latent_size: Size | None = None
        self.batch_size = 0

    def begin_unet_call(self, sample: torch.Tensor) -> None:
        self.step += 1
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.batch_size = int(sample.shape[0])

    def map_size(self, tokens: int) -> Size | None:
        """``(h, w)`` of a layer with ``tokens`` query positions, from the latent's size."""
        if self.latent_size is None:
            return None
        return _map_size(self.latent_size, tokens)

    def wants(self, kind: str, size: Size) -> bool:
        """Whether the ``kind`` ("cross" or "self") layer at ``size`` is computed explicitly."""
        return False

    def __call__(self, kind: str, size: Size, probs: torch.Tensor, queries: slice) -> torch.Tensor | None:
        """See the probabilities of query rows ``queries``; return replacements or None.

        ``probs`` has shape ``(batch, heads, rows, keys)``. A layer's probabilities come in
        consecutive slices of query rows (see :class:`ExplicitAttnProcessor`): the first has
        ``queries.start == 0`` and together they cover every query position once.
        """
        return None


@functools.lru_cache(maxsize=256)
def _map_size(latent_size: Size, tokens: int) -> Size | None:
    height, width = latent_size
    # Each UNet level halves the map, rounding up (diffusers pads odd sizes).
    for level in range(8):
        h, w = math.ceil(height / 2**level), math.ceil(width / 2**level)
        if h * w == tokens:
            return h, w
    return None


class ExplicitAttnProcessor:
    """Computes a layer's attention with explicit probabilities when its controller wants it.

    Otherwise the layer's original processor runs unchanged, so unrecorded layers cost
    what they cost before (explicit self-attention at high resolution is several times
    slower than SDPA on CPU).

    Explicit probabilities are computed a slice of query rows at a time, each slice no larger
    than the layer's input activations: SDPA never materialises them, and a whole map
    (batch × heads × 4096 queries × 77 tokens at SD's finest level) is several times the
    activations of the layer, the cost that dominated recording's peak memory.
    """

    def __init__(self, controller: AttentionController, original) -> None:
        self.controller = controller
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        kind = "self" if encoder_hidden_states is None else "cross"
        if hidden_states.ndim == 4:
            size = tuple(hidden_states.shape[-2:])
        else:
            size = self.controller.map_size(hidden_states.shape[1])
        if size is None or not self.controller.wants(kind, size):
            if temb is not None:
                kwargs["temb"] = temb
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        queries, keys = query.shape[2], key.shape[2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        # At small maps a slice may take MIN_SLICE_ELEMENTS anyway: each slice costs a dozen op
        # dispatches, which dominate a layer of a few hundred positions.
        rows = max(1, max(hidden_states.numel(), MIN_SLICE_ELEMENTS) // (batch * attn.heads * keys))
        out = value.new_empty(batch, attn.heads, queries, head_dim)
        for start in range(0, queries, rows):
            chunk = slice(start, min(start + rows, queries))
            scores = torch.matmul(query[:, :, chunk], key.transpose(-1, -2)).mul_(attn.scale)
            if attention_mask is not None:
                scores += attention_mask[:, :, chunk] if attention_mask.shape[2] > 1 else attention_mask
            # Softmax in float32: half-precision probabilities lose the small values maps are made of.
            scores = scores.float()
            # In place where the slice is large (no second buffer of its size); one op where it is small.
            probs = _softmax_(scores) if scores.numel() > MIN_SLICE_ELEMENTS else scores.softmax(dim=-1)
            replaced = self.controller(kind, size, probs, chunk)
            if replaced is not None:
                probs = replaced
            out[:, :, chunk] = torch.matmul(probs.to(value.dtype), value)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place: no second buffer of the probabilities' size."""
    scores -= scores.amax(dim=-1, keepdim=True)
    scores.exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


@contextmanager
def attention_control(unet: torch.nn.Module, controller: AttentionController) -> Iterator[AttentionController]:
    """Install ``controller`` on every attention layer of ``unet`` inside the ``with`` block."""
    # Direct processor swaps on the attention modules: ``unet.attn_processors`` and
    # ``set_attn_processor`` rebuild name dicts by recursion, milliseconds per call on SD's UNet.
    # The method is looked up on the class: ``hasattr`` on a module goes through nn.Module's
    # ``__getattr__`` and a raised AttributeError for each of the UNet's ~1,000 modules.
    layers = [module for module in unet.modules() if hasattr(type(module), "set_processor")]
    originals = [layer.processor for layer in layers]
    for layer, original in zip(layers, originals):
        layer.set_processor(ExplicitAttnProcessor(controller, original))

    def on_unet_call(module, args, kwargs):
        controller.begin_unet_call(args[0] if args else kwargs["sample"])

    handle = unet.register_forward_pre_hook(on_unet_call, with_kwargs=True)
    try:
        yield controller
    finally:
        handle.remove()
        for layer, original in zip(layers, originals):
            layer.set_processor(original)


class AttentionStore(AttentionController):
    """Running means of cross-attention per class word and resolution, and optionally of self-attention.

    Args:
        token_weights: ``(images, tokens, words)`` weights from :func:`diffuseg.tokens.token_weights`;
            may be set later, before the UNet runs.
        resolutions: heights of the cross-attention maps to record (e.g. ``(16, 32, 64)`` for
            SD at 512²); ``None`` records every resolution.
        steps: ``(start, stop)`` UNet evaluations to record; ``None`` records all.
        self_attention_resolution: height of the one self-attention resolution to record
            (for refinement); ``None`` records none.
    """

    def __init__(
        self,
        token_weights: torch.Tensor | None = None,
        resolutions: Iterable[int] | None = None,
        steps: tuple[int, int] | None = None,
        self_attention_resolution: int | None = None,
    ) -> None:
        super().__init__()
        self.token_weights = token_weights
        self.resolutions = None if resolutions is None else frozenset(int(r) for r in resolutions)
        self.steps = steps
        self.self_attention_resolution = self_attention_resolution
        self.cross_sums: dict[Size, torch.Tensor] = {}
        self.cross_counts: dict[Size, int] = {}
        self.self_sum: torch.Tensor | None = None
        self.self_count = 0
        self.self_size: Size | None = None

    @property
    def num_images(self) -> int:
        if self.token_weights is None:
            raise RuntimeError("AttentionStore.token_weights must be set before the UNet runs")
        return self.token_weights.shape[0]

    def wants(self, kind: str, size: Size) -> bool:
        if self.steps is not None and not self.steps[0] <= self.step < self.steps[1]:
            return False
        if kind == "cross":
            return self.token_weights is not None and (self.resolutions is None or size[0] in self.resolutions)
        return size[0] == self.self_attention_resolution

    def conditional(self, probs: torch.Tensor) -> torch.Tensor:
        """The part of a UNet batch that belongs to the conditional (text) branch."""
        images = self.num_images
        if probs.shape[0] == 2 * images:  # classifier-free guidance: [unconditional, conditional]
            return probs[images:]
        if probs.shape[0] == images:
            return probs
        raise ValueError(
            f"the UNet batch ({probs.shape[0]}) matches neither the {images} images the class words were given "
            f"for nor twice that (classifier-free guidance)"
        )

    def __call__(self, kind: str, size: Size, probs: torch.Tensor, queries: slice) -> None:
        probs = self.conditional(probs).mean(dim=1)  # average over heads: (images, rows, keys)
        first_slice = queries.start == 0  # a layer's first slice counts the layer once
        if kind == "cross":
            weights = self.token_weights
            if weights.shape[1] != probs.shape[-1]:
                raise ValueError(
                    f"the text embeddings have {probs.shape[-1]} tokens but the class words were looked up in "
                    f"{weights.shape[1]}; pass the prompt as text, not as prompt_embeds of another length"
                )
            words = torch.bmm(probs, weights.to(probs)).transpose(1, 2)  # (images, words, rows)
            if size not in self.cross_sums:
                self.cross_sums[size] = words.new_zeros(*words.shape[:2], size[0] * size[1])
                self.cross_counts[size] = 0
            self.cross_sums[size][..., queries] += words
            self.cross_counts[size] += first_slice
        else:
            if self.self_sum is None:
                self.self_sum = probs.new_zeros(probs.shape[0], probs.shape[-1], probs.shape[-1])
                self.self_size = size
            self.self_sum[:, queries] += probs
            self.self_count += first_slice
        return None

    def cross_attention(self) -> dict[Size, torch.Tensor]:
        """Mean cross-attention per recorded resolution: ``{(h, w): (images, words, h, w)}``."""
        return {
            size: (total / self.cross_counts[size]).reshape(total.shape[0], total.shape[1], *size)
            for size, total in sorted(self.cross_sums.items(), reverse=True)
        }

    def self_attention(self) -> torch.Tensor | None:
        """Mean self-attention ``(images, h·w, h·w)`` at :attr:`self_size`, or None if none was recorded."""
        return None if self.self_sum is None else self.self_sum / self.self_count

    def refine(self, maps: torch.Tensor, iterations: int = 1) -> torch.Tensor:
        """``maps`` propagated along the recorded self-attention (see :func:`diffuseg.masks.refine_with_self_attention`).

        Raises:
            ValueError: no self-attention was recorded (the UNet has none at the requested height).
        """
        from diffuseg.masks import refine_with_self_attention

        affinity = self.self_attention()
        if affinity is None:
            raise ValueError(
                f"refine=True needs self-attention at height {self.self_attention_resolution}, "
                "and this UNet has none there; use refine=False"
            )
        return refine_with_self_attention(maps, affinity, self.self_size, iterations)


class AttentionMaps:
    """What :func:`capture` recorded, read after the pipeline call."""

    def __init__(self, store: AttentionStore, words: Sequence[str] | None, vae_scale_factor: int) -> None:
        self.store = store
        self.words = words
        self.vae_scale_factor = vae_scale_factor

    @property
    def image_size(self) -> Size:
        if self.store.latent_size is None:
            raise RuntimeError("nothing was recorded: run the pipeline inside the `with capture(...)` block")
        h, w = self.store.latent_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def per_resolution(self) -> dict[Size, torch.Tensor]:
        """Mean maps per resolution, ``{(h, w): (images, words, h, w)}``, finest first."""
        return self.store.cross_attention()

    def aggregate(self, size: Size | None = None) -> torch.Tensor:
        """DiffuMask's aggregation, ``(images, words, H, W)``: each resolution upsampled, max-normalised, averaged."""
        from diffuseg.masks import aggregate_resolutions

        maps = self.per_resolution()
        if not maps:
            raise RuntimeError("no cross-attention was recorded: check `resolutions` and `steps`")
        return aggregate_resolutions(list(maps.values()), size or self.image_size)

    def __getitem__(self, word: str) -> torch.Tensor:
        """The aggregated ``(images, H, W)`` map of ``word``."""
        if self.words is None:
            raise KeyError("words differ per prompt: index aggregate() by position instead")
        lowered = [w.lower() for w in self.words]
        if word.lower() not in lowered:
            raise KeyError(f"{word!r} was not captured; captured words: {list(self.words)}")
        return self.aggregate()[:, lowered.index(word.lower())]


@contextmanager
def capture(
    pipe,
    words: Sequence[str] | Sequence[Sequence[str]],
    *,
    resolutions: Iterable[int] | None = None,
    steps: tuple[int, int] | None = None,
    self_attention_resolution: int | None = None,
) -> Iterator[AttentionMaps]:
    """Record the cross-attention of ``words`` while ``pipe`` (any Stable Diffusion pipeline) runs.

    Args:
        pipe: a pipeline with ``unet``, ``tokenizer`` and an ``encode_prompt(prompt, device,
            num_images_per_prompt, ...)`` method, as diffusers' SD pipelines have.
        words: class words, the same for every prompt, or one list per prompt.
        resolutions, steps, self_attention_resolution: see :class:`AttentionStore`.

    Yields:
        :class:`AttentionMaps`, filled once the pipeline call inside the block returns.
    """
    store = AttentionStore(resolutions=resolutions, steps=steps, self_attention_resolution=self_attention_resolution)
    shared_words = list(words) if words and all(isinstance(w, str) for w in words) else None
    if not words:
        raise ValueError("class_names is empty: give at least one class word")
    original_encode = pipe.encode_prompt
    signature = inspect.signature(original_encode)

    @functools.wraps(original_encode)
    def encode_prompt(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        prompt = bound.arguments.get("prompt")
        if prompt is None:
            raise ValueError("attention capture needs the prompt as text to find class words, not prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = [shared_words] * len(prompts) if shared_words is not None else [list(w) for w in words]
        store.token_weights = make_token_weights(
            pipe.tokenizer, prompts, per_prompt, bound.arguments.get("num_images_per_prompt", 1)
        )
        return original_encode(*args, **kwargs)

    pipe.encode_prompt = encode_prompt  # instance attribute shadows the method; deleted on exit
    try:
        with attention_control(pipe.unet, store):
            yield AttentionMaps(store, shared_words, pipe.vae_scale_factor)
    finally:
        del pipe.encode_prompt
