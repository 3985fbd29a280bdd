"""Tiny, offline Stable Diffusion components for tests, examples and benchmarks.

Nothing here is downloaded: the tokenizer's vocabulary is written in code, every model is
built from a config and initialised from a seed. Two shapes are available, matching the
two families of real checkpoints:

* ``"sd1"``: cross-attention dim 32, one head dim for all blocks, conv projections (SD 1.x);
* ``"sd2"``: cross-attention dim 48, per-block head counts, linear projections (SD 2.x).

>>> from diffuseg.testing import tiny_stable_diffusion
>>> pipe = tiny_stable_diffusion(seed=0)                      # a StableDiffusionPipeline
>>> pipe.save_pretrained("tiny-sd")                            # loads with from_pretrained
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

# Words every tiny tokenizer knows as single tokens; anything else is spelled out in
# characters, which gives tests multi-token words for free.
DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "on", "in", "with", "photo", "picture", "image", "nothing",
    "dog", "cat", "car", "bird", "sofa", "person", "tree", "grass", "road", "sky", "house",
    "red", "green", "blue", "big", "small", "two", "background", "park", "street", "room",
)

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def clip_tokenizer_files(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges of a CLIP tokenizer in which each of ``words`` is one token.

    The byte alphabet (with and without the end-of-word mark) is always included, so any
    other text still tokenizes, letter by letter.
    """
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    known_merges: set[tuple[str, str]] = set()

    def add_merge(left: str, right: str) -> None:
        if (left, right) not in known_merges:
            known_merges.add((left, right))
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))

    for word in dict.fromkeys(w.lower() for w in words):
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary entries must be single words, got {word!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            add_merge(merged, symbol)
            merged += symbol
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A ``CLIPTokenizer`` whose vocabulary is ``words`` plus the byte alphabet.

    Words whose left-to-right merges collide with another word's are still guaranteed to
    be single tokens: missing merges are added until every word tokenizes to one id.
    """
    from transformers import CLIPTokenizer

    words = list(words)
    vocab, merges = clip_tokenizer_files(words)
    for _ in range(8):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
        broken = {}
        for word in words:
            pieces = tokenizer.tokenize(word)
            if len(pieces) > 1:
                broken[word] = pieces
        if not broken:
            return tokenizer
        for pieces in broken.values():
            merged = pieces[0]
            for piece in pieces[1:]:
                if (merged, piece) not in merges:
                    merges.append((merged, piece))
                    vocab.setdefault(merged + piece, len(vocab))
                merged += piece
    raise RuntimeError(f"could not make these words single tokens: {sorted(broken)}")


def save_clip_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """``save_pretrained`` plus the slow files (``vocab.json``, ``merges.txt``).

    transformers 5 writes only ``tokenizer.json``; older readers of a pipeline folder and
    ``CLIPTokenizer(vocab_file, merges_file)`` need the two classic files as well.
    """
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for merge in model["merges"]:
            f.write((" ".join(merge) if isinstance(merge, list) else merge) + "\n")


ModelShape = Literal["sd1", "sd2"]


def tiny_components(
    seed: int = 0,
    shape: ModelShape = "sd1",
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    sample_size: int = 32,
    words: Iterable[str] = DEFAULT_WORDS,
    model_max_length: int = 77,
) -> dict:
    """The components of a tiny Stable Diffusion, deterministic for ``seed``.

    Every UNet block has cross-attention, so maps are recorded at ``len(block_out_channels)``
    resolutions. The VAE has two blocks and downsamples by 2 (real SD: 8), so a 64-pixel
    image has a 32² latent and cross-attention at 32² and 16² with the default blocks.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if shape not in ("sd1", "sd2"):
        raise ValueError(f"shape must be 'sd1' or 'sd2', got {shape!r}")
    sd2 = shape == "sd2"
    cross_attention_dim = 48 if sd2 else 32
    blocks = len(block_out_channels)
    tokenizer = build_clip_tokenizer(words, model_max_length=model_max_length)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * blocks,
        up_block_types=("CrossAttnUpBlock2D",) * blocks,
        cross_attention_dim=cross_attention_dim,
        # SD 2.x: a head count per block and linear projections; SD 1.x: one head dim, convs.
        attention_head_dim=tuple(2 * (i + 1) for i in range(blocks)) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=min(32, min(block_out_channels)),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            vocab_size=len(tokenizer),
            max_position_embeddings=model_max_length,
            hidden_act="gelu" if sd2 else "quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_stable_diffusion(pipeline_class=None, **kwargs):
    """A tiny ``StableDiffusionPipeline`` (or ``pipeline_class``) built by :func:`tiny_components`."""
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    pipe = pipeline_class(**tiny_components(**kwargs), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_stable_diffusion(directory: str | os.PathLike, **kwargs) -> str:
    """Write a tiny pipeline folder (safetensors, tokenizer with its slow files) and return its path."""
    pipe = tiny_stable_diffusion(**kwargs)
    pipe.save_pretrained(directory, safe_serialization=True)
    save_clip_tokenizer(pipe.tokenizer, os.path.join(directory, "tokenizer"))
    return os.fspath(directory)


def random_sd15(pipeline_class=None, seed: int = 0):
    """Stable Diffusion 1.5's architecture at its published dimensions, with random weights.

    UNet 320/640/1280/1280 (860M parameters), CLIP ViT-L/14 text encoder (12 layers, width 768,
    vocabulary 49,408), the SD VAE (128/256/512/512, /8): what a real checkpoint costs, without
    a download. The tokenizer is the tiny offline one (token ids only, never meaning).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's UNet
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipeline_class = pipeline_class or StableDiffusionPipeline
    pipe = pipeline_class(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
