"""How a UNet's attention is read (SD 1.x, SD 2.x, SDXL).

A UNet has separate cross-attention layers whose keys are the text tokens, so a layer's
probabilities *are* the word maps; self-attention layers give the image's affinities. The
layer's resolution follows from its number of query positions and the latent's size.
SDXL changes nothing here: its two CLIP encoders' hidden states are concatenated along
channels, so the 77 positions, and the words' positions in them, are those of one CLIP
tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from diffuseg.backends.common import processors_swapped, slice_rows, softmax_
from diffuseg.tokens import TextSegment

if TYPE_CHECKING:
    from diffuseg.attention import AttentionController


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

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs,
    ):
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
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(context),
            attn.to_v(context),
        )
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
        rows = slice_rows(hidden_states.numel(), batch, attn.heads * keys)
        out = value.new_empty(batch, attn.heads, queries, head_dim)
        for start in range(0, queries, rows):
            chunk = slice(start, min(start + rows, queries))
            scores = torch.matmul(query[:, :, chunk], key.transpose(-1, -2)).mul_(attn.scale)
            if attention_mask is not None:
                scores += attention_mask[:, :, chunk] if attention_mask.shape[2] > 1 else attention_mask
            # Softmax in float32: half-precision probabilities lose the small values maps are made of.
            probs = softmax_(scores.float())
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


@contextmanager
def control(
    unet: torch.nn.Module,
    controller: AttentionController,
    blocks: Iterable[int] | None = None,
) -> Iterator:
    """Install ``controller`` on every attention layer of ``unet`` inside the ``with`` block."""
    if blocks is not None:
        raise ValueError("a UNet's layers are chosen by `resolutions`, not `blocks` (blocks are for MM-DiT models)")
    # Direct processor swaps on the attention modules: ``unet.attn_processors`` and
    # ``set_attn_processor`` rebuild name dicts by recursion, milliseconds per call on SD's UNet.
    # The method is looked up on the class: ``hasattr`` on a module goes through nn.Module's
    # ``__getattr__`` and a raised AttributeError for each of the UNet's ~1,000 modules.
    layers = [module for module in unet.modules() if hasattr(type(module), "set_processor")]

    def on_unet_call(module, args, kwargs):
        controller.begin_unet_call(args[0] if args else kwargs["sample"])

    with processors_swapped(unet, layers, lambda original: ExplicitAttnProcessor(controller, original), on_unet_call):
        yield controller


def text_segments(pipe, prompts: list[str], arguments: dict) -> list[TextSegment]:
    """The UNet's text sequence: one CLIP stretch (SDXL: both encoders share its positions).

    SDXL's second encoder reads ``prompt_2`` (default: the prompt); the positions are those of
    the prompt in the first tokenizer, so give ``prompt_2`` the same words at the same places,
    or leave it out.
    """
    tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
    return [TextSegment(tokenizer, tokenizer.model_max_length, prompts, "CLIP")]


def pixels_per_position(pipe) -> int:
    """Image pixels per latent position along each side."""
    return pipe.vae_scale_factor
