"""Prompts: templates, or MagicSeg-style descriptions written by a local causal language model.

Every prompt is checked to contain its class words within the text encoder's token limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffuseg.generation.classes import ClassSet


DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {class}",
    "a photo of {a} {class} {context}",
    "a photograph of {a} {class} {context}",
    "a realistic photo of {a} {class} {context}",
    "a close-up photo of {a} {class}",
    "a picture of {a} {class} {context}",
    "a high quality photo of {a} {class} {context}",
)
"""Templates: ``{class}`` the class word(s) (required), ``{context}`` one of the class's
context phrases (empty when it has none), ``{a}`` "a" or "an" for the word that follows."""

_PLACEHOLDERS = {"class", "context", "a"}
_ARTICLE = "\x00a\x00"


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` validated: each names ``{class}`` and uses no other placeholder than ``{context}``, ``{a}``."""
    import string

    templates = tuple(t.strip() for t in templates if t.strip())
    if not templates:
        raise ValueError("no templates given")
    for template in templates:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as error:
            raise ValueError(f"template {template!r} is malformed: {error}") from None
        if "class" not in fields:
            raise ValueError(
                f"template {template!r} does not contain {{class}}: every prompt must name its class "
                "(write e.g. 'a photo of {a} {class} {context}')"
            )
        unknown = fields - _PLACEHOLDERS
        if unknown:
            raise ValueError(f"template {template!r} uses unknown placeholders {sorted(unknown)} (known: class, context, a)")
    return templates


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Templates from a text file, one per line (``#`` comments)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"template file {str(path)!r} does not exist")
    lines = (line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
    return check_templates([line for line in lines if line.strip()])


def _fill_articles(text: str) -> str:
    def article(match: re.Match) -> str:
        return "an" if match.group(1).lower() in "aeiou" else "a"

    text = re.sub(re.escape(_ARTICLE) + r"(?=\s*(\w))", lambda m: article(m), text)
    return text.replace(_ARTICLE, "a")


def format_prompt(template: str, words: Sequence[str], context: str = "") -> str:
    """``template`` filled with one or two class words (``"dog and a cat"``) and a context."""
    phrase = words[0] if len(words) == 1 else f"{words[0]} and {_ARTICLE} {words[1]}"
    text = template.format(**{"class": phrase, "context": context, "a": _ARTICLE})
    return " ".join(_fill_articles(text).split())


def check_prompt(prompt: str, words: Sequence[str], tokenizer=None) -> None:
    """Raise ``ValueError`` unless every class word is in ``prompt`` (whole word, before the token limit)."""
    from diffuseg.tokens import find_word_spans, word_token_positions

    for word in words:
        if tokenizer is not None:
            word_token_positions(tokenizer, prompt, word)
        elif not find_word_spans(prompt, word):
            raise ValueError(f"class word {word!r} does not appear in the prompt {prompt!r}")


class TemplatePrompter:
    """Prompts from templates: a random template, synonym and context per sample."""

    def __init__(self, class_set: ClassSet, templates: Sequence[str] | None = None) -> None:
        self.classes = class_set.classes
        self.templates = check_templates(templates or class_set.templates or DEFAULT_TEMPLATES)

    def words_and_context(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[list[str], str]:
        words = [self.classes[c - 1].words[int(rng.integers(len(self.classes[c - 1].words)))] for c in class_ids]
        contexts = self.classes[class_ids[0] - 1].contexts
        context = contexts[int(rng.integers(len(contexts)))] if contexts else ""
        return words, context

    def __call__(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[str, list[str]]:
        """(prompt, class words in the order of ``class_ids``) for one sample."""
        template = self.templates[int(rng.integers(len(self.templates)))]
        words, context = self.words_and_context(class_ids, rng)
        return format_prompt(template, words, context), words


class DescriptionPrompter(TemplatePrompter):
    """MagicSeg-style descriptions written by a local causal language model (transformers).

    The model is asked for a one-sentence description of a photo showing the sample's
    classes, and its answer is made to start with a template prompt (``"a photo of a dog
    and a cat"``), so the class words are there by construction; the model writes the
    rest of the scene. The continuation is cut at the end of the first sentence and sampled
    with the sample's seed, so descriptions are reproducible.

    Args:
        folder: a local transformers model folder (``AutoModelForCausalLM``; safetensors,
            no remote code).
        class_set, templates: as :class:`TemplatePrompter` (the forced beginnings).
        max_new_tokens: length limit of the continuation.
        device: where the language model runs.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        class_set: ClassSet,
        templates: Sequence[str] | None = None,
        max_new_tokens: int = 24,
        device=None,
    ) -> None:
        super().__init__(class_set, templates)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"prompt model folder {str(folder)!r} does not exist (--prompt-model takes a local folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        if device is not None:
            self.model.to(device)
        self.max_new_tokens = max_new_tokens

    def instruction(self, words: Sequence[str]) -> str:
        named = " and ".join(f"{_fill_articles(_ARTICLE + ' ' + w)}" for w in words)
        return f"Write one sentence describing a realistic photo that shows {named}."

    def __call__(self, class_ids: Sequence[int], rng: np.random.Generator) -> tuple[str, list[str]]:
        import torch

        beginning, words = super().__call__(class_ids, rng)
        instruction = self.instruction(words)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = f"{instruction}\n"
        inputs = self.tokenizer(text + beginning, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        seed = int(rng.integers(2**31))
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            output = self.model.generate(
                **inputs,
                do_sample=True,
                top_p=0.9,
                temperature=0.8,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        continuation = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return self.complete(beginning, continuation), words

    @staticmethod
    def complete(beginning: str, continuation: str) -> str:
        """``beginning`` + the first sentence of ``continuation``, white space normalised."""
        continuation = continuation.split("\n", 1)[0]
        end = re.search(r"[.!?](\s|$)", continuation)
        if end:
            continuation = continuation[: end.start() + 1]
        glue = "" if continuation[:1] in ",.;:!?" else " "
        return " ".join((beginning + glue + continuation).split())
