"""Which prompt tokens belong to a class word.

Matching works on characters, then maps to tokens through the tokenizer's offsets, so it
agrees with how the prompt is really tokenized: case-insensitive, whole words only
("cat" does not match "cats"), multi-word names ("traffic light") and words split into
several tokens included. Every occurrence of a repeated word counts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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
    kept = _kept_positions(tokenizer, prompt, spans, max_length)
    if not kept:
        raise ClassWordNotFoundError(
            f"class word {word!r} appears only after the text encoder's {max_length}-token limit in the prompt "
            f"{prompt!r}; the model never sees it. Shorten the prompt or move the word forward."
        )
    return kept


def _kept_positions(tokenizer, prompt: str, spans: list[tuple[int, int]], max_length: int) -> list[int]:
    """Token positions overlapping ``spans`` that survive truncation to ``max_length``.

    Works for CLIP (a begin token at 0, the end token in the last slot) and T5 (no begin
    token; SentencePiece pieces carry a leading "▁" whose offsets start at the word, and a
    lone "▁" piece covers no character of the word, so it is not counted).
    """
    encoding = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False, verbose=False)
    positions = [
        index
        for index, (start, end) in enumerate(encoding["offset_mapping"])
        if end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
    ]
    # The last slot of a truncated prompt holds the end-of-text token (CLIP and T5 alike).
    return [p for p in positions if p < max_length - 1]


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


def _merged_spans(prompt: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of every occurrence of ``words``, overlapping ones merged, in order."""
    spans = []
    for word in words:
        found = find_word_spans(prompt, word)
        if not found:
            raise ClassWordNotFoundError(
                f"class word {word!r} does not appear in the prompt {prompt!r} "
                "(matching is whole-word and case-insensitive: write the word as it appears in the prompt)"
            )
        spans.extend(found)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:  # "red car" and "car": replace the text once
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _replace(prompt: str, words: Sequence[str], replacement: str) -> tuple[str, list[tuple[int, int, int, int]]]:
    """The new prompt and, per replaced span, ``(source_start, source_end, target_start, target_end)``."""
    if not words:
        raise ValueError("no class words to replace: give at least one")
    for word in words:
        if find_word_spans(replacement, word):
            raise ValueError(
                f"the replacement {replacement!r} contains the class word {word!r}, so the new prompt would still "
                "name it; choose a replacement without the class words (e.g. 'nothing' or 'empty ground')"
            )
    pieces, edits, cursor, length = [], [], 0, 0
    for start, end in _merged_spans(prompt, words):
        pieces.append(prompt[cursor:start])
        length += start - cursor
        pieces.append(replacement)
        edits.append((start, end, length, length + len(replacement)))
        length += len(replacement)
        cursor = end
    pieces.append(prompt[cursor:])
    return "".join(pieces), edits


def replace_words(prompt: str, words: Sequence[str], replacement: str) -> str:
    """``prompt`` with every occurrence of each of ``words`` replaced by ``replacement``.

    Occurrences are found as :func:`find_word_spans` finds them (whole words,
    case-insensitive); overlapping ones ("red car" and "car") are replaced once.

    Raises:
        ClassWordNotFoundError: a word is not in ``prompt``.
        ValueError: ``replacement`` itself contains one of ``words`` (the words would not be gone).
    """
    return _replace(prompt, words, replacement)[0]


def replacement_token_alignment(
    tokenizer, prompt: str, words: Sequence[str], replacement: str, max_length: int | None = None
) -> torch.Tensor:
    """Which token of the encoded ``prompt`` each token of the encoded :func:`replace_words` prompt stands for.

    Both prompts are encoded as the pipelines encode them (CLIP's begin token, truncation,
    padding to ``max_length``, default ``tokenizer.model_max_length``; T5's end token). Text
    outside the replaced words is the same in both, so its tokens are matched through
    character offsets, whatever the replacement does to token counts; the end tokens match,
    and padding matches padding counted from the end token.

    Returns:
        ``LongTensor (max_length,)``: entry ``j`` is the position in the encoded ``prompt`` of
        the new prompt's token ``j``, or -1 for tokens of the replacement and tokens with no
        counterpart (cut by truncation, or padding past the end).
    """
    max_length = max_length or tokenizer.model_max_length
    target, edits = _replace(prompt, words, replacement)

    def encode(text: str):
        return tokenizer(
            text,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_offsets_mapping=True,
            verbose=False,
        )

    source_encoding, target_encoding = encode(prompt), encode(target)
    source_length = sum(source_encoding["attention_mask"])
    target_length = sum(target_encoding["attention_mask"])
    source_positions = {
        (start, end): index
        for index, (start, end) in enumerate(source_encoding["offset_mapping"][: source_length - 1])
        if end > start
    }

    # CLIP begins with a start token; T5 (SentencePiece) has none and begins with the text.
    begin = int(tokenizer.bos_token_id is not None and source_encoding["input_ids"][0] == tokenizer.bos_token_id)
    alignment = torch.full((max_length,), -1, dtype=torch.long)
    alignment[:begin] = 0
    alignment[target_length - 1] = source_length - 1
    for j, (start, end) in enumerate(target_encoding["offset_mapping"][begin : target_length - 1], start=begin):
        if any(start < t_end and end > t_start for _, _, t_start, t_end in edits) or end <= start:
            continue  # a token of the replacement: no counterpart
        # Unchanged text sits shifted by how much longer the replaced words were than their replacements.
        shift = sum((s_end - s_start) - (t_end - t_start) for s_start, s_end, t_start, t_end in edits if t_end <= start)
        alignment[j] = source_positions.get((start + shift, end + shift), -1)
    padding = torch.arange(target_length, max_length) - target_length + source_length
    alignment[target_length:] = torch.where(padding < max_length, padding, torch.full_like(padding, -1))
    return alignment


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's stretch of a denoiser's text sequence.

    Attributes:
        tokenizer: the tokenizer whose ids fill the stretch, or None when the stretch is there
            but carries no words (SD3 without its T5 encoder feeds zeros in its place).
        length: number of positions (the tokenizer's ``max_length`` as the pipeline pads it).
        prompts: the text this tokenizer encodes, one per prompt (SD3's ``prompt_3``,
            FLUX's ``prompt_2``: the T5 prompt may differ from the CLIP one).
        name: what the error messages call it ("CLIP", "T5").
    """

    tokenizer: object | None
    length: int
    prompts: Sequence[str]
    name: str


def sequence_token_weights(
    segments: Sequence[TextSegment], words: Sequence[Sequence[str]], num_images_per_prompt: int = 1
) -> torch.Tensor:
    """:func:`token_weights` for a text sequence made of several tokenizers' stretches, end to end.

    A word's column averages its tokens within each stretch that sees it, then averages the
    stretches that see it with equal weight: CLIP and T5 each have one vote, however many
    pieces each splits the word into. A stretch that cut the word off (past its limit) or
    has no tokenizer does not vote.

    Returns:
        ``(len(prompts) * num_images_per_prompt, sum of lengths, C)``, images in diffusers' order.

    Raises:
        ClassWordNotFoundError: a word is in no stretch (not in the prompt, or past every limit).
    """
    if len(segments) == 1 and segments[0].tokenizer is not None:  # one tokenizer: its own lookup and messages
        only = segments[0]
        return token_weights(only.tokenizer, only.prompts, words, num_images_per_prompt, only.length)
    prompts_count = len(segments[0].prompts)
    if len(words) != prompts_count:
        raise ValueError(
            f"got {prompts_count} prompts but {len(words)} lists of class words; give one list per prompt"
        )
    num_words = max((len(w) for w in words), default=0)
    if num_words == 0:
        raise ValueError("class_names is empty: give at least one class word per prompt")
    total = sum(segment.length for segment in segments)
    weights = torch.zeros(prompts_count, total, num_words)
    for b, prompt_words in enumerate(words):
        if len(prompt_words) == 0:
            raise ValueError(f"no class words given for the prompt {segments[0].prompts[b]!r}")
        lowered = [w.strip().lower() for w in prompt_words]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"duplicate class words {list(prompt_words)} for the prompt {segments[0].prompts[b]!r}")
        for c, word in enumerate(prompt_words):
            votes, offset, reasons = [], 0, []
            for segment in segments:
                if segment.tokenizer is not None:
                    prompt = segment.prompts[b]
                    spans = find_word_spans(prompt, word)
                    kept = _kept_positions(segment.tokenizer, prompt, spans, segment.length) if spans else []
                    if kept:
                        votes.append([offset + p for p in kept])
                    else:
                        reasons.append(
                            f"{segment.name} ({segment.length} tokens): "
                            + ("past the limit" if spans else f"not in {prompt!r}")
                        )
                offset += segment.length
            if not votes:
                raise ClassWordNotFoundError(
                    f"class word {word!r} is in no text the model sees: {'; '.join(reasons)}. Put the word in the "
                    "prompt (whole word, any case), early enough to be within a text encoder's limit."
                )
            for positions in votes:
                weights[b, positions, c] += 1.0 / (len(positions) * len(votes))
    return weights.repeat_interleave(num_images_per_prompt, dim=0)
