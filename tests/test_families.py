"""SDXL, SD3 and FLUX: the attention core, word lookup across CLIP and T5, DiffuMask per family.

Tiny offline models (diffuseg.testing), 64-pixel images, 2 steps. Every VAE here has two
blocks (latent = image / 2): SDXL records cross-attention at 16², SD3 (patch 2) and FLUX
(2×2 packing) record at their 16² patch grids.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

import diffuseg
from diffuseg.attention import AttentionController, AttentionStore, attention_control, step_window
from diffuseg.backends import backend_for, denoiser_of
from diffuseg.pipelines import (
    DiffuMaskFluxPipeline,
    DiffuMaskSD3Pipeline,
    DiffuMaskXLPipeline,
)
from diffuseg.testing import (
    build_clip_tokenizer,
    build_t5_tokenizer,
    save_tiny_pipeline,
    tiny_pipeline,
)
from diffuseg.tokens import ClassWordNotFoundError, TextSegment, sequence_token_weights

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
FAMILIES = {
    "sdxl": (
        DiffuMaskXLPipeline,
        StableDiffusionXLPipeline,
        dict(num_inference_steps=2, height=64, width=64),
    ),
    "sd3": (
        DiffuMaskSD3Pipeline,
        StableDiffusion3Pipeline,
        dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32),
    ),
    "flux": (
        DiffuMaskFluxPipeline,
        FluxPipeline,
        dict(num_inference_steps=2, height=64, width=64, max_sequence_length=32),
    ),
}
GRID = (16, 16)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    diffumask_class, _, fast = FAMILIES[request.param]
    return (
        request.param,
        tiny_pipeline(request.param, pipeline_class=diffumask_class, seed=0),
        fast,
    )


def plain_of(name, pipe):
    """The family's own pipeline on the same components."""
    plain = FAMILIES[name][1](**pipe.components)
    plain.set_progress_bar_config(disable=True)
    return plain


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- every family


def test_images_equal_the_plain_family_pipeline_and_masks_are_labels(family):
    name, pipe, fast = family
    plain = plain_of(name, pipe)
    prompt = "a photo of a dog on the grass"
    expected = plain(prompt, generator=generator(), output_type="np", **fast).images
    out = pipe(
        prompt,
        class_names=["dog", "grass"],
        generator=generator(),
        output_type="np",
        **fast,
    )
    assert np.allclose(out.images, expected, atol=1e-5)
    assert out.masks.shape == (1, 64, 64) and out.masks.dtype == np.uint8
    assert set(np.unique(out.masks)) <= {0, 1, 2, 255}
    assert out.attention_maps.shape == (1, 2, 64, 64) and np.isfinite(out.attention_maps).all()
    assert out.attention_maps.max() == pytest.approx(1.0)


def test_batches_and_images_per_prompt_match_single_runs(family):
    _, pipe, fast = family
    prompts, names = (
        ["a dog on the grass", "a cat in the park"],
        [["dog", "grass"], ["cat"]],
    )
    batch = pipe(
        prompts,
        class_names=names,
        num_images_per_prompt=2,
        generator=[generator(s) for s in (1, 2, 3, 4)],
        output_type="np",
        **fast,
    )
    assert batch.masks.shape == (4, 64, 64) and batch.attention_maps.shape == (
        4,
        2,
        64,
        64,
    )
    for i in range(4):
        prompt, words = prompts[i // 2], names[i // 2]
        single = pipe(
            prompt,
            class_names=words,
            generator=generator(i + 1),
            output_type="np",
            **fast,
        )
        assert np.allclose(batch.attention_maps[i, : len(words)], single.attention_maps[0], atol=1e-4)
        assert np.array_equal(batch.masks[i], single.masks[0])
    assert not batch.attention_maps[2:, 1].any()  # padding column of the one-word prompt


class KeepImageToText(AttentionController):
    """Keeps every recorded probability slice whole, to check the store's running means."""

    def __init__(self, store):
        super().__init__()
        self.store, self.maps = store, []

    def begin_denoiser_call(self, grid, batch, context=None, auxiliary=False):
        super().begin_denoiser_call(grid, batch, context, auxiliary)
        self.store.begin_denoiser_call(grid, batch, context, auxiliary)

    def wants(self, kind, size):
        return self.store.wants(kind, size)

    def __call__(self, kind, size, probs, queries):
        if queries.start == 0:
            self.maps.append(probs.clone())
        else:
            self.maps[-1] = torch.cat([self.maps[-1], probs], dim=2)
        return self.store(kind, size, probs, queries)


def test_word_twice_is_the_mean_of_its_occurrences(family):
    name, pipe, fast = family
    pipe = plain_of(name, pipe)
    prompt = "a dog and a dog"
    segments = backend_for(denoiser_of(pipe)).text_segments(
        pipe, [prompt], {"max_sequence_length": fast.get("max_sequence_length")}
    )
    weights = sequence_token_weights(segments, [["dog"]])
    # CLIP: <bos> a dog and a dog -> 2 and 5; T5 (no begin token): ▁a ▁dog ▁and ▁a ▁dog -> 1 and 4.
    expected = {
        "sdxl": {2: 0.5, 5: 0.5},
        "sd3": {2: 0.25, 5: 0.25, 77 + 1: 0.25, 77 + 4: 0.25},
        "flux": {1: 0.5, 4: 0.5},
    }
    assert {int(i): pytest.approx(float(weights[0, i, 0])) for i in weights[0, :, 0].nonzero()} == expected[name]

    store = AttentionStore(weights)
    keeper = KeepImageToText(store)
    with attention_control(denoiser_of(pipe), keeper):
        pipe(prompt, generator=generator(), output_type="latent", **fast)
    mean = store.cross_attention()[GRID]
    conditional = [m[-1:].mean(dim=1) for m in keeper.maps if m.shape[2] == GRID[0] * GRID[1]]
    reference = torch.stack([sum(p[..., i] * w for i, w in expected[name].items()) for p in conditional]).mean(dim=0)
    assert torch.allclose(mean.flatten(), reference.flatten(), atol=1e-6)


class ExplicitStore(AttentionStore):
    """An AttentionStore that sees every probability slice (no fused readout)."""

    def __call__(self, kind, size, probs, queries):
        return super().__call__(kind, size, probs, queries)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_fused_readout_equals_explicit_probabilities(name):
    pipe = tiny_pipeline(name, seed=0)
    fast = FAMILIES[name][2]
    prompts = ["a zebra on the grass", "a dog and a dog"]
    segments = backend_for(pipe.transformer).text_segments(pipe, prompts, {"max_sequence_length": 32})
    weights = sequence_token_weights(segments, [["zebra", "grass"], ["dog"]], num_images_per_prompt=2)
    maps = {}
    for store_class in (AttentionStore, ExplicitStore):
        store = store_class(weights)
        with attention_control(pipe.transformer, store):
            pipe(prompts, num_images_per_prompt=2, generator=generator(), output_type="latent", **fast)
        maps[store_class] = store.cross_attention()[GRID]
    assert (
        AttentionStore(weights).readout_weights(GRID) is weights
        and ExplicitStore(weights).readout_weights(GRID) is None
    )
    assert torch.allclose(maps[AttentionStore], maps[ExplicitStore], atol=1e-6)
    assert maps[AttentionStore].abs().sum() > 0


def test_processors_restored_after_success_and_error(family):
    _, pipe, fast = family
    denoiser = denoiser_of(pipe)
    before = {name: type(p) for name, p in denoiser.attn_processors.items()}

    def boom(*args, **kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe("a dog", class_names=["dog"], callback_on_step_end=boom, **fast)
    assert {name: type(p) for name, p in denoiser.attn_processors.items()} == before
    assert "encode_prompt" not in vars(pipe)
    assert not denoiser._forward_pre_hooks


def test_custom_pipeline_loads_each_family(family, tmp_path):
    from diffusers import DiffusionPipeline

    name, pipe, fast = family
    folder = save_tiny_pipeline(tmp_path / name, name, seed=0)
    shim = {"sdxl": "diffumask_xl", "sd3": "diffumask_sd3", "flux": "diffumask_flux"}[name]
    loaded = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(REPO / "pipelines" / shim), trust_remote_code=True
    )
    assert type(loaded).__name__ == type(pipe).__name__
    loaded.set_progress_bar_config(disable=True)
    out = loaded("a dog", class_names=["dog"], generator=generator(), output_type="np", **fast)
    expected = pipe("a dog", class_names=["dog"], generator=generator(), output_type="np", **fast)
    assert np.allclose(out.images, expected.images, atol=1e-5)
    assert np.array_equal(out.masks, expected.masks)


def test_attention_window_follows_the_schedule_run(family):
    name, pipe, fast = family
    pipe = plain_of(name, pipe)
    schedule = {"timesteps": [999, 749, 499, 249]} if name == "sdxl" else {"sigmas": [1.0, 0.75, 0.5, 0.25]}
    with diffuseg.capture(pipe, words=["dog"], steps=lambda: step_window((0.5, 1.0), pipe.num_timesteps)) as maps:
        pipe("a dog", generator=generator(), output_type="latent", **{**fast, **schedule})
    assert maps.store.step == 3 and maps.store.steps == (2, 4)


# ---------------------------------------------------------------- MM-DiT specifics


def test_flux_true_cfg_negative_pass_is_not_recorded():
    pipe = tiny_pipeline("flux", seed=0)
    fast = dict(FAMILIES["flux"][2], num_inference_steps=1)
    with diffuseg.capture(pipe, words=["dog"]) as plain:
        pipe("a dog on the grass", generator=generator(), output_type="latent", **fast)
    with diffuseg.capture(pipe, words=["dog"]) as guided:
        pipe(
            "a dog on the grass",
            negative_prompt="a blurry cat",
            true_cfg_scale=3.0,
            generator=generator(),
            output_type="latent",
            **fast,
        )
    assert guided.store.step == 0 and guided.store.cross_counts == plain.store.cross_counts
    assert torch.allclose(guided.aggregate(), plain.aggregate(), atol=1e-6)


def test_sd3_without_t5_and_blocks_choice():
    pipe = tiny_pipeline("sd3", pipeline_class=DiffuMaskSD3Pipeline, seed=0, t5=False)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    fast = FAMILIES["sd3"][2]
    out = pipe(
        "a dog on the grass",
        class_names=["dog", "grass"],
        blocks=[1],
        generator=generator(),
        output_type="np",
        **fast,
    )
    assert out.masks.shape == (1, 64, 64) and np.isfinite(out.attention_maps).all()
    refined = pipe(
        "a dog on the grass",
        class_names=["dog", "grass"],
        blocks=[1],
        refine=True,
        generator=generator(),
        output_type="np",
        **fast,
    )
    assert set(np.unique(refined.masks)) <= {0, 1, 2, 255} and not np.allclose(
        refined.attention_maps, out.attention_maps
    )
    with pytest.raises(ValueError, match="blocks must lie in 0..1"):
        pipe("a dog", class_names=["dog"], blocks=[2], **fast)
    long = " ".join(["a"] * 80) + " dog"
    with pytest.raises(ClassWordNotFoundError, match="'dog'.*CLIP \\(77 tokens\\): past the limit"):
        pipe(long, class_names=["dog"], **fast)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_concept_maps_change_nothing_and_split_pixels(name):
    pipe = tiny_pipeline(name, seed=0)
    fast = FAMILIES[name][2]
    prompts = ["a photo of a dog on the grass", "a cat"]
    expected = pipe(prompts, generator=generator(), output_type="np", **fast).images
    with diffuseg.capture(
        pipe,
        words=[["dog", "grass"], ["cat"]],
        maps_from="concepts",
        other_concepts=["background"],
    ) as maps:
        images = pipe(prompts, generator=generator(), output_type="np", **fast).images
    assert np.allclose(images, expected, atol=1e-5)
    concept = maps.per_resolution()[GRID]
    assert concept.shape == (2, 2, *GRID)
    assert not concept[1, 1].any()  # padding column
    # Softmax over concepts: the words' shares plus the background's make 1, so the words' are below 1.
    assert (concept.sum(dim=1) < 1).all() and (concept > 0).any(dim=1)[0].all()


def test_concept_maps_need_an_mmdit():
    pipe = tiny_pipeline("sdxl", seed=0)
    with (
        pytest.raises(ValueError, match="needs an MM-DiT"),
        diffuseg.capture(pipe, words=["dog"], maps_from="concepts"),
    ):
        pass


def test_diffumask_concepts_option():
    pipe = tiny_pipeline("flux", pipeline_class=DiffuMaskFluxPipeline, seed=0)
    out = pipe(
        "a dog on the grass",
        class_names=["dog", "grass"],
        maps_from="concepts",
        generator=generator(),
        output_type="np",
        **FAMILIES["flux"][2],
    )
    assert set(np.unique(out.masks)) <= {0, 1, 2, 255} and out.attention_maps.shape == (
        1,
        2,
        64,
        64,
    )


# ---------------------------------------------------------------- word lookup across CLIP and T5


@pytest.fixture(scope="module")
def clip():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def t5():
    return build_t5_tokenizer()


def pieces(tokenizer, prompt, weights_column, offset=0, length=None):
    ids = tokenizer(prompt).input_ids
    return [
        tokenizer.convert_ids_to_tokens(ids[i - offset])
        for i in weights_column.nonzero().flatten().tolist()
        if offset <= i < offset + (length or len(ids))
    ]


def test_t5_marks_word_starts_and_splits_unknown_words(t5):
    assert t5.tokenize("a zebra") == ["▁a", "▁z", "e", "b", "r", "a"]
    assert t5("a dog").input_ids[-1] == t5.eos_token_id  # no begin token, an end token


def test_multi_token_word_one_vote_per_tokenizer(clip, t5):
    prompt = "a zebra on the grass"
    segments = [
        TextSegment(clip, 77, [prompt], "CLIP"),
        TextSegment(t5, 32, [prompt], "T5"),
    ]
    weights = sequence_token_weights(segments, [["zebra"]])[0, :, 0]
    assert pieces(clip, prompt, weights[:77]) == ["z", "e", "b", "r", "a</w>"]
    assert pieces(t5, prompt, weights[77:]) == ["▁z", "e", "b", "r", "a"]
    assert weights[:77].sum() == pytest.approx(0.5) and weights[77:].sum() == pytest.approx(0.5)


def test_repeated_case_and_punctuation_across_tokenizers(clip, t5):
    prompt = "A Dog, and another dog!"
    segments = [
        TextSegment(clip, 77, [prompt], "CLIP"),
        TextSegment(t5, 32, [prompt], "T5"),
    ]
    weights = sequence_token_weights(segments, [["dog"]])[0, :, 0]
    assert pieces(clip, prompt, weights[:77]) == ["dog</w>", "dog</w>"]
    # "Dog" is not a T5 piece (no lower-casing): "▁D" "o" "g"; "dog" is.
    assert pieces(t5, prompt, weights[77:]) == ["▁D", "o", "g", "▁dog"]


def test_words_past_each_limit(clip, t5):
    prompt = " ".join(["a"] * 80) + " dog"  # CLIP keeps 75 words, T5 with 128 keeps 127 pieces
    segments = [
        TextSegment(clip, 77, [prompt], "CLIP"),
        TextSegment(t5, 128, [prompt], "T5"),
    ]
    weights = sequence_token_weights(segments, [["dog"]])[0, :, 0]
    assert weights[:77].sum() == 0 and weights[77:].sum() == pytest.approx(1.0)  # T5 alone sees it
    short_t5 = [
        TextSegment(clip, 77, [prompt], "CLIP"),
        TextSegment(t5, 64, [prompt], "T5"),
    ]
    with pytest.raises(
        ClassWordNotFoundError,
        match="CLIP \\(77 tokens\\): past the limit; T5 \\(64 tokens\\): past the limit",
    ):
        sequence_token_weights(short_t5, [["dog"]])
    with pytest.raises(ClassWordNotFoundError, match="'cat'.*not in"):
        sequence_token_weights(segments, [["cat"]])


def test_flux_word_past_max_sequence_length():
    pipe = tiny_pipeline("flux", pipeline_class=DiffuMaskFluxPipeline, seed=0)
    fast = dict(FAMILIES["flux"][2], max_sequence_length=8)
    with pytest.raises(
        ClassWordNotFoundError,
        match="'dog' appears only after the text encoder's 8-token limit",
    ):
        pipe("a photo of a big red and small dog", class_names=["dog"], **fast)
    out = pipe("a dog", class_names=["dog"], generator=generator(), output_type="np", **fast)
    assert out.masks.shape == (1, 64, 64)


# ---------------------------------------------------------------- family detection for the commands


def test_family_from_model_index(tmp_path):
    from diffuseg.families import model_family, pipeline_class_for

    assert model_family("shapesworld") == "sd"  # its model_index names DiffuMaskPipeline
    folder = save_tiny_pipeline(tmp_path / "flux", "flux", seed=0)
    assert model_family(folder) == "flux"
    assert pipeline_class_for("diffumask", folder) is DiffuMaskFluxPipeline
    with pytest.raises(ValueError, match="maskdiffusion does not run on flux models .* it runs on: sd"):
        pipeline_class_for("maskdiffusion", folder)


def test_concepts_default_background_and_class_word_not_doubled():
    pipe = tiny_pipeline("sd3", pipeline_class=DiffuMaskSD3Pipeline, seed=0)
    fast = FAMILIES["sd3"][2]
    one = pipe("a dog", class_names=["dog"], maps_from="concepts", generator=generator(), output_type="np", **fast)
    # With "background" competing, the one class does not take every pixel at full strength.
    assert one.attention_maps.shape == (1, 1, 64, 64) and one.attention_maps.min() < 1.0
    with diffuseg.capture(pipe, words=["background"], maps_from="concepts", other_concepts=["background"]) as maps:
        StableDiffusion3Pipeline.__call__(
            pipe, "a dog on a background", generator=generator(), output_type="latent", **fast
        )
    assert torch.allclose(maps.per_resolution()[GRID], torch.ones(1, 1, *GRID))  # the only concept: itself


def test_string_negative_prompt_with_a_list_of_prompts(family):
    name, pipe, fast = family
    extra = {"true_cfg_scale": 2.0} if name == "flux" else {}
    for prompt in ("a dog", ["a dog", "a dog on the grass"]):
        out = pipe(prompt, class_names=["dog"], negative_prompt="a cat", output_type="np", **extra, **fast)
        assert out.masks.shape[0] == (1 if isinstance(prompt, str) else 2)


class ScaleTextAttention(AttentionController):
    """Multiplies every image → text probability by ``factor`` (an edit, as prompt-to-prompt makes)."""

    def __init__(self, factor):
        super().__init__()
        self.factor, self.calls = factor, 0

    def wants(self, kind, size):
        return kind == "cross"

    def __call__(self, kind, size, probs, queries):
        self.calls += 1
        return probs * self.factor


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_controllers_can_edit_mmdit_attention(name):
    pipe = tiny_pipeline(name, seed=0)
    fast = FAMILIES[name][2]

    def latents(controller=None):
        if controller is None:
            return pipe("a dog", generator=generator(), output_type="latent", **fast).images
        with attention_control(pipe.transformer, controller):
            return pipe("a dog", generator=generator(), output_type="latent", **fast).images

    plain = latents()
    identity, silenced = ScaleTextAttention(1.0), ScaleTextAttention(0.0)
    assert torch.allclose(latents(identity), plain, atol=1e-5) and identity.calls > 0
    assert not torch.allclose(latents(silenced), plain, atol=1e-3)


# ----------------------------------------------------------------------------- the commands pick the family
@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_generate_runs_diffumask_on_each_family_and_refuses_methods_it_cannot_serve(name, tmp_path, capsys):
    from datasets import load_dataset

    from diffuseg import cli
    from diffuseg.families import method_pipelines

    folder = save_tiny_pipeline(tmp_path / name, name, seed=0)
    common = ["--model", folder, "--classes", "dog", "--images-per-class", "2", "--steps", "2",
              "--height", "64", "--width", "64", "--threads", "1"]
    assert cli.main(["generate", "--out", str(tmp_path / "set"), *common]) == 0
    rows = load_dataset(str(tmp_path / "set"), split="train")
    assert len(rows) == 2 and rows[0]["image"].size == (64, 64)
    assert set(np.unique(np.asarray(rows[0]["label"]))) <= {0, 1, 255}

    capsys.readouterr()
    code = cli.main(["generate", "--out", str(tmp_path / "cf"), "--pipeline", "counterfactual", *common])
    if name in method_pipelines()["counterfactual"]:
        assert code == 0
        assert "negative_image" in load_dataset(str(tmp_path / "cf"), split="train").column_names
    else:
        assert code != 0
        assert f"counterfactual does not run on {name} models" in capsys.readouterr().err

    import PIL.Image

    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    assert cli.main(["segment", str(tmp_path / "photo.png"), "--classes", "dog", "--model", folder,
                     "--out", str(tmp_path / "seg"), "--threads", "1"]) != 0
    assert f"maskdiffusion does not run on {name} models" in capsys.readouterr().err
