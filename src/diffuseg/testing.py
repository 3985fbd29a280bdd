"""Tiny, offline Stable Diffusion components for tests, examples and benchmarks.

Nothing here is downloaded: the tokenizer's vocabulary is written in code, every model is
built from a config and initialised from a seed. Two shapes are available, matching the
two families of real checkpoints:

* ``"sd1"``: cross-attention dim 32, one head dim for all blocks, conv projections (SD 1.x);
* ``"sd2"``: cross-attention dim 48, per-block head counts, linear projections (SD 2.x).

and the newer families, :func:`tiny_pipeline` ``("sdxl" | "sd3" | "flux")``, with an offline
T5 tokenizer (:func:`build_t5_tokenizer`).

>>> from diffuseg.testing import tiny_stable_diffusion
>>> pipe = tiny_stable_diffusion(seed=0)                      # a StableDiffusionPipeline
>>> pipe.save_pretrained("tiny-sd")                            # loads with from_pretrained
"""

from __future__ import annotations

import inspect
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


# ---------------------------------------------------------------- SDXL, SD3 and FLUX families
#
# Shaped as diffusers' own fast tests shape them (tiny widths, one or two layers), with the
# tokenizers built offline. Image sizes: every VAE here has two blocks (latent = image / 2),
# so a 64-pixel image gives a 32² latent: SDXL cross-attention at 16² (its first block has
# none, as in SDXL), SD3 a 16² patch grid (patch 2), FLUX a 16² grid (2×2 packing).

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """An offline SentencePiece-style (Unigram) ``T5Tokenizer``: ``"▁" + word`` is one piece for each of ``words``.

    Other words are spelled out in single characters, the first carrying the "▁" word-start
    mark, so T5 splits words differently from CLIP (CLIP marks word *ends*). Upper-case
    letters are pieces of their own (T5 has no lower-casing), digits and common punctuation too.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for word in dict.fromkeys(w.lower() for w in words):
        pieces.setdefault("▁" + word, -1.0)
    for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'-":
        pieces.setdefault(char, -6.0)
        pieces.setdefault("▁" + char, -6.5)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=model_max_length)


def _tiny_t5(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _tiny_clip(tokenizer, hidden_size: int, seed: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden_size,
    )
    model = CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)
    return model.eval()


def _tiny_vae(seed: int, latent_channels: int, flow: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) if flow else {}
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        **extra,
    ).eval()


def tiny_sdxl_components(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS) -> dict:
    """A tiny ``StableDiffusionXLPipeline``'s components: two CLIP encoders (32 + 32 channels), ``text_time`` conditioning."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_clip_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids × 8 + pooled text (32)
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        norm_num_groups=32,
    ).eval()
    return {
        "unet": unet,
        "vae": _tiny_vae(seed + 1, 4, flow=False),
        "text_encoder": _tiny_clip(tokenizer, 32, seed + 2),
        "text_encoder_2": _tiny_clip(tokenizer_2, 32, seed + 3, projection_dim=32),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
        ),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_components(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, t5: bool = True) -> dict:
    """A tiny ``StableDiffusion3Pipeline``'s components (patch 2; ``t5=False`` omits T5 as diffusers allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(words), build_clip_tokenizer(words)
    tokenizer_3 = build_t5_tokenizer(words, model_max_length=256)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,  # CLIP-L (16) + CLIP-G (16) channels = T5's width
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    ).eval()
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed + 1, 4, flow=True),
        "text_encoder": _tiny_clip(tokenizer, 16, seed + 2, projection_dim=16),
        "text_encoder_2": _tiny_clip(tokenizer_2, 16, seed + 3, projection_dim=16),
        "text_encoder_3": _tiny_t5(tokenizer_3, 32, seed + 4) if t5 else None,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3 if t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components(seed: int = 0, words: Iterable[str] = DEFAULT_WORDS, guidance_embeds: bool = True) -> dict:
    """A tiny ``FluxPipeline``'s components: one double- and one single-stream block; guidance-distilled (FLUX-dev) by default."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_t5_tokenizer(words, model_max_length=512)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # one latent channel, 2×2-packed
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed + 1, 1, flow=True),
        "text_encoder": _tiny_clip(tokenizer, 32, seed + 2),
        "text_encoder_2": _tiny_t5(tokenizer_2, 32, seed + 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_pipeline(family: Family, pipeline_class=None, **kwargs):
    """A tiny pipeline of ``family`` (or ``pipeline_class``, a subclass of the family's), progress bar off."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if family in ("sd1", "sd2"):
        return tiny_stable_diffusion(pipeline_class=pipeline_class, shape=family, **kwargs)
    builders = {
        "sdxl": (tiny_sdxl_components, StableDiffusionXLPipeline),
        "sd3": (tiny_sd3_components, StableDiffusion3Pipeline),
        "flux": (tiny_flux_components, FluxPipeline),
    }
    if family not in builders:
        raise ValueError(f"family must be one of sd1, sd2, {', '.join(builders)}; got {family!r}")
    build, default_class = builders[family]
    components = build(**kwargs)
    pipeline_class = pipeline_class or default_class
    accepted = inspect.signature(pipeline_class.__init__).parameters
    pipe = pipeline_class(**{name: value for name, value in components.items() if name in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: str | os.PathLike, family: Family, **kwargs) -> str:
    """Write a tiny pipeline folder of ``family`` (safetensors; CLIP tokenizers with their slow files)."""
    if family in ("sd1", "sd2"):
        return save_tiny_stable_diffusion(directory, shape=family, **kwargs)
    pipe = tiny_pipeline(family, **kwargs)
    pipe.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None and type(tokenizer).__name__.startswith("CLIP"):
            save_clip_tokenizer(tokenizer, os.path.join(directory, name))
    return os.fspath(directory)


def on_same_components(pipe, pipeline_class=None, scheduler_class=None):
    """A ``pipeline_class`` (default: ``pipe``'s class) sharing ``pipe``'s components, progress bar off.

    ``scheduler_class``: another scheduler, built from ``pipe``'s scheduler config. Tests use it to
    run a pipeline beside the plain diffusers pipeline it extends, on the same weights.
    """
    components = dict(pipe.components)
    if scheduler_class is not None:
        components["scheduler"] = scheduler_class.from_config(pipe.scheduler.config)
    other = (pipeline_class or type(pipe))(**components, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


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
