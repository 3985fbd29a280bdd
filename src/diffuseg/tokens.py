"""Which prompt tokens belong to a class word.

Matching works on characters, then maps to tokens through the tokenizer's offsets, so it
agrees with how the prompt is really tokenized: case-insensitive, whole words only
("cat" does not match "cats"), multi-word names ("traffic light") and words split into
several tokens included. Every occurrence of a repeated word counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch


class ClassWordNotFoundError(ValueError):
    """A class word does not occur in its prompt (or only after the tokenizer's limit)."""


def find_word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of ``word`` in ``prompt``: case-insensitive, whole-word matches."""
    word = word.strip()
    if not word:
        raise ValueError("class words must be non-empty strings")
    # Inner white space may differ ("traffic  light"); word boundaries are letters/digits.
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(part) for part in word.split()) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def word_token_positions(tokenizer, prompt: str, word: str, max_length: int | None = None) -> list[int]:
    """Positions in the encoded prompt (index 0 is the BOS token) of every token of every occurrence of ``word``.

    Prompts longer than ``max_length`` (default: ``tokenizer.model_max_length``) are
    truncated by Stable Diffusion pipelines; tokens past the cut are dropped here too.

    Raises:
        ClassWordNotFoundError: ``word`` is not in ``prompt``, or only after the cut.
    """
    max_length = max_length or tokenizer.model_max_length
    spans = find_word_spans(prompt, word)
    if not spans:
        raise ClassWordNotFoundError(
            f"class word {word!r} does not appear in the prompt {prompt!r} "
            "(matching is whole-word and case-insensitive: write the word as it appears in the prompt)"
        )
    encoding = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False, verbose=False)
    positions = [
        index
        for index, (start, end) in enumerate(encoding["offset_mapping"])
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
    ]
    # The last slot of a truncated prompt holds the end-of-text token.
    kept = [p for p in positions if p < max_length - 1]
    if not kept:
        raise ClassWordNotFoundError(
            f"class word {word!r} appears only after the text encoder's {max_length}-token limit in the prompt "
            f"{prompt!r}; the model never sees it. Shorten the prompt or move the word forward."
        )
    return kept


def token_weights(
    tokenizer,
    prompts: Sequence[str],
    words: Sequence[Sequence[str]],
    num_images_per_prompt: int = 1,
    max_length: int | None = None,
) -> torch.Tensor:
    """Weights that turn per-token attention into per-word attention.

    Returns a tensor ``W`` of shape ``(len(prompts) * num_images_per_prompt, max_length, C)``
    with ``C = max(len(w) for w in words)``: ``W[b, t, c] = 1 / n`` when token ``t`` is one
    of the ``n`` tokens of word ``c`` of image ``b``'s prompt, so ``attention @ W`` averages
    a word's tokens. Images follow the order of diffusers pipelines (each prompt's images
    consecutive). Columns past a prompt's own word count stay zero.
    """
    if len(prompts) != len(words):
        raise ValueError(f"got {len(prompts)} prompts but {len(words)} lists of class words; give one list per prompt")
    max_length = max_length or tokenizer.model_max_length
    num_words = max((len(w) for w in words), default=0)
    if num_words == 0:
        raise ValueError("class_names is empty: give at least one class word per prompt")
    weights = torch.zeros(len(prompts), max_length, num_words)
    for b, (prompt, prompt_words) in enumerate(zip(prompts, words)):
        if len(prompt_words) == 0:
            raise ValueError(f"no class words given for the prompt {prompt!r}")
        lowered = [w.strip().lower() for w in prompt_words]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"duplicate class words {list(prompt_words)} for the prompt {prompt!r}")
        for c, word in enumerate(prompt_words):
            positions = word_token_positions(tokenizer, prompt, word, max_length)
            weights[b, positions, c] = 1.0 / len(positions)
    return weights.repeat_interleave(num_images_per_prompt, dim=0)
