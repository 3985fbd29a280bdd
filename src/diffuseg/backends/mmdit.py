"""How an MM-DiT's attention is read (SD3 / SD3.5, FLUX.1).

An MM-DiT has no cross-attention layer: image and text tokens attend *jointly*, in one
softmax over the concatenated sequence. A class word's map is the image-query → text-key
part of that softmax (not renormalised: its share of each image token's attention),
averaged over heads, the blocks recorded and the steps, at the patch grid. The
image-query → image-key part is the self-attention used to refine maps.

The two families differ in where the text sits and how the sequence is formed:

* **SD3** (``SD3Transformer2DModel``, ``JointAttnProcessor2_0``): ``[image, text]``; the
  text is CLIP-L and CLIP-G hidden states (concatenated along channels, 77 positions) then
  ``max_sequence_length`` T5 positions (zeros when the T5 encoder is omitted). Image tokens
  are ``patch_size``² latent patches. SD3.5's second, image-only attention (``attn2``) and
  image-only blocks are left alone.
* **FLUX** (``FluxTransformer2DModel``, ``FluxAttnProcessor``): ``[text, image]``, text
  being T5 only (CLIP gives the pooled vector). Double-stream blocks project text and image
  with their own weights and attend jointly; single-stream blocks take the concatenated
  sequence (text first) with one set of weights. Image tokens are 2×2-packed latent patches
  whose grid comes from ``img_ids``; rotary embeddings are applied to queries and keys
  before the softmax, as the original processor does (text positions have id 0).

Only the blocks recorded are touched; every other block keeps its processor, and all come
back on exit. A recorded block computes the word maps *inside* fused attention when its
controller needs no more than ``probs @ token weights`` (an :class:`AttentionStore`): the
weights ride along as extra value channels, so no probability is materialised and the cost
is a few more channels (sequences of 4,096+ tokens make explicit attention expensive).
Controllers that see or edit probabilities, self-attention for refinement and concept maps
get explicit attention in slices of query rows, as for the UNet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffuseg.backends.common import processors_swapped, slice_rows, softmax_
from diffuseg.tokens import TextSegment

if TYPE_CHECKING:
    from diffuseg.attention import AttentionController


def is_flux(transformer: torch.nn.Module) -> bool:
    return type(transformer).__name__.startswith("Flux")


def joint_attention_layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules that see text, in order: FLUX's double-stream then single-stream blocks."""
    blocks = list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))
    return [block.attn for block in blocks]


class _CallState:
    """What the processors need to know about the current transformer call."""

    text_length = 0
    context: torch.Tensor | None = None


class JointExplicitAttnProcessor:
    """Joint attention with explicit probabilities for the image queries, when the controller wants them.

    The text queries' rows are not recorded: they run through one SDPA call. Image query rows
    run in slices whose probabilities (``batch × heads × rows × keys``) are no larger than the
    layer's input, exactly as :class:`~diffuseg.backends.unet.ExplicitAttnProcessor` does.
    A controller's replacement of the image → text part (and of the image → image affinity,
    scaled back to the image keys' share) is written back before the values are mixed, so
    controllers may edit MM-DiT attention as they edit UNet cross- and self-attention.
    """

    def __init__(self, controller: AttentionController, original, state: _CallState, flux: bool) -> None:
        self.controller = controller
        self.original = original
        self.state = state
        self.flux = flux

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        **kwargs,
    ):
        single_stream = encoder_hidden_states is None
        if single_stream and not self.flux:  # SD3.5's image-only attention: no text to read
            return self._original(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                image_rotary_emb,
                kwargs,
            )
        text_length = self.state.text_length if single_stream else encoder_hidden_states.shape[1]
        image_length = hidden_states.shape[1] - (text_length if single_stream else 0)
        size = self.controller.map_size(image_length)
        concepts = getattr(self.controller, "concepts", None)
        wants_cross = size is not None and self.controller.wants("cross", size)
        wants_self = size is not None and self.controller.wants("self", size)
        wants_concepts = concepts is not None and size is not None and not single_stream and concepts.wants(attn)
        if not (wants_cross or wants_self or wants_concepts):
            return self._original(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                image_rotary_emb,
                kwargs,
            )

        query, key, value = (self._flux_qkv if self.flux else self._sd3_qkv)(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        batch, heads, tokens, head_dim = query.shape
        # Where the text and image tokens sit in the joint sequence.
        text = slice(0, text_length) if self.flux else slice(image_length, tokens)
        image_start = text_length if self.flux else 0
        mask = _additive_mask(attention_mask, query.dtype)
        scale = head_dim**-0.5
        readout = None
        if wants_cross and not wants_self and not wants_concepts and mask is None:
            readout = self.controller.readout_weights(size)
        if readout is not None:
            out = self._attention_with_readout(query, key, value, readout, text, image_start, image_length, size)
            hidden = out.transpose(1, 2).flatten(2).to(query.dtype)
            return (self._flux_out if self.flux else self._sd3_out)(attn, hidden, encoder_hidden_states, image_length)

        out = value.new_empty(batch, heads, tokens, head_dim)
        out[:, :, text] = F.scaled_dot_product_attention(
            query[:, :, text],
            key,
            value,
            attn_mask=None if mask is None else _rows(mask, text),
        )
        rows = slice_rows(hidden_states.numel(), batch, heads * tokens)
        for start in range(0, image_length, rows):
            chunk = slice(start, min(start + rows, image_length))
            rows_in_sequence = slice(image_start + chunk.start, image_start + chunk.stop)
            scores = torch.matmul(query[:, :, rows_in_sequence], key.transpose(-1, -2)).mul_(scale)
            if mask is not None:
                scores += _rows(mask, rows_in_sequence)
            # Softmax in float32: half-precision probabilities lose the small values maps are made of.
            probs = softmax_(scores.float())
            if wants_cross:
                replaced = self.controller("cross", size, probs[..., text], chunk)
                if replaced is not None:
                    probs[..., text] = replaced
            if wants_self:
                image_keys = slice(image_start, image_start + image_length)
                # Renormalised over the image keys: an affinity whose rows sum to 1, as a UNet's self-attention.
                affinity = probs[..., image_keys]
                share = affinity.sum(dim=-1, keepdim=True)
                replaced = self.controller("self", size, affinity / share, chunk)
                if replaced is not None:  # an edited affinity keeps the image keys' share of the joint softmax
                    probs[..., image_keys] = replaced * share
            out[:, :, rows_in_sequence] = torch.matmul(probs.to(value.dtype), value)
        if wants_concepts:
            image_keys = slice(image_start, image_start + image_length)
            concepts.attend(
                attn,
                out[:, :, image_keys],
                key[:, :, image_keys],
                value[:, :, image_keys],
                size,
            )
        hidden = out.transpose(1, 2).flatten(2).to(query.dtype)
        return (self._flux_out if self.flux else self._sd3_out)(attn, hidden, encoder_hidden_states, image_length)

    def _attention_with_readout(self, query, key, value, weights, text, image_start, image_length, size):
        """Fused attention that also returns the word maps, without materialising any probability.

        The controller needs only ``probs[image rows, text keys] @ weights``. Appending the
        weights (zeros on image keys) to the values as ``words`` extra channels makes SDPA
        compute exactly that in the extra output channels; queries and keys get zero channels
        so the scores, and the scale, stay those of the head dim. The cost is ``words`` more
        value channels, not an explicit ``rows × keys`` softmax.
        """
        batch, heads, tokens, head_dim = query.shape
        images, text_tokens, words = weights.shape
        if text_tokens != text.stop - text.start:
            raise ValueError(
                f"the text sequence has {text.stop - text.start} tokens but the class words were looked up in "
                f"{text_tokens}; pass the prompt as text, not as prompt_embeds of another length"
            )
        if batch % images:
            raise ValueError(f"the transformer batch ({batch}) is not a multiple of the {images} images")
        # Extra channels rounded up to a multiple of 8: fused GPU kernels want head dims that are.
        channels = -(-words // 8) * 8
        extra = value.new_zeros(batch, 1, tokens, channels)
        extra[:, 0, text, :words] = weights.to(value).repeat(batch // images, 1, 1)
        pad = (0, channels)
        out = F.scaled_dot_product_attention(
            F.pad(query, pad),
            F.pad(key, pad),
            torch.cat([value, extra.expand(-1, heads, -1, -1)], dim=-1),
            scale=head_dim**-0.5,
        )
        image = slice(image_start, image_start + image_length)
        self.controller.add_readout(size, out[:, :, image, head_dim : head_dim + words].float())
        return out[..., :head_dim]

    def _original(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask,
        image_rotary_emb,
        kwargs,
    ):
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    # ---- FLUX: text first; double-stream blocks project text with added weights; rotary on both.

    @staticmethod
    def _flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text_value = text_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    @staticmethod
    def _flux_out(attn, hidden, encoder_hidden_states, image_length):
        if encoder_hidden_states is None:  # single-stream: the block projects attention and MLP together
            return hidden
        text, image = hidden.split_with_sizes([hidden.shape[1] - image_length, image_length], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())

    # ---- SD3: image first; text projected with added weights; no rotary.

    @staticmethod
    def _sd3_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        batch = hidden_states.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = heads(attn.add_q_proj(encoder_hidden_states))
        text_key = heads(attn.add_k_proj(encoder_hidden_states))
        text_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        return (
            torch.cat([query, text_query], dim=2),
            torch.cat([key, text_key], dim=2),
            torch.cat([value, text_value], dim=2),
        )

    @staticmethod
    def _sd3_out(attn, hidden, encoder_hidden_states, image_length):
        image, text = hidden[:, :image_length], hidden[:, image_length:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as scores to add, ``(batch or 1, heads or 1, queries or 1, keys)``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    while mask.ndim < 4:
        mask = mask.unsqueeze(1)
    return mask


def _rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    return mask[:, :, rows] if mask.shape[2] > 1 else mask


@contextmanager
def control(
    transformer: torch.nn.Module,
    controller: AttentionController,
    blocks: Iterable[int] | None = None,
) -> Iterator:
    """Install ``controller`` on the joint attention of ``blocks`` (default: all) inside the ``with`` block.

    ``blocks`` index :func:`joint_attention_layers` (FLUX: double-stream blocks first, then
    single-stream ones). The controller learns of each transformer call through
    ``begin_denoiser_call(grid, batch, context)``: the patch grid, the batch and the text
    hidden states (so a controller can tell FLUX's separate negative-prompt call apart).
    """
    flux = is_flux(transformer)
    layers = joint_attention_layers(transformer)
    chosen = range(len(layers)) if blocks is None else sorted({int(b) for b in blocks})
    if any(not 0 <= b < len(layers) for b in chosen):
        raise ValueError(
            f"blocks must lie in 0..{len(layers) - 1} (this transformer has {len(layers)}), got {list(blocks)}"
        )
    layers = [layers[b] for b in chosen]
    concepts = getattr(controller, "concepts", None)
    if concepts is not None:  # the concept stream runs through every double-stream block up to the last recorded
        layers += [layer for layer in concepts.layers if all(layer is not other for other in layers)]
    state = _CallState()
    patch = transformer.config.patch_size

    def on_transformer_call(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        state.text_length = 0 if context is None else context.shape[1]
        if flux:
            ids = kwargs["img_ids"]
            ids = ids[0] if ids.ndim == 3 else ids
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            grid = (hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch)
        # SD3's skip-layer guidance adds a third, partial pass per step: not a step of its own.
        extra = kwargs.get("skip_layers") is not None
        controller.begin_denoiser_call(grid, hidden_states.shape[0], context=context, auxiliary=extra)

    def processor_for(original):
        return JointExplicitAttnProcessor(controller, original, state, flux)

    with processors_swapped(transformer, layers, processor_for, on_transformer_call):
        yield controller


def text_segments(pipe, prompts: list[str], arguments: dict) -> list[TextSegment]:
    """The transformer's text sequence, stretch by stretch, for the prompts being encoded.

    SD3: 77 CLIP positions (CLIP-L's tokenizer; CLIP-G's shares its positions) then
    ``max_sequence_length`` T5 positions for ``prompt_3`` (default: the prompt); with no T5
    encoder that stretch is zeros and carries no words. FLUX: ``max_sequence_length`` T5
    positions for ``prompt_2`` (default: the prompt).
    """
    length = arguments.get("max_sequence_length")
    if is_flux(pipe.transformer):
        t5_prompts = _same_count(arguments.get("prompt_2"), prompts)
        return [TextSegment(pipe.tokenizer_2, length, t5_prompts, "T5")]
    t5_prompts = _same_count(arguments.get("prompt_3"), prompts)
    t5 = pipe.tokenizer_3 if getattr(pipe, "text_encoder_3", None) is not None else None
    return [
        TextSegment(pipe.tokenizer, pipe.tokenizer_max_length, prompts, "CLIP"),
        TextSegment(t5, length, t5_prompts, "T5"),
    ]


def _same_count(other: str | list[str] | None, prompts: list[str]) -> list[str]:
    if other is None:
        return prompts
    return [other] * len(prompts) if isinstance(other, str) else list(other)


def pixels_per_position(pipe) -> int:
    """Image pixels per patch-grid position along each side (SD3: VAE × patch; FLUX: VAE × 2 for the packing)."""
    if is_flux(pipe.transformer):
        return pipe.vae_scale_factor * 2 * pipe.transformer.config.patch_size
    return pipe.vae_scale_factor * pipe.transformer.config.patch_size


class ConceptStream:
    """Concept attention (Helbling et al., 2025, "ConceptAttention: Diffusion Transformers Learn
    Highly Interpretable Features"), written from the paper's description.

    Each class word, encoded alone, becomes one *concept token*. In every joint block up to the
    last one recorded, the concept tokens go through the block's text-side weights (adaptive
    norm with the step's conditioning, query/key/value projections, output projection,
    feed-forward and gates) and attend to themselves and to the image tokens, while neither the
    image nor the prompt's text attends to them: the image is generated exactly as without.
    At each recorded block a word's map is the softmax over concepts of
    ``image attention output · concept attention output`` (both before the output
    projection, in the attention's value space), per image token.

    FLUX's single-stream blocks have no separate text weights, so concept maps come from its
    double-stream blocks only.

    Args:
        transformer: an SD3 or FLUX transformer.
        store: the :class:`~diffuseg.attention.AttentionStore` the maps go to (its step window,
            its conditional-branch rule).
        blocks: indices of the blocks to record (see :func:`joint_attention_layers`), default all
            joint ones.
    """

    def __init__(self, transformer: torch.nn.Module, store, blocks: Iterable[int] | None = None) -> None:
        joint = list(transformer.transformer_blocks)
        chosen = range(len(joint)) if blocks is None else sorted({int(b) for b in blocks})
        recorded = [b for b in chosen if b < len(joint)]
        if not recorded:
            raise ValueError(
                f"concept maps come from the joint blocks 0..{len(joint) - 1} (FLUX: the double-stream ones); "
                f"blocks {list(chosen)} has none of them"
            )
        self.transformer = transformer
        self.store = store
        self.blocks = joint[: recorded[-1] + 1]
        self.layers = [block.attn for block in self.blocks]
        self.recorded = {id(joint[b].attn) for b in recorded}
        self.block_of = {id(block.attn): block for block in self.blocks}
        self.embeddings: torch.Tensor | None = None  # (images, concepts, joint_attention_dim)
        self.reported = 0
        self.valid: torch.Tensor | None = None  # (images, concepts): False for padding columns
        self.tokens: torch.Tensor | None = None  # the concept stream inside the current call
        self.temb: torch.Tensor | None = None

    def set_concepts(self, embeddings: torch.Tensor, valid: torch.Tensor, reported: int) -> None:
        """``(images, concepts, dim)`` concept embeddings, which are real (not padding), and how
        many leading ones get maps (the rest only compete in the softmax)."""
        self.embeddings, self.valid, self.reported = embeddings, valid, reported

    def wants(self, attn) -> bool:
        return self.embeddings is not None and id(attn) in self.block_of and self.store.recording_step()

    @contextmanager
    def attached(self) -> Iterator[ConceptStream]:
        """Hooks that start the stream at each transformer call and hand each block's conditioning to it."""

        def on_transformer_call(module, args, kwargs):
            if self.embeddings is not None:
                embedder = self.transformer.context_embedder
                self.tokens = embedder(self.embeddings.to(embedder.weight.device, embedder.weight.dtype))

        def on_block_call(module, args, kwargs):
            self.temb = kwargs["temb"] if "temb" in kwargs else args[2]

        handles = [self.transformer.register_forward_pre_hook(on_transformer_call, with_kwargs=True)]
        handles += [block.register_forward_pre_hook(on_block_call, with_kwargs=True) for block in self.blocks]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def attend(self, attn, image_out, image_key, image_value, size) -> None:
        """One block: the concepts attend to themselves and the image; maps recorded; the stream moves on.

        ``image_out``, ``image_key``, ``image_value``: ``(batch, heads, image tokens, head dim)``
        of the block's joint attention (keys after their norm and rotary embedding).
        """
        images = self.embeddings.shape[0]
        cond = slice(image_out.shape[0] - images, None)  # guided batches are [unconditional, conditional]
        block = self.block_of[id(attn)]
        temb = self.temb[cond]
        pre_only = getattr(block, "context_pre_only", False)
        if pre_only:  # the last SD3 block: its text output is not used any more
            normed = block.norm1_context(self.tokens, temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(self.tokens, emb=temb)

        def heads(x):
            return x.view(images, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.add_q_proj(normed)),
            heads(attn.add_k_proj(normed)),
            heads(attn.add_v_proj(normed)),
        )
        if attn.norm_added_q is not None:
            query = attn.norm_added_q(query)
        if attn.norm_added_k is not None:
            key = attn.norm_added_k(key)
        keys = torch.cat([key, image_key[cond]], dim=2)
        values = torch.cat([value, image_value[cond]], dim=2)
        scores = torch.matmul(query, keys.transpose(-1, -2)).float() * query.shape[-1] ** -0.5
        concepts = self.valid.shape[1]
        scores[..., :concepts].masked_fill_(~self.valid[:, None, None, :].to(scores.device), float("-inf"))
        concept_out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # (images, heads, concepts, dim)
        concept_out = concept_out.transpose(1, 2).flatten(2)
        if id(attn) in self.recorded:
            image_flat = image_out[cond].transpose(1, 2).flatten(2)  # (images, tokens, heads × dim)
            similarity = torch.bmm(
                image_flat.float(), concept_out.float().transpose(1, 2)
            )  # (images, tokens, concepts)
            similarity.masked_fill_(~self.valid[:, None, :].to(similarity.device), float("-inf"))
            maps = similarity.softmax(dim=-1)[..., : self.reported]
            self.store.add_word_maps(size, maps.transpose(1, 2))
        if not pre_only:
            tokens = self.tokens + gate_msa.unsqueeze(1) * attn.to_add_out(concept_out)
            normed = block.norm2_context(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            self.tokens = tokens + gate_mlp.unsqueeze(1) * block.ff_context(normed)
