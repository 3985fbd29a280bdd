"""The work plan: which sample is what (seed, classes, prompt) and where it goes in the writer.

Sample ``i`` of a run with ``seed`` uses ``sample_seed(seed, i)`` for its prompt, its class
choice and its latents; the work is cut into blocks of ``samples_per_shard`` consecutive
samples (one shard each), so a block's content depends only on the settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from diffuseg.generation.prompts import TemplatePrompter, check_prompt

if TYPE_CHECKING:
    from diffuseg.generation.config import GenerationConfig


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of sample ``index`` of a run with ``seed`` (independent streams per sample).

    ``stream`` separates other random choices (1: mosaics) from the samples' own.
    """
    entropy = [int(seed), int(index)] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) | (int(state[1]) >> 1))


@dataclass
class SampleRequest:
    """One sample to generate.

    Attributes:
        index: the sample's index in the run.
        seed: its seed (latents, prompt choices); recorded in the ``seed`` column.
        prompt: the text prompt.
        class_ids: dataset label ids of the classes named in the prompt.
        words: the word naming each class in ``prompt`` (same order as ``class_ids``); mask
            value ``k`` of a pipeline's output is ``class_ids[k - 1]``.
    """

    index: int
    seed: int
    prompt: str
    class_ids: list[int]
    words: list[str]


class WorkPlan:
    """Which sample is what: seeds, classes, prompts, and writer slots of samples and mosaics.

    ``WorkPlan(config).request(i, prompter)`` reproduces sample ``i`` (prompt, seed, class
    words) exactly, e.g. to regenerate it.

    Block ``b`` holds generated samples ``b*S .. b*S+S-1`` and up to ``M`` mosaics; in the
    writer it occupies slots ``b*(S+M) ..``, so a block is one shard.
    """

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.S = config.samples_per_shard
        self.M = config.mosaic_slots
        self.num_samples = config.num_samples
        self.num_blocks = math.ceil(self.num_samples / self.S)

    def block_indices(self, block: int) -> range:
        return range(block * self.S, min((block + 1) * self.S, self.num_samples))

    def mosaic_count(self, block: int) -> int:
        return round(self.config.mosaic_fraction * len(self.block_indices(block))) if self.M else 0

    def slot(self, index: int) -> int:
        block, offset = divmod(index, self.S)
        return block * (self.S + self.M) + offset

    def mosaic_slot(self, block: int, j: int) -> int:
        return block * (self.S + self.M) + self.S + j

    def block_slots(self, block: int) -> set[int]:
        slots = {self.slot(i) for i in self.block_indices(block)}
        return slots | {self.mosaic_slot(block, j) for j in range(self.mosaic_count(block))}

    def request(self, index: int, prompter: TemplatePrompter, tokenizer=None) -> SampleRequest:
        """Sample ``index``: its seed, classes and prompt, checked against ``tokenizer``."""
        seed = sample_seed(self.config.seed, index)
        rng = np.random.default_rng(seed)
        class_ids = self.classes_of(index, rng)
        prompt, words = prompter(class_ids, rng)
        try:
            check_prompt(prompt, words, tokenizer)
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from None
        return SampleRequest(index, seed, prompt, class_ids, words)

    def classes_of(self, index: int, rng: np.random.Generator) -> list[int]:
        """Class ids named by sample ``index``: class ``index % C`` first (so every block mixes classes)."""
        num_classes = len(self.config.classes.classes)
        first = index % num_classes + 1
        if self.config.two_class_fraction and rng.random() < self.config.two_class_fraction:
            others = [c for c in range(1, num_classes + 1) if c != first]
            return [first, others[int(rng.integers(len(others)))]]
        return [first]
