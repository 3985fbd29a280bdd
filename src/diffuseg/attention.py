"""Recording (and editing) the attention of a diffusers denoiser (UNet or MM-DiT), cheaply.

Three pieces, shared by every pipeline of the package:

* :class:`AttentionController`: decides which attention layers are computed with explicit
  probabilities and sees those probabilities (it may record them, or return replacements).
  It also tracks the denoiser evaluation being run: index, map grid, batch.
* :class:`AttentionStore`: a controller that keeps *running sums* of cross-attention maps
  per class word and resolution (memory ``O(words × H × W)``, never one map per step) and,
  optionally, of self-attention at one resolution. Only the conditional half of a
  classifier-free-guidance batch is kept.
* :func:`attention_control`: installs the controller on a denoiser for the duration of a
  ``with`` block, through the family's backend (:mod:`diffuseg.backends`: how a UNet's and
  an MM-DiT's attention are read). Every layer the controller does not want keeps running
  the model's own processor (SDPA); the original processors come back on exit, also after
  an error.

On top sits the daam-style one-liner :func:`capture` for any SD 1.x/2.x, SDXL, SD3 or FLUX
pipeline::

    with diffuseg.capture(pipe, words=["dog"]) as maps:
        pipe("a photo of a dog on the grass")
    maps["dog"]            # (images, H, W) heat map at image size
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch

from diffuseg.backends import backend_for, denoiser_of
from diffuseg.backends.unet import ExplicitAttnProcessor  # noqa: F401  (public name, kept importable here)
from diffuseg.tokens import sequence_token_weights

Size = tuple[int, int]
StepWindow = tuple[int, int]
MapSource = Literal["cross_attention", "concepts"]


def step_window(fractions: tuple[float, float], num_steps: int) -> StepWindow:
    """UNet evaluations ``[start, stop)`` spanning ``fractions`` of a schedule of ``num_steps``; never empty.

    ``num_steps`` must be the schedule the pipeline runs (``pipe.num_timesteps`` once it has set
    its timesteps: one UNet evaluation each), not the ``num_inference_steps`` asked for: custom
    ``timesteps`` or ``sigmas`` set their own length, and second-order samplers (Heun) evaluate
    the UNet about twice a step.
    """
    start = min(round(fractions[0] * num_steps), num_steps - 1)
    return start, max(start + 1, round(fractions[1] * num_steps))

class AttentionController:
    """Base class: which layers to compute explicitly, and what to do with their probabilities.

    Subclasses override :meth:`wants` and :meth:`__call__`. The state below is kept up to
    date by :func:`attention_control` through a forward pre-hook on the denoiser.

    Attributes:
        step: index of the current denoiser evaluation (-1 before the first).
        latent_size: ``(h, w)`` of the finest map grid: the UNet's latent, an MM-DiT's patch grid.
        batch_size: batch of that evaluation (twice the images under guidance).
        skipping: the current evaluation is not one to look at (FLUX's separate negative-prompt
            pass, SD3's skip-layer pass); :meth:`wants` of the stores says no to every layer.
    """

    def __init__(self) -> None:
        self.step = -1
        self.latent_size: Size | None = None
        self.batch_size = 0
        self.skipping = False

    def begin_unet_call(self, sample: torch.Tensor) -> None:
        self.begin_denoiser_call((int(sample.shape[-2]), int(sample.shape[-1])), int(sample.shape[0]))

    def begin_denoiser_call(
        self, grid: Size, batch: int, context: torch.Tensor | None = None, auxiliary: bool = False
    ) -> None:
        """A denoiser evaluation starts on a ``grid`` of positions; ``context`` is its text sequence.

        ``auxiliary`` evaluations (a second pass of the same step) do not advance :attr:`step`
        and are skipped.
        """
        self.skipping = auxiliary
        if not auxiliary:
            self.step += 1
        self.latent_size = (int(grid[0]), int(grid[1]))
        self.batch_size = int(batch)

    def map_size(self, tokens: int) -> Size | None:
        """``(h, w)`` of a layer with ``tokens`` query positions, from the latent's size."""
        if self.latent_size is None:
            return None
        return _map_size(self.latent_size, tokens)

    def wants(self, kind: str, size: Size) -> bool:
        """Whether the ``kind`` ("cross" or "self") layer at ``size`` is computed explicitly."""
        return False

    def readout_weights(self, size: Size) -> torch.Tensor | None:
        """``(images, text tokens, words)`` when all the controller needs of a cross layer at ``size``
        is ``probs @ weights`` (no edit, no full probabilities); None otherwise (the default).

        MM-DiT backends then compute the maps inside fused attention and hand them to
        :meth:`add_readout` instead of calling the controller with probabilities.
        """
        return None

    def add_readout(self, size: Size, maps: torch.Tensor) -> None:
        """``(batch, heads, image tokens, words)``: ``probs @ readout_weights(size)`` of one whole layer."""
        raise NotImplementedError

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


@contextmanager
def attention_control(
    denoiser: torch.nn.Module, controller: AttentionController, blocks: Iterable[int] | None = None
) -> Iterator[AttentionController]:
    """Install ``controller`` on the attention of ``denoiser`` (a UNet or an MM-DiT) inside the ``with`` block.

    ``blocks`` (MM-DiT only) picks the transformer blocks recorded, in the order of
    :func:`diffuseg.backends.mmdit.joint_attention_layers`; the others keep their processor.
    """
    with backend_for(denoiser).control(denoiser, controller, blocks):
        yield controller


class AttentionStore(AttentionController):
    """Running means of cross-attention per class word and resolution, and optionally of self-attention.

    Args:
        token_weights: ``(images, tokens, words)`` weights from :func:`diffuseg.tokens.token_weights`;
            may be set later, before the UNet runs.
        resolutions: heights of the cross-attention maps to record (e.g. ``(16, 32, 64)`` for
            SD at 512²); ``None`` records every resolution.
        steps: ``(start, stop)`` denoiser evaluations to record; ``None`` records all. A function
            returning them is called at the first evaluation, when the pipeline has set its
            schedule, e.g. ``lambda: step_window((0.5, 1.0), pipe.num_timesteps)``.
        self_attention_resolution: height of the one self-attention resolution to record
            (for refinement); ``None`` records none.

    Attributes:
        negative_contexts: text sequences of negative prompts; a denoiser evaluation on one of
            them (FLUX's true classifier-free guidance runs it separately) is not recorded.
    """

    def __init__(
        self,
        token_weights: torch.Tensor | None = None,
        resolutions: Iterable[int] | None = None,
        steps: StepWindow | Callable[[], StepWindow] | None = None,
        self_attention_resolution: int | None = None,
    ) -> None:
        super().__init__()
        self.token_weights = token_weights
        self.negative_contexts: list[torch.Tensor] = []
        # False when the word maps come from elsewhere (concept attention): the token weights
        # still say how many images there are.
        self.record_cross = True
        self.resolutions = None if resolutions is None else frozenset(int(r) for r in resolutions)
        self.steps = steps
        self.self_attention_resolution = self_attention_resolution
        self.cross_sums: dict[Size, torch.Tensor] = {}
        self.cross_counts: dict[Size, int] = {}
        self.self_sum: torch.Tensor | None = None
        self.self_count = 0
        self.self_size: Size | None = None
        self.cross_heights: set[int] = set()  # heights of every cross-attention layer the UNet has

    def begin_unet_call(self, sample: torch.Tensor) -> None:
        if self.step == 0:  # the first UNet evaluation has visited every layer once
            self.check_resolutions()
        super().begin_unet_call(sample)

    def check_resolutions(self) -> None:
        """Raise ``ValueError`` when a requested resolution is not one the UNet has (after its first call)."""
        missing = sorted(self.resolutions - self.cross_heights) if self.resolutions and self.cross_heights else []
        if missing:
            raise ValueError(
                f"resolutions {missing} are not cross-attention map heights of this model at this image size; "
                f"it has {sorted(self.cross_heights)} (e.g. 16, 32, 64 for SD at 512², 16 and 8 for the embedded "
                "ShapesWorld model at 64 px): pass some of those, or None for all"
            )

    @property
    def num_images(self) -> int:
        if self.token_weights is None:
            raise RuntimeError("AttentionStore.token_weights must be set before the UNet runs")
        return self.token_weights.shape[0]

    def begin_denoiser_call(
        self, grid: Size, batch: int, context: torch.Tensor | None = None, auxiliary: bool = False
    ) -> None:
        negative = context is not None and any(context is c for c in self.negative_contexts)
        super().begin_denoiser_call(grid, batch, context, auxiliary or negative)
        if callable(self.steps) and not self.skipping:
            self.steps = self.steps()

    def recording_step(self) -> bool:
        """Whether the current denoiser evaluation is one to record."""
        return not self.skipping and (self.steps is None or self.steps[0] <= self.step < self.steps[1])

    def wants(self, kind: str, size: Size) -> bool:
        if kind == "cross" and self.step == 0:
            self.cross_heights.add(size[0])
        if not self.recording_step():
            return False
        if kind == "cross":
            return (
                self.record_cross
                and self.token_weights is not None
                and (self.resolutions is None or size[0] in self.resolutions)
            )
        return size[0] == self.self_attention_resolution

    def readout_weights(self, size: Size) -> torch.Tensor | None:
        # Subclasses that see or edit the probabilities themselves get them.
        return self.token_weights if type(self).__call__ is AttentionStore.__call__ else None

    def add_readout(self, size: Size, maps: torch.Tensor) -> None:
        self.add_word_maps(size, self.conditional(maps).mean(dim=1).transpose(1, 2))

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
            self.add_word_maps(size, torch.bmm(probs, weights.to(probs)).transpose(1, 2), queries)
        else:
            if self.self_sum is None:
                self.self_sum = probs.new_zeros(probs.shape[0], probs.shape[-1], probs.shape[-1])
                self.self_size = size
            self.self_sum[:, queries] += probs
            self.self_count += first_slice
        return None

    def add_word_maps(self, size: Size, words: torch.Tensor, queries: slice | None = None) -> None:
        """Add ``(images, words, rows)`` maps of query rows ``queries`` (default: all) of one layer at ``size``."""
        queries = queries or slice(0, size[0] * size[1])
        if size not in self.cross_sums:
            self.cross_sums[size] = words.new_zeros(*words.shape[:2], size[0] * size[1])
            self.cross_counts[size] = 0
        self.cross_sums[size][..., queries] += words
        self.cross_counts[size] += queries.start == 0  # a layer's first slice counts the layer once

    def cross_attention(self) -> dict[Size, torch.Tensor]:
        """Mean cross-attention per recorded resolution: ``{(h, w): (images, words, h, w)}``."""
        self.check_resolutions()  # a single-step run never started a second UNet evaluation
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

    def __init__(self, store: AttentionStore, words: Sequence[str] | None, pixels_per_position: int) -> None:
        self.store = store
        self.words = words
        self.pixels_per_position = pixels_per_position

    @property
    def image_size(self) -> Size:
        if self.store.latent_size is None:
            raise RuntimeError("nothing was recorded: run the pipeline inside the `with capture(...)` block")
        h, w = self.store.latent_size
        return h * self.pixels_per_position, w * self.pixels_per_position

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
    steps: StepWindow | Callable[[], StepWindow] | None = None,
    self_attention_resolution: int | None = None,
    blocks: Iterable[int] | None = None,
    maps_from: MapSource = "cross_attention",
    other_concepts: Sequence[str] = (),
) -> Iterator[AttentionMaps]:
    """Record the attention of ``words`` to the image while ``pipe`` runs.

    Works on SD 1.x/2.x and SDXL (UNet cross-attention) and on SD3/3.5 and FLUX.1 (the
    image → text part of the joint attention); see :mod:`diffuseg.backends` for how each
    family is read. Under classifier-free guidance only the conditional branch is kept;
    FLUX's true-CFG negative pass (a separate call) is not recorded.

    Which tokens a word is: its positions in every tokenizer that feeds the denoiser's text
    sequence (SD 1.x/2.x/SDXL: CLIP; SD3: CLIP then T5; FLUX: T5), averaged within each
    tokenizer, the tokenizers then averaged with equal weight
    (:func:`diffuseg.tokens.sequence_token_weights`). A word seen by no tokenizer (absent, or
    past every limit) raises :class:`~diffuseg.tokens.ClassWordNotFoundError`.

    Args:
        pipe: a diffusers SD, SDXL, SD3 or FLUX pipeline (or a subclass), called with the prompt as text.
        words: class words, the same for every prompt, or one list per prompt.
        resolutions, steps, self_attention_resolution: see :class:`AttentionStore`.
        blocks: MM-DiT only: the transformer blocks recorded (default all), see :func:`attention_control`.
        maps_from: ``"cross_attention"`` (default): the word tokens' share of the image's
            attention; ``"concepts"`` (MM-DiT only): ConceptAttention's maps, each word encoded
            alone as a concept token (:class:`diffuseg.backends.mmdit.ConceptStream`); the
            image is the same either way.
        other_concepts: with ``maps_from="concepts"``, more concepts that compete in the softmax
            but get no map (e.g. ``["background", "sky"]``): with a single class word the softmax
            over concepts is 1 everywhere, so name what else the image may show.

    Yields:
        :class:`AttentionMaps`, filled once the pipeline call inside the block returns.
    """
    denoiser = denoiser_of(pipe)
    backend = backend_for(denoiser)
    if maps_from not in ("cross_attention", "concepts"):
        raise ValueError(f"maps_from must be 'cross_attention' or 'concepts', got {maps_from!r}")
    if other_concepts and maps_from != "concepts":
        raise ValueError("other_concepts only applies to maps_from='concepts'")
    if maps_from == "concepts" and not hasattr(backend, "ConceptStream"):
        raise ValueError(
            "maps_from='concepts' needs an MM-DiT (SD3/3.5, FLUX.1); this pipeline's denoiser is "
            f"a {type(denoiser).__name__}: use maps_from='cross_attention'"
        )
    store = AttentionStore(
        resolutions=resolutions,
        steps=steps,
        self_attention_resolution=self_attention_resolution,
    )
    shared_words = list(words) if words and all(isinstance(w, str) for w in words) else None
    if not words:
        raise ValueError("class_names is empty: give at least one class word")
    concepts = None
    if maps_from == "concepts":
        concepts = store.concepts = backend.ConceptStream(denoiser, store, blocks)
        store.record_cross = False
    original_encode = pipe.encode_prompt
    signature = inspect.signature(original_encode)

    def concept_embeddings(per_prompt: list[list[str]], copies: int, arguments: dict) -> None:
        """Each distinct word encoded alone, its tokens averaged as for the maps: one concept token per word."""
        class_words = [w for prompt_words in per_prompt for w in prompt_words]
        # A class word named again as another concept would split its own pixels with itself.
        others_here = [w for w in other_concepts if w.lower() not in {c.lower() for c in class_words}]
        distinct = list(dict.fromkeys([*class_words, *others_here]))
        call = {"prompt": distinct, "num_images_per_prompt": 1}
        for name, value in (("prompt_2", None), ("prompt_3", None), ("do_classifier_free_guidance", False)):
            if name in signature.parameters:
                call[name] = value
        for name in ("device", "max_sequence_length"):
            if arguments.get(name) is not None:
                call[name] = arguments[name]
        embeds = original_encode(**call)[0]
        alone = sequence_token_weights(backend.text_segments(pipe, distinct, call), [[w] for w in distinct])
        vectors = torch.einsum("wt,wtd->wd", alone[..., 0].to(embeds), embeds)
        # Columns: the image's words (padded to the longest list), then the other concepts.
        words_width = max(len(prompt_words) for prompt_words in per_prompt)
        others = [distinct.index(w) for w in others_here]
        rows = [[distinct.index(w) for w in prompt_words] for prompt_words in per_prompt for _ in range(copies)]
        table = vectors.new_zeros(len(rows), words_width + len(others), vectors.shape[-1])
        valid = torch.zeros(len(rows), words_width + len(others), dtype=torch.bool)
        for i, row in enumerate(rows):
            table[i, : len(row)], table[i, words_width:] = vectors[row], vectors[others]
            valid[i, : len(row)] = valid[i, words_width:] = True
        concepts.set_concepts(table, valid, words_width)
    # FLUX encodes the negative prompt in a second call before the denoiser runs: the first
    # encode after a denoiser call (or the start) is the prompt's, the next ones are negative.
    encoded = {"since_denoiser_call": False}

    @functools.wraps(original_encode)
    def encode_prompt(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if encoded["since_denoiser_call"]:
            result = original_encode(*args, **kwargs)
            store.negative_contexts.append(result[0])
            return result
        prompt = bound.arguments.get("prompt")
        if prompt is None:
            raise ValueError("attention capture needs the prompt as text to find class words, not prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        per_prompt = [shared_words] * len(prompts) if shared_words is not None else [list(w) for w in words]
        segments = backend.text_segments(pipe, prompts, bound.arguments)
        copies = bound.arguments.get("num_images_per_prompt") or 1
        store.token_weights = sequence_token_weights(segments, per_prompt, copies)
        if concepts is not None:
            concept_embeddings(per_prompt, copies, bound.arguments)
        encoded["since_denoiser_call"] = True
        return original_encode(*args, **kwargs)

    def on_denoiser_call(module, args):
        encoded["since_denoiser_call"] = False

    pipe.encode_prompt = encode_prompt  # instance attribute shadows the method; deleted on exit
    handle = denoiser.register_forward_pre_hook(on_denoiser_call)
    try:
        with attention_control(denoiser, store, blocks), concepts.attached() if concepts else nullcontext():
            yield AttentionMaps(store, shared_words, backend.pixels_per_position(pipe))
    finally:
        handle.remove()
        del pipe.encode_prompt
